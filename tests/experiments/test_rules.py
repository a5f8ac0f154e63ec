"""The experiment's rules on the fake trainer: grids, reduce, links, fan-out, contenders, zip, search, failures."""

from __future__ import annotations

import json
import math
import os

import pytest

from flame.config.loader import load_toml
from flame.experiments import api
from flame.experiments.plan import ExperimentError


def fake_loss(lr: float, seed: int = 42, steps: int = 4) -> float:
    return 1 + (math.log10(lr) + 2.5) ** 2 + 0.01 * seed + 1 / steps


GRID = """
[experiment]
name = "grid"
root = "{root}"
max_parallel = 2

[[stage]]
name = "search"
kind = "fake"
config = "{base}"
space = { "optimizer.lr" = { grid = [1e-3, 3e-3] }, "training.seed" = { grid = [0, 1] } }
reduce = { top_k = 1 }

[[stage]]
name = "scale-up"
kind = "fake"
config = "{base}"
override = { "training.steps" = 6, "optimizer.lr" = { link = "search", field = "optimizer.lr", pick = "best" } }
"""


def test_grid_reduce_and_link_to_the_winning_lr(write_spec):
    result = api.run(write_spec(GRID), echo=lambda *a, **k: None)
    search = result.stage("search")
    assert len(search["trials"]) == 4
    assert sorted((t["params"]["optimizer.lr"], t["params"]["training.seed"]) for t in search["trials"]) == [
        (1e-3, 0),
        (1e-3, 1),
        (3e-3, 0),
        (3e-3, 1),
    ]
    for t in search["trials"]:
        assert t["metric"] == pytest.approx(fake_loss(t["params"]["optimizer.lr"], t["params"]["training.seed"]))
    best = result.best("search")
    assert best["params"] == {"optimizer.lr": 3e-3, "training.seed": 0}  # closest to 10^-2.5, lowest seed
    assert [t["status"] for t in search["trials"]].count("masked") == 3
    (scale,) = result.stage("scale-up")["trials"]
    config = load_toml(os.path.join(scale["dump_folder"], "config.toml"))
    assert config.optimizer.lr == 3e-3 and config.training.steps == 6
    assert config.job.dump_folder == scale["dump_folder"]
    assert scale["lineage"] == {"search": best["id"]}
    assert scale["metric"] == pytest.approx(fake_loss(3e-3, 42, 6))


def test_same_spec_same_trials_and_a_change_gives_new_ids(write_spec):
    spec = write_spec(GRID)
    first = api.run(spec, echo=lambda *a, **k: None)
    ids = [t["id"] for t in first.stage("search")["trials"]]
    assert [t["id"] for t in api.plan(spec)["stages"][0]["trials"]] == ids
    stamp = {i: os.path.getmtime(os.path.join(first.status["root"], "search", i, "metrics.jsonl")) for i in ids}
    again = api.run(spec, echo=lambda *a, **k: None)  # nothing to do: finished trials are not rerun
    assert [t["id"] for t in again.stage("search")["trials"]] == ids
    assert {i: os.path.getmtime(os.path.join(first.status["root"], "search", i, "metrics.jsonl")) for i in ids} == stamp
    changed = write_spec(GRID.replace('"training.steps" = 6', '"training.steps" = 7'))
    result = api.run(changed, echo=lambda *a, **k: None)
    (scale,) = result.stage("scale-up")["trials"]
    assert scale["id"] != first.stage("scale-up")["trials"][0]["id"]
    assert os.path.isdir(first.stage("scale-up")["trials"][0]["dump_folder"])  # the old folder is kept
    assert [t["id"] for t in result.stage("search")["trials"]] == ids


def test_each_fans_out_with_lineage_and_top_k(write_spec):
    spec = write_spec(
        GRID.replace("top_k = 1", "top_k = 3").replace('pick = "best"', 'pick = "top:2"')
        + """
[[stage]]
name = "each"
kind = "fake"
config = "{base}"
override = { "optimizer.lr" = { link = "scale-up", field = "optimizer.lr", pick = "each" } }
space = { "training.seed" = { grid = [5, 6] } }
"""
    )
    result = api.run(spec, echo=lambda *a, **k: None)
    ranked = sorted(result.stage("search")["trials"], key=lambda t: (t["metric"], t["id"]))
    top2 = ranked[:2]
    scale = result.stage("scale-up")["trials"]
    assert sorted(t["lineage"]["search"] for t in scale) == sorted(t["id"] for t in top2)
    for t in scale:
        origin = next(s for s in top2 if s["id"] == t["lineage"]["search"])
        assert t["params"]["optimizer.lr"] == origin["params"]["optimizer.lr"]
    each = result.stage("each")["trials"]
    assert len(each) == 2 * 2  # 2 survivors x 2 seeds
    assert {(t["lineage"]["scale-up"], t["params"]["training.seed"]) for t in each} == {
        (s["id"], seed) for s in scale for seed in (5, 6)
    }


