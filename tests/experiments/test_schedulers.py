"""Trial schedulers (flame/experiments/schedulers) on the fake trainer: the Hyperband table, successive
halving's decisions computed from the fake loss, Hyperband's brackets, ASHA's rule on its recorded
choices, failed and NaN trials never promoted, the budget, bad input, and a killed driver resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from flame.config.errors import ConfigError
from flame.experiments import api
from flame.experiments.schedulers.rules import Settings, asha_choice, hyperband, promote
from flame.experiments.spec import load_spec
from tests.helpers import ROOT

LRS = [1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2, 0.3, 0.6, 1e-4]  # 0.3: NaN validation; 0.6: diverges at step 2

SPEC = """
[experiment]
name = "sched"
root = "{root}"
max_parallel = 2
BUDGET

[[stage]]
name = "search"
kind = "fake"
config = "{base}"
override = { "lr_scheduler.decay_ratio" = 0.2, "lr_scheduler.warmup_steps" = 1, "checkpoint.keep_latest_k" = 1 }
space = SPACE
scheduler = { kind = "KIND", min = 1, max = 9, eta = 3, rung_metric = "METRIC" }
"""


def spec_text(kind: str, metric: str = "stable", lrs=LRS, budget: str = "", space: str | None = None) -> str:
    space = space or '{ "optimizer.lr" = { grid = [' + ", ".join(repr(x) for x in lrs) + "] } }"
    return SPEC.replace("KIND", kind).replace("METRIC", metric).replace("SPACE", space).replace("BUDGET", budget)


def stable(lr: float, step: int, seed: int = 42) -> float:
    """The fake trainer's loss at a rung checkpoint (constant learning rate)."""
    if 0.2 <= lr < 0.5:
        return math.nan
    return 1 + (math.log10(lr) + 2.5) ** 2 + 0.01 * seed + 1 / step


def cooled(lr: float, step: int, seed: int = 42) -> float | None:
    """Its validation loss after a cool-down fork from ``step`` (decay over ceil(0.2 * step) steps)."""
    if lr >= 0.5:
        return None  # diverges at step 2: the fork from step 1 fails
    return stable(lr, step + math.ceil(0.2 * step), seed) - 20 * lr


def by_lr(decision: dict, ids: dict[str, float]) -> tuple[dict, list, list]:
    comp = {ids[t]: m for t, m in decision["competitors"].items()}
    return comp, [ids[t] for t in decision["promoted"]], [ids[t] for t in decision["stopped"]]


