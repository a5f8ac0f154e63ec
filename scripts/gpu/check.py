"""The GPU check: on the lent GPU machine, every ``gpu``-marked test, ``benchmarks/distill_bench.py`` and
``benchmarks/gpu_mfu.py``, one results file.

    python3 scripts/gpu/check.py [--budget 480] [--out DIR]     # on the device machine (one H100/H200)
    .venv/bin/python scripts/gpu/check.py --dry                 # here, on CPU: every step but the CUDA work

Steps, each a phase with its own time limit inside ``--budget`` seconds (default 480: the check must end
within 8 minutes), each recorded in ``<out>/gpu_check.json`` as soon as it ends (``--out``, default ``$OUT``,
the device tool's folder that comes back, else ``outputs/gpu_check``):

1. ``install``: the wheels from ``make gpu-wheels`` (``.whl/``) with the device README's flags,
   ``pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target <site>``, and a
   ``.pth`` file in the interpreter's site-packages naming ``<site>``, so that every Python process there
   (torchrun's workers, the tests' subprocesses, which set their own PYTHONPATH) sees them;
2. ``environment``: torch, CUDA and the GPU, the versions of flame's dependencies, and an import of flame's
   trainer, torchtitan, fla, datasets, torchdata, tomli_w and torchao;
3. ``gpu-tests``: ``pytest -m gpu`` with a per-test timeout, each outcome written as it comes
   (``scripts/gpu/pytest_results.py``);
4. ``distill``: ``benchmarks/distill_bench.py --device cuda --quick`` without its cache part: the distilled
   step against the student's plus a teacher forward (eager and compiled, bf16), the KD term's cost and its
   peak memory by chunk size (it builds the demo corpus first: the device gets no ``data/``);
5. ``gpu-mfu``: ``benchmarks/gpu_mfu.py`` on Llama 340M and GLA 340M, base and compiled, 12 steps (what fits
   the rest of the budget; runs that finish before the limit are kept).

``--dry`` runs the same phases on a machine without a GPU: the install goes into a temporary folder with
pip's cross-platform flags (``--python-version 3.12 --platform manylinux...``, the device's interpreter),
no ``.pth`` is written, ``scripts/gpu/wheels.py --check`` checks the set, the gpu tests must all be
collected and skip with a reason, and ``distill_bench.py`` and ``gpu_mfu.py`` must refuse with their no-CUDA
message. Exit code 0
when every phase did what it should, else 1. Only the standard library is used here: on the device
machine nothing else is installed before step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PIP_INSTALL = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade"]
TEST_TIMEOUT = 150  # seconds per gpu test (pytest-timeout)
TESTS_SHARE = 230  # at most this much of the budget for the tests ...
DISTILL_SHARE = 90  # ... at most this much for distill_bench (the demo corpus, then two compiled trainers) ...
MFU_SHARE = 150  # ... and at least this much is left for gpu_mfu (its tokenizer build and compiled runs)
DISTILL_ARGS = ["--device", "cuda", "--quick", "--parts", "steps,kd_term,memory", "--no-append"]
MFU_ARGS = ["--models", "llama_340m,gla_340m", "--variants", "base,compile", "--steps", "12", "--log-freq", "3"]
IMPORTS = "flame.trainer", "torchtitan", "fla", "datasets", "torchdata", "tomli_w", "torchao"
DISTRIBUTIONS = "torch", "transformers", "triton", "torchtitan", "flash-linear-attention", "datasets", "torchdata"
DISTRIBUTIONS += "tomli_w", "torchao", "tokenizers", "safetensors"
ENVIRONMENT = f"""
import importlib, importlib.metadata as md, json, platform, torch
info = {{"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
        "versions": {{}}, "import_errors": {{}}}}
