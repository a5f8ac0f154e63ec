"""Start-up: seconds from launching ``train.sh`` with the demo config to its first logged step, and where they go.

    python benchmarks/startup.py [--quick] [--rounds 3] [--no-append] [--json-out FILE]

Each round runs, in this order, as fresh processes:

1. **train.sh**: ``NGPU=1 bash train.sh --job.config_file configs/demo.toml`` with a temporary dump folder,
   ``--training.steps 2 --metrics.log_freq 1 --validation.steps 1 --checkpoint.enable_checkpoint false``
   (no checkpoint, so no Hugging Face export after the run; the validation batches are still built at
   start-up, as in the demo). The console lines are timestamped as they arrive: ``flame: 1 node(s) ...``
   (train.sh has resolved the config and is starting torchrun), ``model ...: N parameters`` (the Trainer
   is built) and ``step 1/2`` (the first logged step: the headline number);
2. **probe**: the same config through the Python API in one process (``flame.parse_args`` +
   ``flame.trainer.Trainer``; no torchrun), with timers wrapped around the functions ``Trainer``
   calls (distributed init, tokenizer, model build / parallelize / init, data loader, validation
   batches, optimizer, checkpointer, metrics), the first batch and the first step. It also records
   which heavy optional modules (wandb, matplotlib, TensorBoard, pandas, scipy, torch.compile's
   dynamo/inductor, ...) were imported, and from which line of flame, with W&B and TensorBoard off.

Once per run: ``python -X importtime -c "import flame.trainer"``, self times summed per top-level
package. The report gives medians over rounds. ``--quick``: one round, not appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

ROOT = common.ROOT
DEMO_DIR = ROOT / "data" / "demo"
FLAGS = [
    "--job.config_file", "configs/demo.toml", "--training.steps", "2", "--metrics.log_freq", "1",
    "--validation.steps", "1", "--checkpoint.enable_checkpoint", "false",
]  # fmt: skip
# Optional or heavy modules that a plain run of the demo (no W&B, no TensorBoard, no compile) should not import.
WATCH = (
    "wandb", "matplotlib", "tensorboard", "torch.utils.tensorboard", "pandas", "scipy", "sklearn", "PIL",
    "torch._dynamo", "torch._inductor", "triton", "aiohttp", "torchao",
)  # fmt: skip
# Functions that Trainer.__init__ and its builders call, timed in the probe (module, attribute).
TIMED = [
    ("flame.trainer", "init_distributed"), ("flame.trainer", "validate"), ("flame.builders", "load_tokenizer"),
    ("flame.builders", "load_model_config"), ("flame.builders", "build_meta_model"),
    ("flame.builders", "flops_per_token"), ("flame.builders", "parallelize"), ("flame.builders", "init_weights"),
    ("flame.trainer", "build_dataloader"), ("flame.builders", "Validator"), ("flame.builders", "build_optimizers"),
    ("flame.builders", "Checkpointer"), ("flame.builders", "FaultHandler"), ("flame.builders", "MetricsLogger"),
    ("flame.builders", "save_toml"),
]  # fmt: skip
PHASES = {
    "init_distributed": "process group (gloo) init",
    "validate": "config validation",
    "load_tokenizer": "tokenizer load",
    "load_model_config": "model config",
    "build_meta_model": "model build on meta",
    "flops_per_token": "FLOPs count",
    "parallelize": "parallelize (FSDP wrap)",
    "init_weights": "weights: materialize + init",
    "build_dataloader": "data loader (dataset open, tokenizer set-up)",
    "Validator": "validation batches",
    "build_optimizers": "optimizer",
    "Checkpointer": "checkpointer (torchtitan manager)",
    "checkpoint_load": "checkpoint lookup (fresh start)",
    "FaultHandler": "fault handler",
    "MetricsLogger": "metrics logger",
    "save_toml": "config.toml",
}


# ---- the probe (its own process) ------------------------------------------------------------------------


class ImportWatch:
    """A meta-path finder that only records where each watched module is first imported from."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def find_spec(self, name, path=None, target=None):
        if name in WATCH and name not in self.first:
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            ours = [f for f in frames if f.filename.startswith(str(ROOT / "flame"))]
            where = f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else "outside flame"
            self.first[name] = f"{where}, via {short_path(frames[-1].filename)}"
        return None


