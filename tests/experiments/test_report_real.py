"""The report of a real tiny experiment: train.sh trials of the session's tiny Llama (a few steps), with
TensorBoard on by default, W&B offline: tables match ``status --json``, the losses are the logged ones
against the tokens seen, TensorBoard's reader finds both trials in the one view, the best trial's TOML
names its Hugging Face export, and both W&B runs carry the experiment as their group."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest

from flame.experiments import api
from flame.experiments.report import plots
from flame.experiments.report.collect import collect
from tests.experiments.report_fixtures import md_tables, png_size
from tests.helpers import PYTHON, ROOT, env

SPEC = """
[experiment]
name = "real-tiny"
root = "{root}"
max_parallel = 2

[[stage]]
name = "lr"
config = "{base}"
override = { "metrics.enable_wandb" = true }
space = { "optimizer.lr" = { grid = [1e-3, 3e-3] } }
"""


@pytest.mark.slow
def test_report_of_a_real_tiny_experiment(write_spec, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = write_spec(SPEC)
    api.run(spec, echo=lambda *a, **k: None)
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "status", str(spec), "--json"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    (stage,) = status["stages"]
    root = status["root"]
    assert [t["status"] for t in stage["trials"]] == ["done", "done"]
    (rows,) = md_tables(open(os.path.join(root, "report", "report.md")).read()).values()
    by_id = {t["id"]: t for t in stage["trials"]}
    assert sorted(r[1] for r in rows) == sorted(by_id)
    for row in rows:
        t = by_id[row[1]]
        assert float(row[4]) == pytest.approx(t["metric"], rel=1e-4) and row[5] == "4/4" and row[8] == "done"
        assert row[6] == "512" and row[7].endswith(" s")  # 4 steps x 4 x 32 tokens; wall time from summary.json
    assert rows[0][0] == "★" and rows[0][1] == stage["best"]
    for name in ("lr_loss.png", "lr_params.png"):
        assert png_size(os.path.join(root, "report", "plots", name))[0] > 500
    exp = api._spec(str(spec), None)
    (data,) = collect(exp, status)
    fig = plots.loss_figure(data)
    train, val = fig.axes[:2]
    assert sorted(ln.get_gid() for ln in train.get_lines()) == sorted(by_id)
    for t in data.trials:  # the logged losses against the logged tokens_seen
        records = [json.loads(line) for line in open(os.path.join(t.folder, "metrics.jsonl"))]
        assert t.curve.measured_tokens and t.curve.tokens == [r["tokens_seen"] for r in records]
        assert t.curve.loss == [r["loss"] for r in records]
        assert t.curve.val_loss == [r["validation_loss"] for r in records if "validation_loss" in r]
        assert t.curve.val_loss[-1] == pytest.approx(t.metric)
    assert sorted(ln.get_gid() for ln in val.get_lines()) == sorted(by_id)
    # one TensorBoard view: the trainer's own event files of both trials (on by default), with hparams
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for t in stage["trials"]:
        acc = EventAccumulator(os.path.join(root, "tensorboard", "lr", t["id"]))
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
        assert acc.Scalars("validation_loss")[-1].value == pytest.approx(t["metric"], rel=1e-6)
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    best = by_id[stage["best"]]
    header = open(os.path.join(root, "report", "best_lr.toml")).read().splitlines()[1]
    assert header == f"# Hugging Face export: {best['dump_folder']}"
    assert os.path.exists(os.path.join(best["dump_folder"], "config.json"))
    # W&B: both runs in the experiment's group, the stage as job type
    for t in stage["trials"]:
        (run_file,) = glob.glob(os.path.join(t["dump_folder"], "wandb", "offline-run-*", "run-*.wandb"))
        data_bytes = open(run_file, "rb").read()
        assert b"real-tiny" in data_bytes  # the group (the experiment name appears nowhere else in the run)


SHA_SPEC = """
[experiment]
name = "real-sha"
root = "{root}"
max_parallel = 2

