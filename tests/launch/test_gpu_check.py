"""The GPU check (scripts/gpu/): the wheels for the device machine and every step of the check but the CUDA work.

The device machine is lent rarely and briefly, so what can be checked without a GPU is checked here: the
wheel set's completeness rules on made-up wheels, the phase runner's time limits, the verdicts, that
``pytest -m gpu`` collects the gpu tests and each skips with a reason on CPU, and (slow tier) a real
download of the wheels followed by the whole check in ``--dry`` mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, env

sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
import check as gpu_check
import wheels
from packaging.requirements import Requirement


def make_wheel(folder: Path, name: str, version: str, requires=(), tag: str = "py3-none-any") -> Path:
    """A minimal wheel: METADATA with ``Requires-Dist`` lines, and WHEEL."""
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name}-{version}.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {tag}\n")
        z.writestr(f"{name}/__init__.py", "")
    return path


MACHINE = {"numpy": "2.5.2", "torch": "2.11.0", "packaging": None}
ALPHA_NEEDS = ["beta>=2", "numpy>=2", "gamma; python_version < '3.10'", "delta; extra == 'test'", "packaging"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (None, None),
        ("no-beta", "alpha 1.0 requires beta>=2: neither a wheel here nor on the machine"),
        ("old-beta", "alpha 1.0 requires beta>=2, the wheel has beta 1.5"),
        ("two-betas", "two versions of beta: 2.0 and 3.0"),
        ("new-torch", "alpha 1.0 requires torch>=2.12, the machine has torch 2.11.0"),
        ("cp311-wheel", "does not install on CPython 3.12 manylinux x86-64"),
        ("too-big", "exceed the 64 MiB that travel to the device machine"),
    ],
)
def test_wheel_set_rules(tmp_path, monkeypatch, change, problem):
    """A complete set passes; each way of breaking it is reported (markers for other Pythons and extras
    need nothing)."""
    monkeypatch.setattr(wheels, "imported_distributions", lambda: {})
    make_wheel(tmp_path, "alpha", "1.0", [*ALPHA_NEEDS, *(["torch>=2.12"] if change == "new-torch" else [])])
    if change != "no-beta":
        make_wheel(tmp_path, "beta", "1.5" if change == "old-beta" else "2.0")
    if change == "two-betas":
        make_wheel(tmp_path, "beta", "3.0")
    if change == "cp311-wheel":
        make_wheel(tmp_path, "epsilon", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    tree = wheels.LIMIT_BYTES if change == "too-big" else 0
    problems = wheels.check(tmp_path, MACHINE, [Requirement("alpha>=1"), Requirement("torch>=2.11")], tree)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


def test_the_device_lacks_what_the_issue_says_and_every_import_is_known():
    """The machine list has torch, transformers and triton, and lacks torchtitan, fla, datasets, torchdata and
    tomli-w: the roots that need wheels. Every third-party import of the code maps to an installed package."""
    machine = wheels.machine_packages()
    assert machine["torch"] == "2.11.0" and machine["transformers"] == "5.17.0" and machine["triton"] == "3.6.0"
    missing = {r.name for r in wheels.roots() if wheels.canonicalize_name(r.name) not in machine}
    assert {"torchtitan", "flash-linear-attention", "datasets", "torchdata", "tomli-w"} <= missing
    imports = wheels.imported_distributions()
    assert {"torch", "torchtitan", "fla", "datasets"} <= set(imports)
    assert all(imp.dists for imp in imports.values()), {m: imp.files for m, imp in imports.items() if not imp.dists}
    assert imports["torchtitan"].at_import and not imports["lm_eval"].at_import  # flame.evaluate's tasks only
    assert wheels.not_carried(set(), machine)["lm_eval"].startswith("extra eval, dev; imported in a function only")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for its reaper as a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_phase_that_runs_out_of_time_is_killed_with_its_children_and_recorded(tmp_path):
    check = gpu_check.Check(tmp_path, budget=60, dry=True)
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print('child', child.pid, flush=True); time.sleep(60)"
    )
    began = time.monotonic()
    record = check.phase("sleepy", [sys.executable, "-c", script], limit=3)
    assert record["timed_out"] and record["rc"] is None and time.monotonic() - began < 30
    child = int(record["output"].split()[1])
    time.sleep(0.5)
    assert not _running(child)  # the whole process group went, not only the phase's process
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["phases"]["sleepy"]["timed_out"] and "child" in saved["phases"]["sleepy"]["output_tail"]


def _results(mode: str, outcomes: list[str], mfu_rc: int, mfu_tail: str = "", distill_rc: int | None = None) -> dict:
    distill_rc = mfu_rc if distill_rc is None else distill_rc
    tests = [
        {"test": f"t{i}", "outcome": o, "seconds": 1, "message": "Skipped: needs a CUDA GPU"}
        for i, o in enumerate(outcomes)
    ]
    return {
        "mode": mode,
        "phases": {
            "install": {"rc": 0},
            "gpu-tests": {"rc": 0},
            "distill": {"rc": distill_rc, "output_tail": mfu_tail},
            "gpu-mfu": {"rc": mfu_rc, "output_tail": mfu_tail},
        },
        "tests": tests,
        "test_counts": {o: outcomes.count(o) for o in set(outcomes)},
        "gpu_mfu": [{"model": "llama_340m"}] if mfu_rc == 0 else [],
        "distill": {"times": {}} if distill_rc == 0 else None,
    }


def test_verdicts():
    assert gpu_check.verdict(_results("device", ["passed", "skipped"], 0)) == []
    assert gpu_check.verdict(_results("device", ["passed", "failed"], 0)) == ["gpu-tests: 1 failed: ['t1']"]
    assert gpu_check.verdict(_results("device", ["passed"], 1, distill_rc=0)) == ["gpu-mfu: failed"]
    assert gpu_check.verdict(_results("device", ["passed"], 0, distill_rc=1)) == ["distill: failed"]
    no_cuda = "gpu_mfu.py: no CUDA GPU is visible; distill_bench.py: no CUDA GPU is visible"
    assert gpu_check.verdict(_results("dry", ["skipped", "skipped"], 2, no_cuda)) == []
    assert gpu_check.verdict(_results("dry", ["skipped"], 2, no_cuda, distill_rc=0)) == [
        "distill: expected its no-CUDA refusal (exit code 2)"
    ]
    assert gpu_check.verdict(_results("dry", ["skipped", "passed"], 2, no_cuda)) == [
        "gpu-tests: on CPU every gpu test must skip with a reason: ['t1']"
    ]
    assert gpu_check.verdict(_results("dry", [], 2, no_cuda)) == ["gpu-tests: no gpu test reported an outcome"]


def test_pytest_m_gpu_collects_the_gpu_tests_and_each_skips_with_a_reason_on_cpu(tmp_path):
    results = tmp_path / "tests.jsonl"
    cmd = [PYTHON, "-m", "pytest", "-m", "gpu", "-q", "-p", "pytest_results", "--timeout", "120"]
    path = os.pathsep.join([str(ROOT / "scripts" / "gpu"), str(ROOT)])
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env(PYTHONPATH=path, GPU_CHECK_RESULTS=str(results)), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outcomes = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(outcomes) >= 14, outcomes  # zoo fla families, CP ring attention, fla kernels, float8, snapshots
    assert {o["outcome"] for o in outcomes} == {"skipped"}
    assert all(o["message"].startswith("Skipped: ") and len(o["message"]) > 15 for o in outcomes), outcomes


@pytest.mark.slow
def test_real_wheels_download_and_the_whole_dry_check(tmp_path):
    """`make gpu-wheels` (into a temporary folder) and `check.py --dry` on it: the set is complete, fits the
    travel limit, installs for CPython 3.12 manylinux, and every phase does what it should."""
    dest, out = tmp_path / "whl", tmp_path / "out"
    subprocess.run([PYTHON, "scripts/gpu/wheels.py", "--dest", str(dest)], cwd=ROOT, env=env(), check=True, timeout=900)
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert {"torchtitan", "flash-linear-attention", "fla-core", "datasets", "torchdata", "tomli-w", "torchao"} <= names
    assert manifest["wheel_bytes"] + manifest["tree_bytes"] < manifest["limit_bytes"]
    proc = subprocess.run(
        [PYTHON, "scripts/gpu/check.py", "--dry", "--wheels", str(dest), "--out", str(out)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    results = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0 and results["ok"], (results.get("problems"), proc.stdout, proc.stderr)
    assert results["phases"]["install"]["dist_infos"] == len(manifest["wheels"])
    assert results["test_counts"]["skipped"] >= 14
