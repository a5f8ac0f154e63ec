"""Scaling on CPU: tokens/s per process of the demo config with NGPU=1 and NGPU=2 (FSDP2 over gloo).

    python benchmarks/scaling_cpu.py [--quick] [--rounds 2] [--steps 20] [--log-freq 5]
        [--no-append] [--json-out FILE]

Each run is ``NGPU=N bash train.sh --job.config_file configs/demo.toml`` (flame's real launcher: torchrun,
one process per rank) with a temporary dump folder, ``--training.steps``, ``--metrics.log_freq``, validation
and checkpoints off, in three set-ups, alternated for ``--rounds`` rounds:

* ``NGPU=1``: one process with train.sh's thread count on a CPU-only machine (``OMP_NUM_THREADS`` = cores / N:
  2 threads here);
* ``NGPU=1, 1 thread``: the same with ``OMP_NUM_THREADS=1``;
* ``NGPU=2``: FSDP2 over gloo, 2 processes of 1 thread each (train.sh's choice).

Each run's tokens/s per process is read from its ``metrics.jsonl`` (``tokens_per_second``: rank 0's tokens
over the wall time of the logging window, data wait included): the median of the windows after the first
(start-up, first-step warm-up); the report gives the median over rounds.

The batch is per rank (8 x 256 tokens), so NGPU=2 trains twice the tokens per step. Ratios, per process,
NGPU=2 over: ``NGPU=1`` (what a user gets from train.sh; 0.5 when two 1-thread ranks do exactly as well as
one 2-thread rank, the cores being the limit) and ``NGPU=1, 1 thread`` (the same threads per process: 1.0
when the second rank costs nothing; below is what FSDP2's all-gathers and reduce-scatters over gloo and
the shared cores cost at this size, 3.9M parameters). On a machine shared with other jobs, a process with
2 OpenMP threads suffers most (a thread descheduled by another job stalls the other one at every
parallel region): read the ratios next to the load averages.

``--quick``: 1 round of 10 steps (log every 5), not appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

ROOT = common.ROOT
DEMO_DIR = ROOT / "data" / "demo"


# name -> (NGPU, OMP_NUM_THREADS or None for train.sh's default)
SETUPS = {"NGPU=1": (1, None), "NGPU=1, 1 thread": (1, 1), "NGPU=2": (2, None)}


def run(setup: str, a: argparse.Namespace) -> dict:
    ngpu, threads = SETUPS[setup]
    with tempfile.TemporaryDirectory() as dump:
        cmd = [
            "bash", "train.sh", "--job.config_file", "configs/demo.toml", "--job.dump_folder", dump,
            "--training.steps", str(a.steps), "--metrics.log_freq", str(a.log_freq),
            "--validation.enable", "false", "--checkpoint.enable_checkpoint", "false",
        ]  # fmt: skip
        env = dict(os.environ, NGPU=str(ngpu), NO_COLOR="1", PYTHONPATH=str(ROOT))
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("OMP_NUM_THREADS", None)  # train.sh shares the cores among the ranks
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{setup} run failed (exit code {proc.returncode})")
        with open(os.path.join(dump, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    steady = records[1:] or records
    return {
        "setup": setup,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "windows": [round(r["tokens_per_second"], 1) for r in records],
        "data_wait_share": statistics.mean(r["data_wait_share"] for r in steady),
        "rss_gib": max(r.get("memory_rss_gib", 0.0) for r in records),
        "final_loss": records[-1]["loss"],
        "seconds": seconds,
    }


def report(a: argparse.Namespace, runs: dict[str, list[dict]], loads: list[str], seconds: float) -> str:
    med = {k: common.median([r["tokens_per_second"] for r in runs[k]]) for k in SETUPS}
    cores = os.cpu_count() or 1

    def threads(k: str) -> int:
        ngpu, n = SETUPS[k]
        return n or max(cores // ngpu, 1)

    rows = [
        [
            f"{k} ({SETUPS[k][0]} process{'es' if SETUPS[k][0] > 1 else ''} x {threads(k)} thread{'s' if threads(k) > 1 else ''})",
            f"{med[k]:,.0f}",
            f"{SETUPS[k][0] * med[k]:,.0f}",
            " ".join(f"{r['tokens_per_second']:,.0f}" for r in runs[k]),
            f"{100 * common.median([r['data_wait_share'] for r in runs[k]]):.1f} %",
            f"{max(r['rss_gib'] for r in runs[k]):.2f}",
        ]
        for k in SETUPS
    ]
    two = med["NGPU=2"]
    per_round = "; ".join(
        f"{c['tokens_per_second'] / a_['tokens_per_second']:.2f} / {c['tokens_per_second'] / b['tokens_per_second']:.2f}"
        for a_, b, c in zip(runs["NGPU=1"], runs["NGPU=1, 1 thread"], runs["NGPU=2"], strict=True)
    )
    return f"""Command: `{common.command_line()}`

Machine: {common.machine()}. Date: {common.today()}. Load average (`uptime`) before each round:
{"; ".join(loads)}. Run time {seconds / 60:.1f} min.

Setup: `NGPU=N bash train.sh --job.config_file configs/demo.toml --training.steps {a.steps} --metrics.log_freq {a.log_freq}
--validation.enable false --checkpoint.enable_checkpoint false` (3.9M-parameter Llama, float32, batch 8 x 256
tokens per rank, FSDP2 over gloo for NGPU=2), {a.rounds} round(s) of the three set-ups in turn; tokens/s per
process from `metrics.jsonl`, median of the windows after the first, median over rounds.

{common.table(["run", "tokens/s per process", "tokens/s, all processes", "per round", "data wait", "RSS GiB (rank 0)"], rows)}

| ratio of tokens/s per process | value | ideal |
| --- | ---: | --- |
| NGPU=2 / NGPU=1 (train.sh's threads: 1 vs 2) | **{two / med["NGPU=1"]:.3f}** | 0.5: the 2 cores shared without loss |
| NGPU=2 / NGPU=1 with 1 thread (same threads per process) | **{two / med["NGPU=1, 1 thread"]:.3f}** | 1.0: the second rank costs nothing |

Per round (same order): {per_round}."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 10 steps (a smoke run; not appended)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-freq", type=int, default=5)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--json-out", default="")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.steps = 1, 10
    if a.steps < 2 * a.log_freq:
        p.error("--steps must cover at least two logging windows (2 x --log-freq)")

    from flame.data.demo import build_demo

    build_demo(str(DEMO_DIR), verbose=False)
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {k: [] for k in SETUPS}
    loads = []
    for r in range(a.rounds):
        loads.append(common.load_average())
        for k in SETUPS:
            result = run(k, a)
            runs[k].append(result)
            print(
                f"round {r + 1}/{a.rounds} {k}: {result['tokens_per_second']:,.0f} tokens/s per process "
                f"(windows {result['windows']}, loss {result['final_loss']:.3f}, {result['seconds']:.0f} s)",
                flush=True,
            )
    text = report(a, runs, loads, time.perf_counter() - start)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"runs": runs, "loads": loads}, f, indent=2)
    if not a.quick and not a.no_append:
        common.append_section("Scaling on CPU: NGPU=1 against NGPU=2 with FSDP2 (`benchmarks/scaling_cpu.py`)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
