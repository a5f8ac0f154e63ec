"""End-to-end training in real processes: layouts agree, resume is exact (bad input: test_bad_input.py)."""

from __future__ import annotations

import shutil

from tests.helpers import ROOT, read_metrics, run, torchrun, train

# fp32 on CPU: the same global batch on 1 or 2 ranks differs only by the order of float sums.
LOSS_TOL = 1e-5
GRAD_NORM_REL_TOL = 1e-4


def _pairs(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return list(zip(a, b, strict=True))


def test_fsdp2_two_ranks_match_one_process(train_args, tmp_path, fixed_docs):
    validation = {"validation__enable": "true", "validation__freq": 5, "validation__steps": 2}
    validation.update(validation__dataset="json", validation__data_files=fixed_docs, validation__dataset_split="train")
    train(train_args("single", training__batch_size=4, validation__batch_size=4, **validation))
    torchrun(2, train_args("fsdp", training__batch_size=2, validation__batch_size=2, **validation))
    single, fsdp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp")
    assert len(single) == 10
    for a, b in _pairs(single, fsdp):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_NORM_REL_TOL * a["grad_norm"], (a, b)
        assert a["lr"] == b["lr"]
        assert abs(a.get("validation_loss", 0) - b.get("validation_loss", 0)) <= LOSS_TOL, (a, b)
    assert [r["step"] for r in fsdp if "validation_loss" in r] == [5, 10]
    assert single[-1]["loss"] < single[0]["loss"] - 0.5  # it learns


def test_gradient_accumulation_matches_the_large_batch(train_args, tmp_path):
    train(train_args("large", training__batch_size=4, training__steps=4))
    train(train_args("accum", training__batch_size=2, training__gradient_accumulation_steps=2, training__steps=4))
    for a, b in _pairs(read_metrics(tmp_path / "large"), read_metrics(tmp_path / "accum")):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL, (a, b)


def test_resume_continues_with_identical_losses(train_args, tmp_path):
    args = train_args("run", checkpoint__enable_checkpoint="true", checkpoint__interval=4)
    train(args)
    uninterrupted = read_metrics(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-10", "step-4", "step-8"]
    # Drop the last checkpoint as if the job had died after step 9: it resumes from step 8.
    shutil.rmtree(ckpt / "step-10")
    resumed_run = train(args)
    assert "resumed at step 8" in resumed_run.stdout
    resumed = read_metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == list(range(1, 11))  # records past step 8 were replaced
    for a, b in _pairs(uninterrupted, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (a, b)


def test_run_folder_holds_config_and_metrics(train_args, tmp_path):
    from flame.config.loader import load_toml, parse_args

    args = train_args("run", training__steps=3)
    train(args)
    saved = load_toml(str(tmp_path / "run" / "config.toml"))
    assert saved == parse_args(args)
    record = read_metrics(tmp_path / "run")[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_second", "elapsed_seconds"):
        assert key in record
    assert record["tokens_per_second"] > 0


def test_train_sh_help_lists_every_section():
    proc = run(["bash", str(ROOT / "train.sh"), "-h"])
    for section in ("[job]", "[model]", "[optimizer]", "[lr_scheduler]", "[training]", "[checkpoint]", "[metrics]"):
        assert section in proc.stdout
    assert "--training.data_parallel_shard_degree" in proc.stdout
