"""Trunks, forks and rung checkpoints (flame/components/fork.py), with the real trainer on CPU in fp32.

A trunk laid out for 10 steps (``lr_scheduler.schedule_steps``) paused at steps 3 and 6 and continued
gives the per-step losses of the straight 10-step run; a fork of its step-6 checkpoint into another
folder continues it exactly; a cool-down fork decays the lr over its steps and validates; rung
checkpoints (``keep_steps``) survive ``keep_latest_k``; a fork of another model shape, data stream or
layout is a ConfigError before any work.
"""

from __future__ import annotations

import json
import math

import pytest

from flame.components.fork import cooldown_overrides, cooldown_steps, release_kept_steps
from flame.config.errors import ConfigError
from flame.config.loader import parse_args
from flame.config.validate import validate
from tests.checkpoint.conftest import build_trainer, cli_main, steps_on_disk, train_here
from tests.conftest import SEQ_LEN
from tests.helpers import read_metrics

WSD = {"lr_scheduler__decay_ratio": "0.3", "lr_scheduler__warmup_steps": "2", "validation__enable": "true",
       "validation__freq": "5", "validation__steps": "2", "validation__dataset_split": "train"}  # fmt: skip


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def assert_same_steps(reference: list[dict], records: list[dict], steps: list[int]) -> None:
    ref = {r["step"]: r for r in reference}
    got = {r["step"]: r for r in records}
    for step in steps:
        for key in ("loss", "grad_norm", "lr"):
            assert close(got[step][key], ref[step][key]), (step, key, got[step][key], ref[step][key])


@pytest.fixture(scope="module")
def straight(run_flags, tmp_path_factory, fixed_docs):
    """The straight 10-step WSD run (decay over the last 3 steps), validating every 5 steps."""
    dump = tmp_path_factory.mktemp("straight")
    args = run_flags(dump, validation__data_files=fixed_docs, validation__dataset="json", **WSD)
    return {"dump": dump, "records": train_here(args)}


@pytest.fixture(scope="module")
def trunk(run_flags, tmp_path_factory, fixed_docs):
    """The same run as a trunk: schedule laid out for 10 steps, paused at 3 and 6, then continued to 10;
    rung checkpoints at 3 and 6 with keep_latest_k 1 and an interval that never fires."""
    dump = tmp_path_factory.mktemp("trunk")
    segments = []
    for stop in (3, 6, 10):
        args = run_flags(dump, training__steps=stop, lr_scheduler__schedule_steps=10, checkpoint__enable_checkpoint="true",
                         checkpoint__interval=1000, checkpoint__keep_latest_k=1, checkpoint__keep_steps="3,6",
                         validation__data_files=fixed_docs, validation__dataset="json", **WSD)  # fmt: skip
        segments.append(train_here(args))
    return {"dump": dump, "segments": segments, "args": args}


def test_a_paused_and_continued_trunk_equals_the_straight_run(straight, trunk):
    records = trunk["segments"][-1]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert_same_steps(straight["records"], records, list(range(1, 11)))  # 1e-6 relative (bitwise here)
    # Each segment stopped where it was told, on the 10-step schedule: the lr at step 3 is the peak, not a decay.
    assert [r["step"] for r in trunk["segments"][0]] == [1, 2, 3]
    assert trunk["segments"][0][-1]["lr"] == pytest.approx(3e-3)
    # The validation at each pause (the rung metric "stable") left training untouched, and is logged there.
    assert "validation_loss" in trunk["segments"][0][-1] and "validation_loss" in trunk["segments"][1][-1]
    # Rung checkpoints survive keep_latest_k 1; the final one is the newest.
    assert steps_on_disk(trunk["dump"] / "checkpoint") == {"step-3": True, "step-6": True, "step-10": True}
    summary = json.loads((trunk["dump"] / "summary.json").read_text())
    assert summary["steps"] == 10


def test_resume_with_more_steps_recomputes_the_schedule(run_flags, tmp_path):
    """Without schedule_steps a resumed run follows the schedule of its new training.steps from its step on."""
    dump = tmp_path / "run"
    train_here(run_flags(dump, training__steps=4, checkpoint__enable_checkpoint="true", checkpoint__interval=2))
    longer = train_here(
        run_flags(dump, training__steps=8, checkpoint__enable_checkpoint="true", checkpoint__interval=2)
    )
    # warmup 2, then torchtitan's linear decay over the 6 steps left of 8: the lr of step t is the factor at
    # index t - 1, 1 - (t - 3) / 6 (its virtual last step keeps the last lr above 0)
    expected = {step: 3e-3 * (1 - (step - 3) / 6) for step in range(5, 9)}
    assert {r["step"]: r["lr"] for r in longer if r["step"] >= 5} == pytest.approx(expected)


def test_a_fork_continues_another_runs_checkpoint_exactly(straight, trunk, run_flags, tmp_path, fixed_docs):
    source = trunk["dump"] / "checkpoint" / "step-6"
    before = {p: p.stat().st_mtime_ns for p in trunk["dump"].rglob("*")}
    dump = tmp_path / "fork"
    args = run_flags(dump, training__steps=10, checkpoint__fork_from=str(source), validation__data_files=fixed_docs,
                     validation__dataset="json", **WSD)  # fmt: skip
    trainer = build_trainer(args)
    try:
        assert trainer.checkpointer.loaded_from == f"forked from {source} at step 6"
        assert trainer.state.step == 6
        trainer.train()
    finally:
        trainer.close()
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [7, 8, 9, 10]
    assert_same_steps(straight["records"], records, [7, 8, 9, 10])
    assert not (dump / "checkpoint").exists()  # a fork saves nothing of its own without enable_checkpoint
    assert {p: p.stat().st_mtime_ns for p in trunk["dump"].rglob("*")} == before  # the source untouched


