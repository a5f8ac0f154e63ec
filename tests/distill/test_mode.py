"""The trainer's distillation mode: loss = (1 - alpha) CE + alpha KD through the real trainer (one process).

alpha = 0 is plain training bit for bit; a teacher equal to the student gives KD 0 and a zero gradient; the
teacher stays frozen and out of the optimizer and the checkpoint; ce_loss/kd_loss/alpha and the validation
numbers are logged; the cache gives online top-k KD's losses; checkpoints record the teacher and the loss,
a resume with the same equals the uninterrupted run and one with another is refused (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from flame.config.loader import parse_args
from flame.distill.cache import main as cache_main
from flame.trainer import Trainer, train
from tests.distill.conftest import llama_config
from tests.helpers import read_metrics


def _train(flags: list[str]) -> list[dict]:
    config = parse_args(flags)
    train(config)
    return read_metrics(config.job.dump_folder)


def _cli(flags: list[str], capsys) -> tuple[int, str]:
    from flame.cli import main

    capsys.readouterr()
    code = main(flags)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def twin(tmp_path_factory, byte_tokenizer) -> str:
    """A Hugging Face Llama folder (vocabulary 257) that is both the student's initial weights and the teacher."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("twin")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**llama_config(257))).save_pretrained(folder)
    AutoTokenizer.from_pretrained(byte_tokenizer).save_pretrained(folder)
    return str(folder)


def test_alpha_zero_is_plain_training_and_the_teacher_stays_frozen(train_args, hf_teacher, tmp_path):
    plain = _train(train_args("plain", training__steps=3))
    flags = train_args(
        "alpha0", training__steps=3, distill__teacher=hf_teacher, distill__alpha=0.0,
        checkpoint__enable_checkpoint="true", checkpoint__interval=3,
    )  # fmt: skip
    trainer = Trainer(parse_args(flags))
    try:
        teacher = trainer.loss.teacher.model
        before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        trainer.train()
        assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        optimized = {id(p) for o in trainer.optimizers.optimizers for g in o.param_groups for p in g["params"]}
        assert not optimized & {id(p) for p in teacher.parameters()}
        identity = trainer.loss.teacher.identity
    finally:
        trainer.close()
    distilled = read_metrics(tmp_path / "alpha0")
    for a, b in zip(plain, distilled, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])  # exactly
        assert b["ce_loss"] == pytest.approx(b["loss"], abs=1e-6) and b["kd_loss"] > 0 and b["alpha"] == 0
    step = tmp_path / "alpha0" / "checkpoint" / "step-3"
    record = json.loads((step / "record.json").read_text())
    assert record["teacher"] == identity and record["loss"]["alpha"] == 0.0
    from flame.utils._checkpoint_io import tensor_metadata

    stored = tensor_metadata(str(step))
    model_keys = [k for k in stored if not k.startswith(("optimizer", "lr_scheduler", "dataloader", "train_state"))]
    assert len(model_keys) == len(list(trainer.model.state_dict())), "only the student's tensors are saved"


def test_mixed_loss_and_validation_metrics(train_args, hf_teacher, fixed_docs):
    flags = train_args(
        "mixed", training__steps=4, distill__teacher=hf_teacher, distill__alpha=0.3, distill__temperature=2.0,
        distill__top_k=8, validation__enable="true", validation__freq=2, validation__steps=2,
        validation__dataset="json", validation__data_files=fixed_docs, validation__dataset_split="train",
    )  # fmt: skip
    records = _train(flags)
    for r in records:
        assert r["loss"] == pytest.approx(0.7 * r["ce_loss"] + 0.3 * r["kd_loss"], rel=1e-6)
    validated = [r for r in records if "validation_loss" in r]
    assert [r["step"] for r in validated] == [2, 4]
    for r in validated:
        assert r["validation_kl_to_teacher"] > 0 and 0 <= r["validation_teacher_agreement"] <= 1
    assert "validation_teacher_loss" in validated[0] and "validation_teacher_loss" not in validated[1]
    # the teacher's loss on the same batches: a random teacher of the 257-token vocabulary, about log(257)
    assert validated[0]["validation_teacher_loss"] == pytest.approx(np.log(257), rel=0.1)