def short_path(filename: str) -> str:
    """A file name from site-packages as ``package/module.py``; others relative to the repository."""
    if "site-packages" in filename:
        return filename.split("site-packages" + os.sep, 1)[1]
    return os.path.relpath(filename, ROOT)


def probe(out: str) -> int:
    watch = ImportWatch()
    sys.meta_path.insert(0, watch)
    t0 = time.perf_counter()
    import importlib

    import flame
    import flame.trainer
    from flame.components.checkpoint import Checkpointer

    imported = time.perf_counter()
    seconds: dict[str, float] = defaultdict(float)
    active: list[str] = []  # a timed call inside another one counts for the outer one only

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if active:
                return fn(*args, **kwargs)
            active.append(name)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                active.pop()

        return wrapper

    for module, attr in TIMED:
        mod = importlib.import_module(module)
        setattr(mod, attr, timed(attr, getattr(mod, attr)))
    Checkpointer.load = timed("checkpoint_load", Checkpointer.load)  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory() as dump:
        config = flame.parse_args([*FLAGS, "--job.dump_folder", dump])
        parsed = time.perf_counter()
        trainer = flame.trainer.Trainer(config)
        built = time.perf_counter()
        stamps: dict[str, float] = {}
        batches, train_step, log = trainer._batches, trainer.train_step, trainer.metrics.log

        def timed_batches():
            it = batches()
            stamps.setdefault("first_batch_start", time.perf_counter())
            first = next(it)
            stamps.setdefault("first_batch_end", time.perf_counter())
            yield first
            yield from it

        def timed_step(b):
            stamps.setdefault("first_step_start", time.perf_counter())
            result = train_step(b)
            stamps.setdefault("first_step_end", time.perf_counter())
            return result

        def timed_log(record):
            log(record)
            stamps.setdefault("first_log", time.perf_counter())

        trainer._batches, trainer.train_step, trainer.metrics.log = timed_batches, timed_step, timed_log  # type: ignore[method-assign]
        try:
            trainer.train()
        finally:
            trainer.close()
    phases = {"import flame.trainer": imported - t0, "config parsing": parsed - imported}
    phases.update({PHASES[k]: v for k, v in seconds.items()})
    phases["Trainer: everything else"] = built - parsed - sum(seconds.values())
    phases["first batch"] = stamps["first_batch_end"] - stamps["first_batch_start"]
    phases["first step (forward, backward, optimizer)"] = stamps["first_step_end"] - stamps["first_step_start"]
    phases["first log line (loss sync, metrics)"] = stamps["first_log"] - stamps["first_step_end"]
    watched = {name: watch.first.get(name) for name in WATCH if name in sys.modules}
    with open(out, "w") as f:
        json.dump({"phases": phases, "total": stamps["first_log"] - t0, "imported": watched}, f)
    return 0


# ---- the driver -----------------------------------------------------------------------------------------


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1", NGPU="1", PYTHONPATH=str(ROOT))
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e.pop("WANDB_MODE", None)
    return e


def run_train_sh() -> dict[str, float]:
    """Seconds from the launch of train.sh to its marker lines."""
    markers = {
        "torchrun start": re.compile(r"^flame: \d+ node\(s\)"),
        "Trainer built": re.compile(r"INFO flame: model \S+: [\d.]+M parameters"),
        "first logged step": re.compile(r"INFO flame: step\s+1/2"),
    }
    with tempfile.TemporaryDirectory() as dump:
        cmd = ["bash", "train.sh", *FLAGS, "--job.dump_folder", dump]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        seen: dict[str, float] = {}
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            for name, pattern in markers.items():
                if name not in seen and pattern.search(line):
                    seen[name] = time.perf_counter() - start
        code = proc.wait()
        seen["exit"] = time.perf_counter() - start
    if code != 0 or len(seen) != len(markers) + 1:
        sys.stderr.write("".join(lines[-40:]))
        raise SystemExit(f"train.sh failed or a marker line is missing (exit code {code}; seen {sorted(seen)})")
    return seen