def test_contenders_are_the_union_and_tagged(write_spec):
    spec = write_spec(
        """
[experiment]
name = "tournament"
root = "{root}"
max_parallel = 2

[[stage]]
name = "search"
kind = "fake"
config = "{base}"
override = { "training.steps" = 3 }
reduce = { top_k = 1 }

[[stage.contender]]
name = "small"
override = { "training.seed" = 1 }
space = { "optimizer.lr" = { grid = [1e-3, 1e-2] } }

[[stage.contender]]
name = "large"
override = { "training.seed" = 2, "training.steps" = 5 }
space = { "optimizer.lr" = { grid = [3e-3] } }
"""
    )
    result = api.run(spec, echo=lambda *a, **k: None)
    trials = result.stage("search")["trials"]
    assert sorted((t["contender"], t["params"]["optimizer.lr"]) for t in trials) == [
        ("large", 3e-3),
        ("small", 1e-3),
        ("small", 1e-2),
    ]
    for t in trials:
        config = load_toml(os.path.join(t["dump_folder"], "config.toml"))
        assert (config.training.seed, config.training.steps) == ((1, 3) if t["contender"] == "small" else (2, 5))
        assert t["id"].startswith(t["contender"])
    assert result.best("search")["contender"] == "large"


def test_zip_moves_keys_together(write_spec):
    spec = write_spec(
        """
[experiment]
name = "zip"
root = "{root}"

[[stage]]
name = "z"
kind = "fake"
config = "{base}"
space = { pair = { zip = { "optimizer.lr" = [1e-3, 2e-3, 4e-3], "training.seed" = [7, 8, 9] } }, "training.steps" = { grid = [2, 3] } }
"""
    )
    trials = api.plan(spec)["stages"][0]["trials"]
    assert sorted(
        (t["params"]["optimizer.lr"], t["params"]["training.seed"], t["params"]["training.steps"]) for t in trials
    ) == [(1e-3, 7, 2), (1e-3, 7, 3), (2e-3, 8, 2), (2e-3, 8, 3), (4e-3, 9, 2), (4e-3, 9, 3)]
    assert all(t["status"] == "planned" for t in trials)


RANDOM = """
[experiment]
name = "random"
root = "{root}"
max_parallel = 2

[[stage]]
name = "search"
kind = "fake"
config = "{base}"
space = { "optimizer.lr" = { loguniform = [1e-4, 1e-1] }, "training.seed" = { grid = [0, 1] }, "optimizer.weight_decay" = { uniform = [0.0, 0.2] }, "training.batch_size" = { int = [2, 4] }, "lr_scheduler.decay_type" = { choice = ["linear", "cosine"] } }
search = { kind = "KIND", samples = 5, seed = SEED }
"""


def test_random_search_is_seeded_and_crossed_with_the_grid(write_spec):
    spec = write_spec(RANDOM.replace("KIND", "random").replace("SEED", "0"))
    trials = api.plan(spec)["stages"][0]["trials"]
    assert len(trials) == 5 * 2
    assert [t["id"] for t in api.plan(spec)["stages"][0]["trials"]] == [t["id"] for t in trials]
    lrs = sorted({t["params"]["optimizer.lr"] for t in trials})
    assert len(lrs) == 5 and all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert all(2 <= t["params"]["training.batch_size"] <= 4 for t in trials)
    assert {t["params"]["lr_scheduler.decay_type"] for t in trials} <= {"linear", "cosine"}
    other = api.plan(write_spec(RANDOM.replace("KIND", "random").replace("SEED", "1"), "other.toml"))
    assert {t["params"]["optimizer.lr"] for t in other["stages"][0]["trials"]}.isdisjoint(lrs)


def _interrupt_after(monkeypatch, n: int) -> None:
    """Make the local launcher stop (as on SIGTERM) once ``n`` trials have ended."""
    from flame.experiments.local import LocalLauncher

    original = LocalLauncher.wait
    seen = []

    def wait(self, poll=0.1):
        ended = original(self, poll)
        seen.extend(ended)
        if len(seen) >= n:
            self.stopping = True
        return ended

    monkeypatch.setattr(LocalLauncher, "wait", wait)


