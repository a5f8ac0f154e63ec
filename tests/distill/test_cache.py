"""The offline teacher cache: written over exactly the training batches, read back equal to online top-k
KD, and refused when it was made for another config or its rows do not match."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flame.config.errors import ConfigError
from flame.config.loader import parse_args
from flame.config.validate import validate
from flame.distill.cache import main
from flame.distill.cache_io import TeacherCache
from flame.distill.divergences import KDSpec, topk_targets
from flame.distill.losses import kd_loss_sum
from flame.distill.source import resolve_teacher
from flame.distill.teacher import Teacher
from flame.distill.vocab import VocabView

K, T, STEPS = 5, 2.0, 3


@pytest.fixture
def cached(train_args, hf_teacher, tmp_path):
    """A cache of 3 steps x 2 micro-batches x 2 rows, for 2 data-parallel ranks."""
    folder = tmp_path / "cache"
    flags = train_args(
        "student", training__steps=STEPS, training__batch_size=2, training__gradient_accumulation_steps=2,
        distill__teacher=hf_teacher, distill__top_k=K, distill__temperature=T, distill__teacher_cache=str(folder),
    )  # fmt: skip
    assert main([*flags, "--world_size", "2"]) == 0
    return flags, str(folder)


def test_cache_round_trip_equals_online_top_k(cached, one_rank, byte_tokenizer, hf_teacher):
    from transformers import AutoTokenizer

    from flame.data import build_dataloader

    flags, folder = cached
    config = parse_args(flags)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["complete"] and meta["rows_per_rank"] == STEPS * 2 * 2 and meta["bytes_per_token"] == 8 * K + 4
    validate(config, world_size=2)  # the cache serves this config on 2 ranks
    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer)
    teacher = Teacher(resolve_teacher(hf_teacher), tokenizer, config, one_rank, torch.device("cpu"))
    assert meta["teacher"] == teacher.identity
    for dp_rank in (0, 1):
        cache = TeacherCache(folder, dp_rank, config)
        batches = iter(build_dataloader(config.training, tokenizer, dp_rank=dp_rank, dp_world_size=2))
        for step in range(1, STEPS + 1):
            for micro in range(2):
                batch = next(batches)
                stored = cache.targets(step, micro, batch)
                logits = teacher.logits(batch)
                online = topk_targets(logits.reshape(-1, 257), VocabView(257), K, T)
                assert torch.equal(stored.ids.reshape(-1, K), online.ids)
                assert torch.equal(stored.logprobs.reshape(-1, K), online.logprobs)
                assert torch.equal(stored.log_rest.reshape(-1), online.log_rest)
                student = torch.randn(logits.shape, generator=torch.Generator().manual_seed(step))
                spec = KDSpec("forward_kl", T, 0.5, K)
                a = kd_loss_sum(student, batch["labels"], stored, spec, 257)
                b = kd_loss_sum(student, batch["labels"], logits, spec, 257)
                assert torch.equal(a, b)


def test_misaligned_cache_is_refused(cached, byte_tokenizer):
    from transformers import AutoTokenizer

    from flame.data import build_dataloader

    flags, folder = cached
    with pytest.raises(ConfigError) as e:
        validate(parse_args([*flags, "--training.seed", "7"]), world_size=2)
    assert "was made for another config: training.seed 42 there, 7 here" in e.value.format()
    with pytest.raises(ConfigError, match="data-parallel ranks 2 there, 1 here"):
        validate(parse_args(flags), world_size=1)
    with pytest.raises(ConfigError, match=r"distill\.top_k 5 there, 4 here"):
        validate(parse_args([*flags, "--distill.top_k", "4"]), world_size=2)
    with pytest.raises(ConfigError, match=r"covers 3 steps, fewer than --training\.steps 4"):
        validate(parse_args([*flags, "--training.steps", "4"]), world_size=2)
    # a row the cache was not made for (here: step 2's rows presented at step 1)
    config = parse_args(flags)
    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer)
    batches = iter(build_dataloader(config.training, tokenizer, dp_rank=0, dp_world_size=2))
    cache = TeacherCache(folder, 0, config)
    first = next(batches)
    cache.targets(1, 0, first)
    with pytest.raises(RuntimeError, match="row 0 of micro-batch 1 of step 1 is not the row the cache was made for"):
        cache.targets(1, 1, first)


def test_cache_writer_refuses_bad_input(train_args, hf_teacher, tmp_path, capsys):
    base = train_args("student", distill__teacher=hf_teacher, distill__top_k=K)
    assert main(base) == 2
    assert "needs --distill.teacher_cache" in capsys.readouterr().err
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    assert main([*base, "--distill.teacher_cache", str(folder)]) == 2
    assert "holds a cache already; remove it first" in capsys.readouterr().err
    assert main([*base, "--distill.teacher_cache", str(tmp_path / "c2"), "--world_size", "0"]) == 2
    assert "--world_size: the training run's NGPU x NNODE" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists()
