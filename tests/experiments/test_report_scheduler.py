"""The scheduler parts of a report on a recorded successive-halving stage (the decisions.jsonl format of
the schedulers issue, synthetic): the rung ladder, the rung column, the saving against running every
trial to the maximum; and GPU-hours for trials whose metrics show a CUDA device."""

from __future__ import annotations

import json
import os

import pytest

from flame.experiments.report import plots, write
from flame.experiments.report.collect import collect
from flame.experiments.report.cost import saving, stage_cost
from flame.experiments.spec import Experiment, Grid, Stage
from tests.experiments.report_fixtures import md_tables, png_size

SCHEDULER = {"kind": "sha", "resource": "steps", "min": 2, "max": 8, "eta": 2, "rung_metric": "stable"}
TOKENS_PER_STEP = 4 * 32


def loss(lr: float, step: int) -> float:
    return 1 + 1000 * abs(lr - 3e-3) + 1 / step


def make_stage(root: str) -> dict:
    """Four trials; rung 0 at 2 steps: the top two go on; rung 1 at 4 steps: the top one goes to 8."""
    lrs = [1e-3, 2e-3, 3e-3, 5e-3]
    ids = [f"lr{lr:g}-0000000{i}" for i, lr in enumerate(lrs)]
    reached = {ids[0]: 2, ids[3]: 2, ids[1]: 4, ids[2]: 8}
    rows = []
    for trial, lr in zip(ids, lrs, strict=True):
        folder = os.path.join(root, "sha", trial)
        os.makedirs(folder)
        steps = reached[trial]
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            for step in range(1, steps + 1):
                record = {"step": step, "loss": loss(lr, step), "tokens_seen": step * TOKENS_PER_STEP}
                record["memory_reserved_gib"] = 10.0  # what the trainer logs on a CUDA device
                if step % 2 == 0:
                    record["validation_loss"] = loss(lr, step)
                f.write(json.dumps(record) + "\n")
        summary = {"steps": steps, "tokens": steps * TOKENS_PER_STEP, "wall_seconds": 450.0 * steps, "hf_export": None}
        json.dump(summary, open(os.path.join(folder, "summary.json"), "w"))
        json.dump({"id": trial, "stage": "sha", "ngpu": 2, "nnode": 1}, open(os.path.join(folder, "trial.json"), "w"))
        open(os.path.join(folder, "config.toml"), "w").write(f"[optimizer]\nlr = {lr}\n[training]\nsteps = 8\n")
        rows.append(
            {
                "id": trial,
                "contender": None,
                "params": {"optimizer.lr": lr},
                "status": "done",
                "step": steps,
                "steps": 8,
                "metric": loss(lr, steps),
                "dump_folder": folder,
                "lineage": {},
            }
        )
    rung0 = {t: loss(lr, 2) for t, lr in zip(ids, lrs, strict=True)}
    rung1 = {ids[1]: loss(lrs[1], 4), ids[2]: loss(lrs[2], 4)}
    with open(os.path.join(root, "sha", "decisions.jsonl"), "w") as f:
        f.write(json.dumps({"rung": 0, "resource": 2, "competitors": rung0, "promoted": [ids[2], ids[1]], "stopped": [ids[0], ids[3]], "cooldown_steps": 2}) + "\n")  # fmt: skip
        f.write(json.dumps({"rung": 1, "resource": 4, "competitors": [{"trial": t, "metric": m} for t, m in rung1.items()], "promoted": [ids[2]], "stopped": [ids[1]], "cooldown_steps": 1}) + "\n")  # fmt: skip
    return {
        "experiment": "sched",
        "root": root,
        "metric": "validation_loss",
        "mode": "min",
        "stages": [
            {
                "name": "sha",
                "kind": "train",
                "metric": "validation_loss",
                "mode": "min",
                "best": ids[2],
                "complete": True,
                "waiting_for": [],
                "trials": rows,
            }
        ],
    }