def test_teacher_equal_to_student_gives_zero_kd_and_zero_gradient(train_args, twin):
    flags = train_args("twin", training__steps=1, model__config=twin, checkpoint__initial_load_hf=twin,
                       distill__teacher=twin, distill__alpha=1.0, distill__temperature=2.0)  # fmt: skip
    (record,) = _train(flags)
    # KD exactly 0; its gradient 0 up to the rounding of exp/log in fp32 (measured 1.3e-8; CE's is about 1)
    assert record["kd_loss"] == 0.0 and record["grad_norm"] <= 1e-6 and record["ce_loss"] > 1
    ce = _train([*flags[: flags.index("--distill.teacher")], "--job.dump_folder", flags[1] + "-ce"])
    assert ce[0]["grad_norm"] > 0.1


def test_resume_with_the_same_teacher_equals_the_uninterrupted_run(train_args, hf_teacher, tmp_path, capsys):
    flags = train_args("resume", training__steps=4, distill__teacher=hf_teacher, distill__alpha=0.5,
                       checkpoint__enable_checkpoint="true", checkpoint__interval=2)  # fmt: skip
    straight = _train(flags)
    shutil.rmtree(tmp_path / "resume" / "checkpoint" / "step-4")
    resumed = _train(flags)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["loss"], a["kd_loss"], a["grad_norm"]) == (b["loss"], b["kd_loss"], b["grad_norm"])
    other = shutil.copytree(hf_teacher, tmp_path / "other_teacher")
    cases = {
        "another teacher": (["--distill.teacher", str(other)], "was trained with another teacher (path"),
        "another loss": (["--distill.temperature", "2"], "another distillation loss (--distill.temperature 1.0 there, 2.0 here)"),
        "no distillation": (flags[: flags.index("--distill.teacher")] + flags[flags.index("--distill.teacher") + 4 :], "this run does not"),
    }  # fmt: skip
    for name, (change, message) in cases.items():
        argv = change if name == "no distillation" else [*flags, *change]
        code, err = _cli(argv, capsys)
        assert code == 2 and message in err, (name, err)


def test_cache_through_the_trainer_equals_online_top_k(train_args, hf_teacher, tmp_path, capsys):
    common = dict(training__steps=3, training__gradient_accumulation_steps=2, training__batch_size=2,
                  distill__top_k=5, distill__temperature=2.0, distill__alpha=0.5)  # fmt: skip
    online = _train(train_args("online", distill__teacher=hf_teacher, **common))
    folder = tmp_path / "cache"
    assert cache_main([*train_args("c", distill__teacher=hf_teacher, distill__teacher_cache=folder, **common)]) == 0
    cached = _train(train_args("cached", distill__teacher_cache=folder, **common))
    for a, b in zip(online, cached, strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, a, b)
    # a cache made for another config: refused before any work
    code, err = _cli(train_args("seed7", distill__teacher_cache=folder, training__seed=7, **common), capsys)
    assert code == 2 and "was made for another config: training.seed 42 there, 7 here" in err
    assert not (tmp_path / "seed7").exists()
    # rows that are not the cache's (a fingerprint changed): the step stops with the row named
    prints = np.load(folder / "rank-0" / "fingerprints.npy", mmap_mode="r+")
    prints[5] += 1
    prints.flush()
    with pytest.raises(RuntimeError, match="row 1 of micro-batch 0 of step 2 is not the row the cache was made for"):
        _train(train_args("broken", distill__teacher_cache=folder, **common))


def test_linear_attention_student_from_a_llama_teacher(train_args, hf_teacher, tmp_path):
    pytest.importorskip("fla")
    from tests.parallel.test_fla_parallel import GLA_TINY

    gla = tmp_path / "gla.json"
    gla.write_text(json.dumps(GLA_TINY))
    records = _train(train_args("gla", model__config=gla, training__steps=3, distill__teacher=hf_teacher,
                                distill__alpha=0.5, distill__temperature=2.0))  # fmt: skip
    assert os.path.isfile(tmp_path / "gla" / "config.toml")
    for r in records:
        assert np.isfinite(r["kd_loss"]) and r["kd_loss"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["ce_loss"] + 0.5 * r["kd_loss"], rel=1e-6)
    assert records[-1]["kd_loss"] < records[0]["kd_loss"]