[[stage]]
name = "search"
config = "{base}"
override = { "lr_scheduler.decay_ratio" = 0.2, "lr_scheduler.warmup_steps" = 1 }
space = { "optimizer.lr" = { grid = [1e-3, 3e-3, 1e-2] } }
scheduler = { kind = "sha", min = 2, max = 6, eta = 3, rung_metric = "cooldown" }
"""


@pytest.mark.slow
def test_a_real_successive_halving_stage_continues_its_winner_and_reports_the_ladder(write_spec, monkeypatch):
    """train.sh trials under successive halving (3 learning rates, rungs of 2 and 6 steps, cool-down rung
    metrics): the rung's decision promotes the trial with the lowest cool-down validation loss, the promoted
    trial continues from its step-2 checkpoint to step 6 (it is not retrained), the others stop at their
    rung, and the report draws the rung ladder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = write_spec(SHA_SPEC)
    result = api.run(spec, echo=lambda *a, **k: None)
    stage = result.stage("search")
    root = api.status(spec)["root"]
    with open(os.path.join(root, "search", "decisions.jsonl")) as f:
        (rung0, *_) = [d for d in map(json.loads, f) if "rung" in d]
    competitors = rung0["competitors"]
    assert len(competitors) == 3 and all(isinstance(m, float) for m in competitors.values())
    assert rung0["promoted"] == [min(competitors, key=competitors.get)]
    by_id = {t["id"]: t for t in stage["trials"]}
    winner = by_id[rung0["promoted"][0]]
    assert stage["best"] == winner["id"] and winner["step"] == 6 and winner["status"] == "done"
    assert sorted(t["status"] for t in stage["trials"]) == ["done", "stopped", "stopped"]
    assert all(t["step"] == 2 for t in stage["trials"] if t["status"] == "stopped")
    records = [json.loads(line) for line in open(os.path.join(winner["dump_folder"], "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one run, continued
    log = "".join(open(p).read() for p in glob.glob(os.path.join(winner["dump_folder"], "*.log")))
    assert "resumed at step 2" in log, log[-2000:]
    assert png_size(os.path.join(root, "report", "plots", "search_rungs.png"))[0] > 500
    assert "search_rungs.png" in open(os.path.join(root, "report", "report.md")).read()


LADDER_SPEC = """
[experiment]
name = "real-KIND"
root = "{root}"
max_parallel = 2

[[stage]]
name = "search"
config = "{base}"
override = { "lr_scheduler.decay_ratio" = 0.2, "lr_scheduler.warmup_steps" = 1 }
space = { "optimizer.lr" = { grid = [1e-3, 2e-3, 3e-3, 1e-2, 3e-2] } }
scheduler = { kind = "KIND", min = 2, max = 6, eta = 3, rung_metric = "stable" }
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hyperband", "asha"])
def test_the_report_of_a_real_hyperband_or_asha_stage(write_spec, monkeypatch, kind):
    """train.sh trials under Hyperband (rungs of 2 and 6 steps, eta 3: bracket 1 races 3 learning rates at 2
    steps and continues the best to 6, bracket 0 trains the other 2 to 6) and under ASHA (2 workers): the
    recorded decisions follow the rules, promoted trials continue from their rung checkpoint, and the report's
    rung column, rung ladder and saving against training every trial to 6 steps are those of the trials."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = write_spec(LADDER_SPEC.replace("KIND", kind))
    api.run(spec, echo=lambda *a, **k: None)
    status = api.status(spec)
    (stage,) = status["stages"]
    root, trials = status["root"], stage["trials"]
    by_id = {t["id"]: t for t in trials}
    with open(os.path.join(root, "search", "decisions.jsonl")) as f:
        rungs = [d for d in map(json.loads, f) if "rung" in d]
    promoted = [p for d in rungs for p in d["promoted"]]
    if kind == "hyperband":
        assert [(d["bracket"], d["rung"], len(d["competitors"]), len(d["promoted"])) for d in rungs] == [(1, 0, 3, 1)]
        competitors = rungs[0]["competitors"]
        assert promoted == [min(competitors, key=competitors.get)]
        assert sorted(t["status"] for t in trials) == ["done"] * 3 + ["stopped"] * 2
    else:  # each promotion: a trial within the top floor(n / 3) of its rung's results then
        assert len(trials) == 5 and promoted
        for d in rungs:
            if d["promoted"]:
                ranked = sorted(d["competitors"], key=lambda t: d["competitors"][t])
                assert d["promoted"][0] in ranked[: len(ranked) // 3]
    for t in trials:
        assert t["step"] == (6 if t["status"] == "done" else 2), t
    assert stage["best"] in {t["id"] for t in trials if t["step"] == 6}
    for trial in promoted:  # continued from its rung checkpoint, not retrained
        folder = by_id[trial]["dump_folder"]
        records = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
        log = "".join(open(p).read() for p in glob.glob(os.path.join(folder, "*.log")))
        assert "resumed at step 2" in log, log[-2000:]
    md = open(os.path.join(root, "report", "report.md")).read()
    (rows,) = md_tables(md).values()
    for row in rows:  # the rung column: the highest rung reached, "(stopped)" for the trials left behind
        t = by_id[row[1]]
        rung = 1 if t["step"] == 6 and t["id"] in promoted else 0
        assert row[-1] == f"{rung}" + (" (stopped)" if t["status"] == "stopped" else ""), (row, t)
    trained = sum(t["step"] for t in trials)
    share = 100 * trained / 30
    assert (
        f"{trained} steps trained (cool-downs included) against 30 for all 5 trials to 6 steps: "
        f"{share:.1f} % of the full budget, a saving of {100 - share:.1f} %"
    ) in md
    exp = api._spec(str(spec), None)
    (data,) = collect(exp, status)
    ladder = plots.rung_figure(data).axes[0]
    assert sorted(g for g in (ln.get_gid() for ln in ladder.get_lines()) if not g.endswith(":stopped")) == sorted(by_id)
    assert png_size(os.path.join(root, "report", "plots", "search_rungs.png"))[0] > 500