for name in {DISTRIBUTIONS!r}:
    try:
        info["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        info["versions"][name] = None
for module in {IMPORTS!r}:
    try:
        importlib.import_module(module)
    except Exception as e:
        info["import_errors"][module] = f"{{type(e).__name__}}: {{e}}"
print("ENVIRONMENT " + json.dumps(info))
"""


class Check:
    """The phases, their time limits inside one budget, and the results file rewritten after each phase."""

    def __init__(self, out: Path, budget: float, dry: bool) -> None:
        self.start = time.monotonic()
        self.budget = budget
        self.path = out / "gpu_check.json"
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"mode": "dry" if dry else "device", "budget_seconds": budget, "phases": {}}
        self.results["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.env.update(WANDB_MODE="offline", NO_COLOR="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def phase(self, name: str, cmd: list[str], limit: float, **extra_env: str) -> dict:
        """Run ``cmd`` in its own process group for at most ``limit`` seconds; record and return the outcome."""
        limit = max(1.0, min(limit, self.left()))
        env = dict(self.env, **extra_env)
        with tempfile.TemporaryFile(mode="w+") as log:
            began = time.monotonic()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc: int | None = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the phase's own process group: its torchrun workers too
                proc.wait()
                rc, timed_out = None, True
            log.seek(0)
            output = log.read()
        record = {
            "cmd": cmd,
            "rc": rc,
            "seconds": round(time.monotonic() - began, 1),
            "limit_seconds": round(limit, 1),
            "timed_out": timed_out,
            "output_tail": output[-4000:],
        }
        self.results["phases"][name] = record
        status = "timed out" if timed_out else f"exit {rc}"
        print(
            f"gpu_check: {name}: {status} after {record['seconds']} s (limit {record['limit_seconds']} s)", flush=True
        )
        self.save()
        record["output"] = output
        return record

    def save(self) -> None:
        self.results["seconds"] = round(time.monotonic() - self.start, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(self.path)


def install(check: Check, wheels: Path, dry: bool) -> str | None:
    """Install the wheels; return the folder to add to the path (None in a dry run or on failure)."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        check.results["phases"]["install"] = {"rc": None, "error": f"no wheels in {wheels}: run `make gpu-wheels`"}
        check.save()
        return None
    target = tempfile.mkdtemp(prefix="gpu_site_")
    cmd = [sys.executable, *PIP_INSTALL, "--target", target]
    if dry:  # pip checks every wheel against the device's interpreter and platform instead of this one
        sys.path.insert(0, str(HERE))
        from wheels import PIP_TARGET

        cmd += PIP_TARGET
    record = check.phase("install", [*cmd, *files], 120)
    installed = sorted(p.name for p in Path(target).iterdir() if p.name.endswith(".dist-info"))
    check.results["phases"]["install"].update(target=target, wheels=len(files), dist_infos=len(installed))
    if record["rc"] != 0 or dry:
        check.save()
        return None
    for folder in site.getsitepackages():
        try:
            Path(folder, "flame-gpu-wheels.pth").write_text(target + "\n")
        except OSError:
            continue
        check.results["phases"]["install"]["pth"] = str(Path(folder, "flame-gpu-wheels.pth"))
        break
    check.save()
    return target


def run_tests(check: Check, limit: float, site_dir: str | None) -> None:
    results = Path(tempfile.mkdtemp()) / "tests.jsonl"
    results.touch()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "pytest_results",
        "--timeout",
        str(TEST_TIMEOUT),
    ]
    path = os.pathsep.join([*([site_dir] if site_dir else []), str(HERE), str(ROOT)])
    check.phase("gpu-tests", cmd, limit, PYTHONPATH=path, GPU_CHECK_RESULTS=str(results))
    tests = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    check.results.update(tests=tests, test_counts=counts)
    check.save()


def run_mfu(check: Check, limit: float, site_dir: str | None) -> None:
    json_out = Path(tempfile.mkdtemp()) / "gpu_mfu.json"
    cmd = [sys.executable, "benchmarks/gpu_mfu.py", *MFU_ARGS, "--no-append", "--json-out", str(json_out)]
    path = os.pathsep.join([*([site_dir] if site_dir else []), str(ROOT)])
    record = check.phase("gpu-mfu", cmd, limit, PYTHONPATH=path)
    runs = []  # one JSON line per finished run, also when the phase ran out of time
    for line in record["output"].splitlines():
        if line.startswith("{") and '"model"' in line:
            runs.append(json.loads(line))
    check.results["gpu_mfu"] = runs
    check.save()


