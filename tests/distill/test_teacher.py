"""Teachers: found, checked, built like the student, loaded with the exact weights, frozen."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from flame.config.errors import ConfigError
from flame.config.schema import JobConfig
from flame.distill.source import fingerprint, identity, resolve_teacher, tokenizer_problem
from flame.distill.teacher import Teacher
from tests.conftest import SEQ_LEN
from tests.distill.conftest import PADDED_VOCAB


def _config(**distill) -> JobConfig:
    config = JobConfig()
    for key, value in distill.items():
        setattr(config.distill, key, value)
    return config


def _batch(rows: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 257, (rows, SEQ_LEN + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def test_hugging_face_teacher_with_a_padded_vocabulary(one_rank, hf_teacher, byte_tokenizer):
    """Built with the tokenizer's 257 rows of its 300: the logits are the Hugging Face model's first 257."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer)
    source = resolve_teacher(hf_teacher)
    assert source.kind == "hf" and source.tokenizer == hf_teacher
    teacher = Teacher(source, tokenizer, _config(teacher=hf_teacher), one_rank, torch.device("cpu"))
    assert teacher.padded_vocab == PADDED_VOCAB
    batch = _batch()
    got = teacher.logits(batch)
    reference = AutoModelForCausalLM.from_pretrained(hf_teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(input_ids=batch["input_ids"]).logits
    assert got.shape[-1] == 257 and want.shape[-1] == PADDED_VOCAB
    assert torch.allclose(got, want[..., :257], atol=1e-5)
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_run_folder_teacher_reads_the_step_it_is_given(one_rank, run_teacher, byte_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flame.utils.convert_dcp_to_hf import convert_dcp_to_hf

    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer)
    latest = resolve_teacher(run_teacher)
    assert (latest.kind, latest.step) == ("run", 4)
    assert latest.tokenizer == byte_tokenizer
    batch = _batch()
    logits = {}
    for step in (2, 4):
        source = resolve_teacher(run_teacher, step)
        teacher = Teacher(
            source, tokenizer, _config(teacher=run_teacher, teacher_step=step), one_rank, torch.device("cpu")
        )
        logits[step] = teacher.logits(batch)
        hf = convert_dcp_to_hf(
            run_teacher, step, source.model_config, byte_tokenizer, output=str(tmp_path / f"hf{step}")
        )
        with torch.no_grad():
            want = AutoModelForCausalLM.from_pretrained(hf).eval()(input_ids=batch["input_ids"]).logits
        assert torch.equal(logits[step], want), step
    assert not torch.equal(logits[2], logits[4])
    assert fingerprint(resolve_teacher(run_teacher, 2)) != fingerprint(latest)
    assert identity(latest) == identity(resolve_teacher(run_teacher, 4))


def test_teacher_step_absent_and_missing_teachers(run_teacher, hf_teacher, tmp_path):
    with pytest.raises(
        ConfigError, match=r"--distill.teacher_step 3: .*step-3 is not a complete checkpoint .*complete steps: 2, 4"
    ):
        resolve_teacher(run_teacher, 3)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_teacher(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="only applies to a flame run folder"):
        resolve_teacher(hf_teacher, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a Hugging Face model folder"):
        resolve_teacher(str(tmp_path / "empty"))


def test_fingerprint_follows_the_weights(hf_teacher, tmp_path):
    copy = shutil.copytree(hf_teacher, tmp_path / "copy")
    assert fingerprint(resolve_teacher(str(copy))) == fingerprint(resolve_teacher(hf_teacher))
    weights = next(p for p in os.listdir(copy) if p.endswith(".safetensors"))
    with open(copy / weights, "r+b") as f:  # one byte of the tensor data (past the header)
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    assert fingerprint(resolve_teacher(str(copy))) != fingerprint(resolve_teacher(hf_teacher))


def test_another_tokenizer_is_named_with_both_sizes(hf_teacher, other_tokenizer, byte_tokenizer):
    source = resolve_teacher(hf_teacher)
    assert tokenizer_problem(byte_tokenizer, source) is None
    problem = tokenizer_problem(other_tokenizer, source)
    assert f"its tokenizer {hf_teacher} (257 tokens)" in problem
    assert f"--model.tokenizer_path {other_tokenizer} (258 tokens)" in problem


@pytest.mark.parametrize("layout", ["fsdp", *(pytest.param(x, marks=pytest.mark.slow) for x in ("ddp", "tp", "cp"))])
def test_teacher_on_two_ranks_matches_one_process_and_is_sharded(hf_teacher, byte_tokenizer, layout):
    """FSDP x2, DDP x2 and CP x2: the teacher is sharded over the ranks (half the parameters each); TP x2: its
    logits stay vocabulary-sharded (loss parallel); CP x2: each rank gets the logits of its sequence shard."""
    import json

    from tests.helpers import torchrun

    out = torchrun(
        2, [hf_teacher, byte_tokenizer, layout], module="tests.distill.teacher_layout_check", timeout=300
    ).stdout
    (record,) = [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if "RESULT " in line]
    assert record["max_diff"] <= 1e-5, record
    if layout in ("fsdp", "ddp", "cp"):  # under CP the student's FSDP axis is dp_shard x cp: the teacher's too
        assert record["shard_axes"] == (["dp_replicate"] if layout == "ddp" else ["fsdp"])
        assert abs(record["local_params"] - record["params"] / 2) <= record["params"] * 0.01, record
    if layout == "tp":
        assert "Shard(dim=2)" in record["placements"] or "Shard(dim=-1)" in record["placements"], record
        assert record["local_params"] < 0.7 * record["params"], record