def test_a_cooldown_fork_decays_the_lr_and_validates(trunk, run_flags, tmp_path, fixed_docs):
    source = str(trunk["dump"] / "checkpoint" / "step-6")
    assert cooldown_steps(6, 0.5) == 3 and cooldown_steps(6, 0.01) == 1 and cooldown_steps(10, 0.2) == 2
    overrides = cooldown_overrides(source, 6, 0.5)
    flags = {k.replace(".", "__"): (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in overrides.items()}
    dump = tmp_path / "cooldown"
    records = train_here(run_flags(dump, **{**WSD, **flags, "validation__data_files": fixed_docs,
                                            "validation__dataset": "json"}))  # fmt: skip
    assert [r["step"] for r in records] == [7, 8, 9]
    # The fork's own WSD: stable at step 7 (the trunk's lr), then the linear decay of 3 steps (1, 2/3, 1/3).
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 2e-3, 1e-3])
    assert close(records[0]["loss"], {r["step"]: r for r in trunk["segments"][-1]}[7]["loss"])
    assert "validation_loss" in records[-1] and math.isfinite(records[-1]["validation_loss"])
    summary = json.loads((dump / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["final_validation_loss"] == records[-1]["validation_loss"]


def test_release_kept_steps_applies_keep_latest_k_when_a_trial_ends(tmp_path):
    for step in (3, 6, 8, 10):
        (tmp_path / "checkpoint" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "checkpoint" / f"step-{step}" / ".metadata").write_text("")
    assert release_kept_steps(str(tmp_path), keep_latest_k=0) == []  # 0 keeps all
    assert release_kept_steps(str(tmp_path), keep_latest_k=1) == [3, 6, 8]
    assert steps_on_disk(tmp_path / "checkpoint") == {"step-10": True}


def test_bad_forks_are_config_errors_before_any_work(trunk, run_flags, tmp_path, llama_json, capsys):
    source = trunk["dump"] / "checkpoint" / "step-6"

    def problems(world_size: int = 1, **overrides) -> str:
        config = parse_args(run_flags(tmp_path / "fork", checkpoint__fork_from=str(source), **overrides))
        with pytest.raises(ConfigError) as error:
            validate(config, world_size, "cpu")
        return error.value.format()

    wide = llama_json(tmp_path / "wide.json", hidden_size=32)
    assert "another model shape than the source run's (hidden_size 64 -> 32)" in problems(model__config=wide)
    assert f"--training.seq_len {SEQ_LEN * 2} differs from the source run's {SEQ_LEN}" in problems(
        training__seq_len=SEQ_LEN * 2
    )
    assert "--training.seed 7 differs from the source run's 42" in problems(training__seed=7)
    assert "holds the data positions of 1 data-parallel ranks, this run has 2" in problems(world_size=2)
    assert "the fork starts at step 6; --training.steps 6 must be larger" in problems(training__steps=6)
    incomplete = tmp_path / "other" / "checkpoint" / "step-2"
    incomplete.mkdir(parents=True)
    config = parse_args(run_flags(tmp_path / "fork", checkpoint__fork_from=str(incomplete)))
    with pytest.raises(ConfigError, match=r"is not a complete checkpoint \(no \.metadata\)"):
        validate(config, 1, "cpu")
    own = parse_args(run_flags(trunk["dump"], checkpoint__fork_from=str(source)))
    with pytest.raises(ConfigError, match=r"is this run's own checkpoint; resume it with --checkpoint\.load_step"):
        validate(own, 1, "cpu")
    # The command line: exit code 2, one message, nothing written.
    args = run_flags(tmp_path / "fork", checkpoint__fork_from=str(source), model__config=wide)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "another model shape" in err and "Traceback" not in err
    assert not (tmp_path / "fork").exists()


def test_schedule_and_rung_flags_are_checked(run_flags, tmp_path):
    config = parse_args(run_flags(tmp_path, training__steps=10, lr_scheduler__schedule_steps=8,
                                  checkpoint__keep_steps="3,0"))  # fmt: skip
    with pytest.raises(ConfigError) as error:
        validate(config, 1, "cpu")
    text = error.value.format()
    assert "--lr_scheduler.schedule_steps 8 is below --training.steps 10" in text
    assert "--checkpoint.keep_steps only applies with --checkpoint.enable_checkpoint" in text
    assert "--checkpoint.keep_steps must be steps >= 1, got [0]" in text


def test_a_paused_trunk_is_not_exported_by_train_sh(run_flags, tmp_path, capsys):
    from flame.utils.resolve import main

    assert main(run_flags(tmp_path, training__steps=3, lr_scheduler__schedule_steps=10)) == 0
    assert "FLAME_PAUSED=1" in capsys.readouterr().out
    assert main(run_flags(tmp_path, training__steps=10, lr_scheduler__schedule_steps=10)) == 0
    assert "FLAME_PAUSED=0" in capsys.readouterr().out