@pytest.fixture
def scheduled(tmp_path):
    root = str(tmp_path / "exp")
    status = make_stage(root)
    stage = Stage(name="sha", space={"optimizer.lr": Grid((1e-3, 2e-3, 3e-3, 5e-3))}, scheduler=dict(SCHEDULER))
    return Experiment(name="sched", root=root, stages=[stage]), status


def test_rung_ladder_rungs_and_saving(scheduled):
    exp, status = scheduled
    (stage,) = collect(exp, status)
    ids = [t["id"] for t in status["stages"][0]["trials"]]
    by_id = {t.id: t for t in stage.trials}
    assert [by_id[i].rung for i in ids] == [0, 1, 2, 0]  # the highest rung each reached
    assert [by_id[i].pruned for i in ids] == [True, True, False, True]
    fig = plots.rung_figure(stage)
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.get_lines()}
    assert sorted(g for g in lines if not g.endswith(":stopped")) == sorted(ids)  # one line per trial
    assert sorted(g[: -len(":stopped")] for g in lines if g.endswith(":stopped")) == sorted([ids[0], ids[1], ids[3]])
    assert list(lines[ids[0]].get_xdata()) == [2.0]  # stopped at rung 0
    assert list(lines[ids[1]].get_xdata()) == [2.0, 4.0]  # stopped at rung 1
    assert list(lines[ids[2]].get_xdata()) == [2.0, 4.0, 8.0]  # promoted twice, trained to the maximum
    assert list(lines[ids[2]].get_ydata()) == pytest.approx([loss(3e-3, 2), loss(3e-3, 4), loss(3e-3, 8)])
    assert lines[ids[2]].get_linewidth() > lines[ids[0]].get_linewidth()  # the best highlighted
    cost = stage_cost(stage)
    assert cost.steps == 2 + 4 + 8 + 2 + 3  # trained steps + cool-downs
    assert cost.gpu_hours == pytest.approx(sum(450.0 * s * 2 for s in (2, 4, 8, 2)) / 3600)
    sv = saving(stage, cost)
    assert (sv.trials, sv.max_steps, sv.full_steps) == (4, 8.0, 32.0)
    assert sv.saving == pytest.approx(1 - 19 / 32)


def test_the_report_of_a_scheduled_stage(scheduled):
    exp, status = scheduled
    paths = write(exp, status)
    root = exp.root
    assert paths["figures"]["sha"] == ["sha_loss.png", "sha_params.png", "sha_rungs.png"]
    width, height = png_size(os.path.join(root, "report", "plots", "sha_rungs.png"))
    assert width > 500 and height > 250
    md = open(paths["markdown"]).read()
    (rows,) = md_tables(md).values()
    rungs = {r[1]: r[-1] for r in rows}
    ids = [t["id"] for t in status["stages"][0]["trials"]]
    assert [rungs[i] for i in ids] == ["0 (stopped)", "1 (stopped)", "2", "0 (stopped)"]
    assert (
        "19 steps trained (cool-downs included) against 32 for all 4 trials to 8 steps: 59.4 % of the full budget, a saving of 40.6 %"
        in md
    )
    assert "| GPU-hours |" in md.splitlines()[md.splitlines().index("## Cost") + 2]
    summary = open(paths["summary"]).read()
    assert "scheduler saving: sha (sha): 19 steps" in summary and "GPU-hours" in summary


def test_no_scheduler_no_ladder_and_no_saving(scheduled):
    exp, status = scheduled
    exp.stages[0].scheduler = None
    (stage,) = collect(exp, status)
    assert plots.rung_figure(stage) is None and saving(stage, stage_cost(stage)) is None
    assert [t.rung for t in stage.trials] == [None] * 4
    paths = write(exp, status)
    assert "sha_rungs.png" not in paths["figures"]["sha"]
    md = open(paths["markdown"]).read()
    assert "saving" not in md and "(stopped)" not in md
