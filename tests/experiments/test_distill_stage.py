"""``kind = "distill"`` stages: the teacher linked from another stage, students searched over alpha and T."""

from __future__ import annotations

import json
import os

import pytest

from flame.config.errors import ConfigError

SPEC = """
[experiment]
name = "kd"
root = "{root}"

[[stage]]
name = "teacher"
kind = "fake"
config = "{base}"
override = { "training.steps" = 2 }
space = { "optimizer.lr" = { grid = [1e-3, 3e-3] } }

[[stage]]
name = "student"
kind = "distill"
config = "{base}"
teacher = { link = "teacher", field = "dump_folder", pick = "best" }
override = { "training.steps" = 2, "distill.loss" = "jsd", "distill.beta" = 0.3 }
space = { "distill.alpha" = { grid = [0.25, 0.75] }, "distill.temperature" = { grid = [1.0, 2.0] } }
reduce = { top_k = 1 }
"""


def test_distill_stage_links_the_best_teacher_and_searches_students(write_spec):
    from flame.experiments import api
    from flame.experiments.driver import walk
    from flame.experiments.kinds import stage_kind
    from flame.experiments.local import write_trial_files
    from flame.experiments.records import Records

    spec = write_spec(SPEC)
    exp = api._spec(str(spec), None)
    (teachers,) = [s for s in walk(exp, Records(exp.root, writable=True), "collect") if s.stage.name == "teacher"]
    for item in teachers.to_launch:
        write_trial_files(item)
    trials = api.plan(spec)["stages"][0]["trials"]
    for trial in trials:  # what a finished trial leaves; the lower learning rate is the better teacher
        os.makedirs(os.path.join(trial["dump_folder"], "checkpoint", "step-2"))
        open(os.path.join(trial["dump_folder"], "checkpoint", "step-2", ".metadata"), "w").close()
        json.dump({"steps": 2}, open(os.path.join(trial["dump_folder"], "summary.json"), "w"))
        with open(os.path.join(trial["dump_folder"], "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 2, "validation_loss": trial["params"]["optimizer.lr"]}) + "\n")
    best = min(trials, key=lambda t: t["params"]["optimizer.lr"])
    students = walk(exp, Records(exp.root), "readonly")[1].scheduler.trials()
    assert len(students) == 4
    assert sorted((t.config.distill.alpha, t.config.distill.temperature) for t in students) == [
        (0.25, 1.0), (0.25, 2.0), (0.75, 1.0), (0.75, 2.0),
    ]  # fmt: skip
    for t in students:
        assert t.config.distill.teacher == best["dump_folder"]
        assert (t.config.distill.loss, t.config.distill.beta, t.config.training.steps) == ("jsd", 0.3, 2)
        assert t.lineage["teacher"] == best["id"]
        assert stage_kind("distill").command(t)[-1] == os.path.join(t.folder, "config.toml")
    assert len({t.id for t in students}) == 4


def test_distill_stage_needs_its_teacher(write_spec):
    from flame.experiments import api

    no_teacher = SPEC.replace('teacher = { link = "teacher", field = "dump_folder", pick = "best" }\n', "")
    with pytest.raises(ConfigError, match=r"teacher .* is missing"):
        api._spec(str(write_spec(no_teacher)), None)
    twice = SPEC.replace('"distill.loss" = "jsd"', '"distill.teacher" = "x", "distill.loss" = "jsd"')
    with pytest.raises(ConfigError, match=r"'distill\.teacher' is set by the stage's teacher key"):
        api._spec(str(write_spec(twice)), None)


def test_shipped_distill_demo_pairs_its_students():
    """configs/experiments/distill_demo.toml: scratch and distilled students differ only by the teacher (same
    base config, steps, seeds), and the teacher trains a larger model several times longer."""
    from flame.experiments.spec import load_spec
    from flame.experiments.values import Link
    from tests.helpers import ROOT

    exp = load_spec(ROOT / "configs" / "experiments" / "distill_demo.toml")
    stages = {s.name: s for s in exp.stages}
    assert [(s.name, s.kind) for s in exp.stages] == [
        ("teacher", "train"), ("scratch", "train"), ("distilled", "distill"), ("subset", "python"),
        ("scratch_limited", "train"), ("distilled_limited", "distill"),
    ]  # fmt: skip
    for scratch, distilled in (("scratch", "distilled"), ("scratch_limited", "distilled_limited")):
        a, b = stages[scratch], stages[distilled]
        assert a.config == b.config and a.space == b.space
        assert {k: v for k, v in b.override.items() if not k.startswith("distill.")} == a.override
        assert isinstance(b.options["teacher"], Link) and b.options["teacher"].stage == "teacher"
    assert stages["teacher"].override["training.steps"] >= 3 * stages["scratch"].override["training.steps"]
    assert stages["teacher"].override["model.config"] == "configs/tiny/llama_distill_teacher.json"