def test_tpe_rounds_are_the_same_after_an_interruption(write_spec, monkeypatch, tmp_path):
    text = (
        RANDOM.replace("KIND", "tpe")
        .replace("SEED", "3")
        .replace("samples = 5", "samples = 6, options = { n_startup_trials = 2 }")
    )
    straight = api.run(write_spec(text), echo=lambda *a, **k: None).stage("search")["trials"]
    assert len(straight) == 6 * 2
    records = [json.loads(line) for line in open(tmp_path / "exp" / "records.jsonl")]
    asks = [e for e in records if e["event"] == "ask"]
    assert len(asks) == 6 and all(len(e["asks"]) == 1 for e in asks)  # max_parallel 2 / 2 seeds: 1 ask a round
    assert os.path.exists(tmp_path / "exp" / "search" / "optuna.journal")
    from flame.experiments.driver import Interrupted

    resumed_spec = write_spec(text.replace("{root}", str(tmp_path / "exp2")), "b.toml")
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(Interrupted):
        api.run(resumed_spec, echo=lambda *a, **k: None)
    monkeypatch.undo()
    monkeypatch.setenv("FLAME_STAGE_KINDS", "tests.experiments.fake_kind")
    resumed = api.run(resumed_spec, echo=lambda *a, **k: None).stage("search")["trials"]
    assert [(t["id"], t["metric"]) for t in resumed] == [(t["id"], t["metric"]) for t in straight]
    import optuna

    study = optuna.load_study(
        study_name="search",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "exp" / "search" / "optuna.journal"))
        ),
    )
    assert len(study.trials) == 6
    best_flame = min(t["metric"] for t in straight)
    # the study's best is an ask's mean over its 2 seeds (seed adds 0.01 * seed): 0.005 above the best trial
    assert study.best_value == pytest.approx(best_flame + 0.005)


def test_failed_trials_are_recorded_and_max_failures_stops(write_spec, tmp_path):
    text = GRID.replace("grid = [1e-3, 3e-3]", "grid = [1e-3, 0.9]")
    result = api.run(write_spec(text), echo=lambda *a, **k: None)
    failed = [t for t in result.stage("search")["trials"] if t["status"] == "failed"]
    assert len(failed) == 2 and all(t["exit_code"] == 1 for t in failed)
    records = [json.loads(line) for line in open(tmp_path / "exp" / "records.jsonl")]
    ends = [e for e in records if e["event"] == "end" and e["status"] == "failed"]
    assert len(ends) == 2 and all("training diverged" in e["tail"] for e in ends)
    assert result.best("search")["params"]["optimizer.lr"] == 1e-3  # failed trials never survive
    strict = write_spec(
        text.replace('root = "{root}"', f'root = "{tmp_path}/strict"').replace(
            "reduce =", "max_failures = 0\nreduce ="
        ),
        "s.toml",
    )
    with pytest.raises(ExperimentError, match=r"stage 'search': [12] trials failed, more than max_failures = 0"):
        api.run(strict, echo=lambda *a, **k: None)


def analysis(lrs: list[float], best: float, scale: float = 1.0) -> dict[str, float]:
    """A python stage's function: a 'fit' over the survivors of a search."""
    return {"spread": (max(lrs) - min(lrs)) * scale, "best_metric": best}


def test_python_stage_gets_values_and_linked_inputs(write_spec):
    spec = write_spec(
        GRID.replace("top_k = 1", "top_k = 3")
        + """
[[stage]]
name = "fit"
kind = "python"
function = "tests.experiments.test_rules:analysis"
metric = "spread"
override = { lrs = { link = "search", field = "optimizer.lr", pick = "all" }, best = { link = "search", field = "metric", pick = "best" } }
space = { scale = { grid = [1.0, 10.0] } }
"""
    )
    result = api.run(spec, echo=lambda *a, **k: None)
    fit = sorted(result.stage("fit")["trials"], key=lambda t: t["params"]["scale"])
    assert [t["status"] for t in fit] == ["done", "done"]
    assert [t["metric"] for t in fit] == pytest.approx([2e-3, 2e-2])
    summary = json.load(open(os.path.join(fit[0]["dump_folder"], "summary.json")))
    assert summary["best_metric"] == pytest.approx(result.best("search")["metric"])


def test_removing_a_linked_stage_is_an_error_before_any_work(write_spec, tmp_path):
    from flame.config.errors import ConfigError
    from tests.experiments.conftest import tree

    api.run(write_spec(GRID), echo=lambda *a, **k: None)
    before = tree(tmp_path / "exp")
    without = GRID[GRID.index('[[stage]]\nname = "scale-up"') :]
    with pytest.raises(ConfigError, match=r"\[\[stage\]\] 'scale-up' 'optimizer.lr': link to unknown stage 'search'"):
        api.run(write_spec(GRID[: GRID.index("[[stage]]")] + without, "changed.toml"), echo=lambda *a, **k: None)
    assert tree(tmp_path / "exp") == before