def decisions(root) -> list[dict]:
    with open(os.path.join(root, "search", "decisions.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(write_spec, tmp_path, text: str, name: str = "exp"):
    spec = write_spec(text.replace('"{root}"', f'"{tmp_path / name}"'), name=f"{name}.toml")
    result = api.run(spec, echo=lambda *a, **k: None)
    ids = {t["id"]: t["params"]["optimizer.lr"] for t in result.stage("search")["trials"]}
    return spec, result, ids, decisions(tmp_path / name)


def test_the_hyperband_table_is_the_papers(write_spec, tmp_path):
    paper = [
        (4, [(81, 1), (27, 3), (9, 9), (3, 27), (1, 81)]),
        (3, [(34, 3), (11, 9), (3, 27), (1, 81)]),
        (2, [(15, 9), (5, 27), (1, 81)]),
        (1, [(8, 27), (2, 81)]),
        (0, [(5, 81)]),
    ]
    table = [(b.s, [(r.trials, r.resource) for r in b.rungs]) for b in hyperband(Settings("hyperband", "steps", 1, 81))]
    assert table == paper
    text = spec_text("hyperband").replace("max = 9", "max = 81")
    plan = api.plan(write_spec(text))
    sched = plan["stages"][0]["scheduler"]
    assert sched["kind"] == "hyperband"
    assert [(b["s"], [(r["trials"], r["resource"]) for r in b["rungs"]]) for b in sched["brackets"]] == paper
    assert any(
        "hyperband bracket s=3: 34 x 3 steps, 11 x 9 steps, 3 x 27 steps, 1 x 81 steps" in x for x in plan["launch"]
    )


def test_rung_decision_rules():
    results = {"a": 2.0, "b": 1.0, "c": math.nan, "d": None, "e": 3.0, "f": 1.5}
    assert promote(results, 3, "min") == (["b", "f"], ["a", "e", "c", "d"])  # top floor(6/3); NaN, failed last
    assert promote({"a": None, "b": math.nan}, 3, "min") == ([], ["a", "b"])  # never promoted, even the only ones
    assert promote({"a": 2.0, "b": 1.0}, 3, "max") == (["a"], ["b"])  # at least one goes on
    # ASHA: top rung first; a trial already promoted or not finite is passed over; else a new trial (None).
    rungs = [{"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0, "f": 6.0}, {"a": 0.5, "b": 0.7, "c": 0.9}, {}]
    assert asha_choice(rungs, [{"a", "b"}, set(), set()], 3, "min") == (1, "a")
    assert asha_choice(rungs, [{"a", "b"}, {"a"}, set()], 3, "min") is None
    assert asha_choice([{"a": math.nan, "b": 1.0, "c": 2.0}, {}], [set(), set()], 3, "min") == (0, "b")  # NaN last
    assert asha_choice([{"a": math.nan, "b": None, "c": math.nan}, {}], [set(), set()], 3, "min") is None


@pytest.mark.parametrize("metric", ["stable", "cooldown"])
def test_successive_halving_decisions_follow_the_fake_loss(write_spec, tmp_path, metric):
    _, result, ids, lines = run(write_spec, tmp_path, spec_text("sha", metric))
    value = stable if metric == "stable" else cooled
    rung0, rung1, end = lines
    comp, promoted, stopped = by_lr(rung0, ids)
    assert rung0["rung"] == 0 and rung0["resource"] == 1 and len(comp) == 9
    for lr in LRS:
        want = value(lr, 1)
        assert comp[lr] is None if want is None or math.isnan(want) else comp[lr] == pytest.approx(want)
    finite = sorted((m, lr) for lr in LRS if (m := value(lr, 1)) is not None and not math.isnan(m))
    assert promoted == [lr for _, lr in finite[:3]]  # the top floor(9/3)
    assert 0.6 not in promoted and 0.3 not in promoted and stopped[-2:] in ([0.3, 0.6], [0.6, 0.3])
    comp1, promoted1, _ = by_lr(rung1, ids)
    assert sorted(comp1) == sorted(promoted) and rung1["resource"] == 3
    assert promoted1 == [min(promoted, key=lambda lr: value(lr, 3))]
    best = result.best("search")
    assert best["params"]["optimizer.lr"] == promoted1[0] and best["rung"] == 2 and best["step"] == 9
    assert best["metric"] == pytest.approx(stable(promoted1[0], 9) - 20 * promoted1[0])  # its own decay at 9
    # Cost: the trunks' steps (continued, not restarted) plus the cool-down forks.
    forks = (9 * 1 + 3 * 1) if metric == "cooldown" else 0
    assert end == {"end": True, "spent": 9 * 1 + 3 * 2 + 1 * 6 + forks, "unit": "steps"}
    assert rung0.get("cooldown_steps", 0) == (9 if metric == "cooldown" else 0)
    statuses = {t["params"]["optimizer.lr"]: (t["status"], t["rung"]) for t in result.stage("search")["trials"]}
    assert statuses[promoted1[0]] == ("done", 2)
    assert statuses[1e-4] == ("stopped", 0)
    assert statuses[0.6][0] == ("failed" if metric == "cooldown" else "stopped")
    # Rung checkpoints are kept while a trial climbs, released (keep_latest_k = 1) once it stopped or ended.
    for t in result.stage("search")["trials"]:
        steps = sorted(int(p.name[5:]) for p in (tmp_path / "exp" / "search" / t["id"] / "checkpoint").iterdir())
        assert steps == [t["step"]], (t["id"], steps)
    if metric == "cooldown":  # the fork is a run folder of its own, from the rung checkpoint
        fork = tmp_path / "exp" / "search" / "cooldowns" / f"{next(t for t, lr in ids.items() if lr == 1e-4)}-s1"
        assert (fork / "summary.json").exists()


def test_hyperband_brackets_and_asha_rule(write_spec, tmp_path):
    space = '{ "optimizer.lr" = { grid = [1e-3, 3e-3, 1e-2, 3e-2] }, "training.seed" = { grid = [0, 1, 2] } }'
    _, result, _, lines = run(write_spec, tmp_path, spec_text("hyperband", space=space), "hb")
    plan = [(d["bracket"], d["rung"], len(d["competitors"]), len(d["promoted"])) for d in lines if "rung" in d]
    assert sorted(plan) == [(1, 0, 3, 1), (2, 0, 9, 3), (2, 1, 3, 1)]  # 12 configurations: 9 in s=2, 3 in s=1
    assert lines[-1]["spent"] == 9 * 1 + 3 * 2 + 6 + 3 * 3 + 6
    tops = [t for t in result.stage("search")["trials"] if t["status"] == "done"]
    assert len(tops) == 2 and all(t["rung"] == t["bracket"] for t in tops)  # one per bracket at 9 steps
    text = spec_text("asha", space=space).replace("max_parallel = 2", "max_parallel = 1")
    _, result, _, lines = run(write_spec, tmp_path, text, "asha")
    claims_dir = tmp_path / "asha" / "search" / "claims"
    actions = [json.load(open(claims_dir / n))["action"] for n in sorted(os.listdir(claims_dir))]
    assert sum(a[0] == "start" for a in actions) == 12
    promos = [d for d in lines if d.get("promoted")]
    assert len(promos) == sum(a[0] == "promote" for a in actions) >= 2
    for d in promos:  # each promotion: the best not yet promoted within the top floor(n/3) of its rung then
        ranked = sorted(d["competitors"], key=lambda t: d["competitors"][t])
        assert d["promoted"][0] in ranked[: len(ranked) // 3]
    assert result.best("search")["rung"] == 2
    # Run again: the claims are replayed, nothing new is started or decided.
    again = api.run(
        write_spec(text.replace('"{root}"', f'"{tmp_path / "asha"}"'), name="asha.toml"), echo=lambda *a, **k: None
    )
    assert len(os.listdir(claims_dir)) == len(actions) and decisions(tmp_path / "asha") == lines
    assert again.stage("search")["best"] == result.stage("search")["best"]


def test_budget_stops_new_work(write_spec, tmp_path):
    _, result, _, lines = run(write_spec, tmp_path, spec_text("sha", budget="budget = 12"))
    end = lines[-1]
    assert end["budget_hit"] is True and 12 <= end["spent"] < 12 + 6
    assert end["spent"] == 9 + 2 * 2  # rung 0, then two of the three promotions: 13 >= 12 starts nothing more
    (rung0,) = [d for d in lines if "rung" in d]
    best = result.best("search")
    assert best["id"] in rung0["promoted"] and best["step"] == 3
    assert sum(t["step"] == 3 for t in result.stage("search")["trials"]) == 2
    report = (tmp_path / "exp" / "report" / "report.md").read_text()
    assert "the experiment budget of 12 steps was spent (13): no new work was started after that" in report


BAD = [
    ("min = 1, max = 9", "min = 9, max = 9", "min 9 must be below max 9"),
    ("eta = 3", "eta = 1", "eta must be an integer >= 2"),
    ('kind = "sha"', 'kind = "bohb"', "unknown scheduler kind 'bohb' (registered kinds: asha, hyperband, sha)"),
    ("eta = 3", 'eta = 3, resource = "tokens"', "is below one step's"),
    ('rung_metric = "stable"', 'rung_metric = "stable", grace = 1', "unknown key 'grace'"),
    ('"lr_scheduler.decay_ratio" = 0.2', '"lr_scheduler.decay_ratio" = 0.9', "set lr_scheduler.decay_ratio <= 0.667"),
    ('"lr_scheduler.warmup_steps" = 1', '"lr_scheduler.warmup_steps" = 2', "set lr_scheduler.warmup_steps <= 1"),
    ('rung_metric = "stable"', 'rung_metric = "cooldown"', "validation.enable = true"),
]


@pytest.mark.parametrize("old,new,message", BAD)
def test_bad_scheduler_input(write_spec, tmp_path, old, new, message):
    text = spec_text("sha").replace(old, new)
    if "tokens" in new:
        text = text.replace("min = 1, max = 9", "min = 10, max = 100000")
    if "cooldown" in new:
        text = text.replace("override = {", 'override = { "validation.enable" = false,')
    spec = write_spec(text)
    with pytest.raises(ConfigError) as e:
        api.plan(spec)
    assert message in e.value.format() and "[[stage]] 'search' scheduler" in e.value.format()
    assert not (tmp_path / "exp").exists()


def test_a_scheduler_needs_a_space_and_exit_code_2(write_spec, tmp_path):
    text = (
        spec_text("sha")
        .replace('space = { "optimizer.lr"', 'override_ = { "optimizer.lr"')
        .replace("override_ = ", "# ")
    )
    with pytest.raises(ConfigError, match="a scheduler needs a stage with a space"):
        load_spec(write_spec(text))
    spec = write_spec(spec_text("sha").replace("eta = 3", "eta = 0"))
    proc = subprocess.run([sys.executable, "-m", "flame.experiment", "run", str(spec)], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "eta must be an integer >= 2" in proc.stderr and str(spec) in proc.stderr


def test_kill_the_driver_mid_rung_and_resume(write_spec, tmp_path):
    """SIGKILL the driver while rung 1 trains; run again: it ends with the uninterrupted run's decisions
    and no trunk trained any step twice (each segment resumed from its checkpoint)."""
    spec = write_spec(spec_text("sha").replace('"{root}"', f'"{tmp_path / "k"}"'), name="k.toml")
    env = dict(os.environ, FAKE_STEP_SECONDS="0.3", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "flame.experiment", "run", str(spec)]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = tmp_path / "k" / "search" / "decisions.jsonl"
    deadline = time.monotonic() + 120
    while not (path.exists() and path.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # rung 1 segments are training now
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1.0)
    assert len(path.read_text().splitlines()) == 1
    env["FAKE_STEP_SECONDS"] = "0"
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == 0
    _, _, ids, reference = run(write_spec, tmp_path, spec_text("sha"), "straight")
    got = decisions(tmp_path / "k")
    assert [by_lr(d, ids) if "rung" in d else d for d in got] == [
        by_lr(d, ids) if "rung" in d else d for d in reference
    ]
    for folder in (tmp_path / "k" / "search").iterdir():
        log = folder / "train.log"
        if log.exists():
            assert log.read_text().count("fresh start") == 1, folder  # never retrained from scratch


def test_tpe_asks_are_told_the_rung_metrics(write_spec, tmp_path):
    """Hyperband with TPE: the second bracket is asked after the first ended, told each trial's metric at
    the highest rung it reached (recomputed here from the decisions), and recorded before it runs."""
    from flame.experiments.search import ask_round
    from flame.experiments.spec import Search
    from flame.experiments.values import Dist

    space = '{ "optimizer.lr" = { loguniform = [1e-4, 1e-1] } }'
    text = spec_text("hyperband", space=space).replace(
        "scheduler = {", 'search = { kind = "tpe", samples = 12, seed = 3 }\nscheduler = {'
    )
    _, result, _, lines = run(write_spec, tmp_path, text)
    with open(tmp_path / "exp" / "records.jsonl") as f:
        asks = [e for e in map(json.loads, f) if e["event"] == "ask"]
    assert [(e["round"], len(e["asks"])) for e in asks] == [(0, 9), (9, 3)]  # round: the points asked before
    by_lr = {t["params"]["optimizer.lr"]: t["id"] for t in result.stage("search")["trials"]}
    reached: dict[str, float] = {}
    for d in lines:
        for t, m in d.get("competitors", {}).items():
            reached[t] = m  # decisions come rung by rung: the last one seen is the highest rung's
    tops = {t["id"]: t["metric"] for t in result.stage("search")["trials"] if t["rung"] == 2}
    history = [(a, tops.get(by_lr[a["optimizer.lr"]], reached.get(by_lr[a["optimizer.lr"]]))) for a in asks[0]["asks"]]
    group = asks[1]["group"]
    want = ask_round(
        Search("tpe", 12, 3), {"optimizer.lr": Dist("loguniform", (1e-4, 1e-1))}, group, 9, history, 3, "min"
    )
    assert asks[1]["asks"] == want