def run_probe() -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "probe.json")
        e = dict(env(), OMP_NUM_THREADS=str(os.cpu_count() or 1))  # as train.sh sets it for one CPU process
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--probe", out], cwd=ROOT, env=e, capture_output=True, text=True
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit("probe failed")
        with open(out) as f:
            return json.load(f)


def import_times() -> tuple[float, list[tuple[str, float]]]:
    """``import flame.trainer`` under ``-X importtime``: total seconds, and self seconds per top-level package."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import flame.trainer"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    per: dict[str, float] = defaultdict(float)
    total = 0.0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not m:
            continue
        per[m.group(4).split(".")[0]] += int(m.group(1)) / 1e6
        if m.group(4) == "flame.trainer":
            total = int(m.group(2)) / 1e6
    return total, sorted(per.items(), key=lambda kv: -kv[1])


def report(a: argparse.Namespace, runs: list[dict], probes: list[dict], imports, loads, seconds: float) -> str:
    def med(values) -> float:
        return common.median(list(values))

    first = med(r["first logged step"] for r in runs)
    shell = med(r["torchrun start"] for r in runs)
    built = med(r["Trainer built"] for r in runs)
    rows = [
        ["train.sh: config resolved, free port, CPU check; torchrun starts", f"{shell:.1f}", f"{shell:.1f}"],
        ["torchrun and the worker start; imports; Trainer built", f"{built:.1f}", f"{built - shell:.1f}"],
        ["first step run and logged", f"**{first:.1f}**", f"{first - built:.1f}"],
        ["(process exit after step 2 and validation)", f"{med(r['exit'] for r in runs):.1f}", ""],
    ]
    phases = {n: med(p["phases"][n] for p in probes) for n in probes[0]["phases"]}
    probe_rows = [[n, f"{v:.2f}"] for n, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v >= 0.005]
    small = [n for n, v in phases.items() if v < 0.005]
    if small:
        probe_rows.append([f"under 0.005 s each: {', '.join(small)}", f"{sum(phases[n] for n in small):.2f}"])
    probe_rows.append(["**total, to the first log line**", f"**{med(p['total'] for p in probes):.2f}**"])
    total, per = imports
    top = ", ".join(f"{name} {s:.2f} s" for name, s in per[:8])
    imported = probes[0]["imported"]
    watched = (
        "; ".join(f"`{name}` (first at {where})" for name, where in imported.items()) if imported else "none of them"
    )
    return f"""Command: `{common.command_line()}`

Machine: {common.machine()}. Date: {common.today()}. Load average (`uptime`) before each round:
{"; ".join(loads)}. Run time {seconds / 60:.1f} min.

`NGPU=1 bash train.sh {" ".join(FLAGS)} --job.dump_folder TMP`, {a.rounds} round(s); seconds since the
launch when each console line arrived (medians; per round: {", ".join(f"{r['first logged step']:.1f}" for r in runs)} s
to the first logged step):

{common.table(["milestone", "seconds since launch", "phase"], rows)}

Where the in-process time goes (probe: the same config through the Python API in one process, medians):

{common.table(["phase", "seconds"], probe_rows)}

`python -X importtime -c "import flame.trainer"`: {total:.2f} s; self time by top-level package: {top}.

Heavy optional modules imported by the probe (W&B, TensorBoard and compile off; watched: {", ".join(f"`{w}`" for w in WATCH)}):
{watched}."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round (a smoke run; not appended)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--json-out", default="")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        return probe(a.probe)
    if a.quick:
        a.rounds = 1

    from flame.data.demo import build_demo

    build_demo(str(DEMO_DIR), verbose=False)
    start = time.perf_counter()
    runs, probes, loads = [], [], []
    for r in range(a.rounds):
        loads.append(common.load_average())
        runs.append(run_train_sh())
        probes.append(run_probe())
        print(
            f"round {r + 1}/{a.rounds}: train.sh first logged step at {runs[-1]['first logged step']:.1f} s; "
            f"probe {probes[-1]['total']:.1f} s",
            flush=True,
        )
    imports = import_times()
    text = report(a, runs, probes, imports, loads, time.perf_counter() - start)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"runs": runs, "probes": probes, "imports": imports, "loads": loads}, f, indent=2)
    if not a.quick and not a.no_append:
        common.append_section("Start-up: train.sh to the first logged step (`benchmarks/startup.py`)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
