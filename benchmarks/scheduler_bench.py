"""Full grid vs successive halving vs Hyperband vs ASHA on the space of configs/experiments/hyperband_demo.toml.

Every configuration of the stage's space is trained to the maximum resource once as a *trunk* (its
warmup-stable-decay schedule laid out for the maximum, validation at every rung step, rung checkpoints
kept), and cool-down forks (``cooldown_ratio`` of the rung's steps, the run's own decay, then validation)
are real runs from those rung checkpoints. The schedulers are then run by their own rules
(``flame.experiments.schedulers.ladder``, the code the driver uses) on these recorded runs: promotion by
continuation is exact (a trunk paused at a rung and continued equals the straight run,
tests/checkpoint/test_fork.py, 1e-6), so the metric a scheduler sees at a rung is the grid run's at that
step, and every cool-down metric it asks for is a fork run (forks are run on demand until none is
missing). ASHA runs with ``max_parallel`` simulated workers (each piece takes its steps plus a start-up
of ``--startup-steps``). Reported for each: total steps trained (cool-downs included) / the grid's, the
picked configuration's full-budget metric and its rank in the grid; the Spearman correlation of the
first rung's metric (cooldown and stable) with the full-budget one; the best configuration's spread
over two seeds (the noise).

    .venv/bin/python benchmarks/scheduler_bench.py [--spec configs/experiments/hyperband_demo.toml]
        [--out outputs/scheduler_bench] [--parallel 2] [--no-write]

Runs already in ``--out`` are reused (a rerun continues). Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import append_section, command_line, load_average, machine, table, today

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_all(runs: list, parallel: int) -> None:
    """Train each (trial) not finished yet: ``bash train.sh`` per run folder, ``parallel`` at a time."""
    from flame.config.loader import save_toml

    todo = [t for t in runs if not os.path.exists(os.path.join(t.folder, "summary.json"))]
    running: list[subprocess.Popen] = []
    port = 29600
    while todo or running:
        while todo and len(running) < parallel:
            t = todo.pop(0)
            os.makedirs(t.folder, exist_ok=True)
            save_toml(t.config, os.path.join(t.folder, "config.toml"))
            log = open(os.path.join(t.folder, "train.log"), "ab")
            # The trainer as one process (what train.sh runs under torchrun), without train.sh's Hugging Face
            # export at the end: the benchmark reads metrics and checkpoints only.
            port += 1
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                       LOCAL_WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))  # fmt: skip
            cmd = [sys.executable, "-m", "flame.train", "--job.config_file", os.path.join(t.folder, "config.toml")]
            running.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        time.sleep(0.5)
        running = [p for p in running if p.poll() is None]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (scipy's, ties averaged)."""
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def simulate(settings, mode, pool, oracle, rung_steps_of, workers: int, startup: float):
    """Run a Ladder on recorded metrics with ``workers`` simulated workers; (ladder, picked trial id)."""
    from flame.components.fork import cooldown_steps
    from flame.experiments.schedulers.ladder import Ladder

    it = iter(pool)

    def take(n: int) -> list[str]:
        out = []
        for _ in range(n):
            nxt = next(it, None)
            if nxt is not None:
                out.append(nxt)
        return out

    holder: dict = {}
    ladder = Ladder(
        settings,
        mode,
        len(pool),
        take,
        lambda b, k: rung_steps_of(holder["l"], b, k),
        lambda s: cooldown_steps(s, settings.cooldown_ratio),
    )
    holder["l"] = ladder
    clock, seq, running = 0.0, 0, []
    while True:
        free = workers - len(running)
        for w in ladder.ready(free if settings.kind == "asha" else None):
            seq += 1
            running.append((clock + ladder.cost(w) + startup, seq, w))
        if not running:
            break
        running.sort(key=lambda x: (x[0], x[1]))
        clock, _, w = running.pop(0)
        metric = oracle(w, rung_steps_of(ladder, w.bracket, w.rung))
        ladder.finished(w, metric is not None and math.isfinite(metric), metric)
    picked = ladder.final()[0][0] if ladder.final() else None
    return ladder, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=os.path.join(ROOT, "configs", "experiments", "hyperband_demo.toml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "scheduler_bench"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--startup-steps", type=float, default=20.0, help="simulated start-up of a piece (ASHA)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.time()
    from flame.config.loader import apply_overrides
    from flame.experiments.plan import StageExpansion
    from flame.experiments.schedulers import trunks
    from flame.experiments.schedulers.rules import check_table
    from flame.experiments.search import derived_seed
    from flame.experiments.spec import resolve

    exp = resolve(args.spec)
    stage = next(s for s in exp.stages if s.scheduler)
    metric, mode = exp.metric_of(stage)
    base = check_table(stage.scheduler, "scheduler", lambda w, m: sys.exit(f"{w}: {m}"))
    assert base is not None
    expansion = StageExpansion(exp, stage, {})
    trials = [t for g in expansion.groups for t in expansion.trials(g, 0, [{}])]
    sha = dataclasses.replace(base, kind="sha")
    from flame.experiments.schedulers.rules import brackets

    rungs = [int(r.resource) for r in brackets(sha, len(trials))[0].rungs]
    top = rungs[-1]

    def at(trial, folder, steps, **values):
        t = trunks.trunk(trial, steps, top, rungs)
        cfg = apply_overrides(t.config, {"job.dump_folder": folder, "validation.freq": rungs[0], **values})
        return dataclasses.replace(t, config=cfg, folder=folder)

    grid = {t.id: at(t, os.path.join(args.out, "grid", t.id), top) for t in trials}
    print(f"grid: {len(grid)} configurations x {top} steps (rungs {rungs}); forks at rungs {rungs[:-1]}", flush=True)
    run_all(list(grid.values()), args.parallel)
    first = {tid: trunks.cooldown(at(t, t.folder, rungs[0]), base.cooldown_ratio) for tid, t in grid.items()}
    run_all(list(first.values()), args.parallel)

    def stable_at(tid: str, steps: int) -> float | None:
        return trunks.metric_at(grid[tid].folder, metric, steps)

    def cooled(tid: str, steps: int) -> tuple[float | None, object]:
        fork = trunks.cooldown(at(grid[tid], grid[tid].folder, steps), base.cooldown_ratio)
        return trunks.metric_at(fork.folder, metric, fork.steps), fork

    final = {tid: stable_at(tid, top) for tid in grid}
    order = sorted((m, tid) for tid, m in final.items() if m is not None and math.isfinite(m))
    rank = {tid: i + 1 for i, (_, tid) in enumerate(order)}
    grid_best = order[0][1]
    # The schedulers on the recorded runs; cool-down forks they ask for are run until none is missing.
    seed = derived_seed(stage.search.seed if stage.search else 0, stage.name, "scheduler")
    import random

    shuffled = [t.id for t in trials]
    random.Random(seed).shuffle(shuffled)
    results = {}
    while True:
        missing = {}
        for kind in ("sha", "hyperband", "asha"):
            for rm in ("cooldown", "stable"):
                settings = dataclasses.replace(base, kind=kind, rung_metric=rm)

                def oracle(w, steps, missing=missing):
                    if w.cooldown:
                        value, fork = cooled(w.trial, steps)
                        if value is None and not os.path.exists(os.path.join(fork.folder, "summary.json")):
                            missing[fork.folder] = fork
                            return stable_at(w.trial, steps)
                        return value
                    return stable_at(w.trial, steps)

                def steps_of(ladder, b, k):
                    return round(ladder.brackets[b].rungs[k].resource) if k >= 0 else 0

                pool = [t.id for t in trials] if kind == "sha" else shuffled
                results[(kind, rm)] = simulate(
                    settings, mode, pool, oracle, steps_of, exp.max_parallel, args.startup_steps
                )
        if not missing:
            break
        print(f"running {len(missing)} more cool-down forks", flush=True)
        run_all(list(missing.values()), args.parallel)
    # The noise: the grid's best configuration with another seed.
    best_trial = grid[grid_best]
    other = at(
        best_trial,
        os.path.join(args.out, "seed", grid_best),
        top,
        **{"training.seed": best_trial.config.training.seed + 1},
    )
    run_all([other], args.parallel)
    noise = abs((trunks.metric_at(other.folder, metric, top) or math.nan) - final[grid_best])
    grid_steps = len(grid) * top
    rows = [["full grid", f"{grid_steps}", "1.000", f"{final[grid_best]:.4f}", "1", "-"]]
    for (kind, rm), (ladder, picked) in results.items():
        gap = final[picked] - final[grid_best]
        rows.append([f"{kind} ({rm})", f"{ladder.spent:.0f}", f"{ladder.spent / grid_steps:.3f}", f"{final[picked]:.4f}",
                     f"{rank.get(picked, '-')}", f"{gap:+.4f}"])  # fmt: skip
    ids = sorted(tid for tid in grid if final[tid] is not None and math.isfinite(final[tid]))
    rho_stable = spearman([stable_at(t, rungs[0]) for t in ids], [final[t] for t in ids])  # type: ignore[misc]
    rho_cool = spearman([cooled(t, rungs[0])[0] for t in ids], [final[t] for t in ids])  # type: ignore[misc]
    minutes = (time.time() - started) / 60
    body = "\n".join(
        [
            "Command (from the repository root; the demo corpus `data/demo` is built first with `python -m flame.data.demo`):",
            "",
            "```bash",
            command_line(),
            "```",
            "",
            f"Machine: {machine()}; load average {load_average()}. Date: {today()}. Run time {minutes:.1f} min.",
            "",
            f"Space: `{os.path.relpath(args.spec, ROOT)}`, {len(grid)} configurations, rungs {rungs} steps, eta {base.eta},",
            f"cool-downs over {base.cooldown_ratio:g} of a rung's steps; metric {metric} ({mode}). ASHA with {exp.max_parallel} workers.",
            "",
            table(["scheduler (rung metric)", "steps", "of grid", f"picked {metric}", "rank in grid", "vs grid best"], rows, {1, 2, 3, 4, 5}),
            "",
            f"Spearman of the rung-1 ({rungs[0]} steps) metric with the full-budget one across the grid: "
            f"cooldown **{rho_cool:.3f}**, stable **{rho_stable:.3f}**.",
            f"Noise: the grid's best configuration over two seeds differs by **{noise:.4f}** in {metric}.",
        ]
    )  # fmt: skip
    print(body)
    if not args.no_write:
        append_section("Trial schedulers: grid vs SHA vs Hyperband vs ASHA (`benchmarks/scheduler_bench.py`)", body)


if __name__ == "__main__":
    main()