def run_distill(check: Check, limit: float, site_dir: str | None) -> None:
    json_out = Path(tempfile.mkdtemp()) / "distill_bench.json"
    cmd = [sys.executable, "benchmarks/distill_bench.py", *DISTILL_ARGS, "--json-out", str(json_out)]
    path = os.pathsep.join([*([site_dir] if site_dir else []), str(ROOT)])
    check.phase("distill", cmd, limit, PYTHONPATH=path)
    check.results["distill"] = json.loads(json_out.read_text()) if json_out.exists() else None
    check.save()


def verdict(results: dict) -> list[str]:
    """What went wrong, for the mode the check ran in (empty: all as it should be)."""
    phases, problems = results["phases"], []
    install = phases.get("install", {})
    if install.get("rc") != 0:
        problems.append(f"install: {install.get('error') or 'pip failed'}")
    env = phases.get("environment", {}).get("info", {})
    if env.get("import_errors"):
        problems.append(f"environment: imports failed: {env['import_errors']}")
    if "wheel-check" in phases and phases["wheel-check"]["rc"] != 0:
        problems.append("wheel-check: the wheel set is incomplete (see its output)")
    tests, counts = results.get("tests", []), results.get("test_counts", {})
    if phases.get("gpu-tests", {}).get("timed_out"):
        problems.append("gpu-tests: ran out of time")
    if not tests:
        problems.append("gpu-tests: no gpu test reported an outcome")
    bad = [t["test"] for t in tests if t["outcome"] in ("failed", "error")]
    if bad:
        problems.append(f"gpu-tests: {len(bad)} failed: {bad}")
    mfu, distill = phases.get("gpu-mfu", {}), phases.get("distill", {})
    if results["mode"] == "dry":
        unexplained = [t["test"] for t in tests if t["outcome"] != "skipped" or not t["message"]]
        if unexplained:
            problems.append(f"gpu-tests: on CPU every gpu test must skip with a reason: {unexplained}")
        if mfu.get("rc") != 2 or "no CUDA GPU" not in mfu.get("output_tail", ""):
            problems.append("gpu-mfu: expected its no-CUDA refusal (exit code 2)")
        if distill.get("rc") != 2 or "no CUDA GPU" not in distill.get("output_tail", ""):
            problems.append("distill: expected its no-CUDA refusal (exit code 2)")
    else:
        if counts.get("passed", 0) == 0:
            problems.append("gpu-tests: none passed")
        if mfu.get("rc") != 0 or not results.get("gpu_mfu"):
            problems.append("gpu-mfu: " + ("ran out of time" if mfu.get("timed_out") else "failed"))
        if distill.get("rc") != 0 or not results.get("distill"):
            problems.append("distill: " + ("ran out of time" if distill.get("timed_out") else "failed"))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="no GPU: every step but the CUDA work (see above)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"))
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check"))
    a = p.parse_args(argv)
    check = Check(Path(a.out), a.budget, a.dry)
    site_dir = install(check, Path(a.wheels), a.dry)
    if a.dry:
        check.phase("wheel-check", [sys.executable, str(HERE / "wheels.py"), "--check", "--dest", a.wheels], 60)
    extra = {"PYTHONPATH": os.pathsep.join([site_dir, str(ROOT)])} if site_dir else {}
    env = check.phase("environment", [sys.executable, "-c", ENVIRONMENT], 90, **extra)
    line = next((x for x in env["output"].splitlines() if x.startswith("ENVIRONMENT ")), None)
    check.results["phases"]["environment"]["info"] = json.loads(line.split(" ", 1)[1]) if line else {}
    check.save()
    run_tests(check, min(TESTS_SHARE, check.left() - DISTILL_SHARE - MFU_SHARE), site_dir)
    run_distill(check, min(DISTILL_SHARE, check.left() - MFU_SHARE), site_dir)
    run_mfu(check, check.left() - 5, site_dir)
    problems = verdict(check.results)
    check.results.update(ok=not problems, problems=problems)
    check.save()
    for problem in problems:
        print(f"gpu_check: {problem}", file=sys.stderr)
    counts = check.results.get("test_counts", {})
    print(f"gpu_check: {'ok' if not problems else 'PROBLEMS'}; tests {counts}; {check.path}", flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
