""".ci/run: check, default suite, then the slow tier with the local Slurm cluster started and stopped around it.

The phases' commands are stand-ins here (``make``, ``scontrol``, the cluster script and ``chromium`` on a
PATH of fakes that log their calls), so the order, the failure handling and the cluster's start and stop
are tested in a second; the real run is CI itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=".ci/run starts the Slurm cluster as root, as CI runs")


def fake(folder: Path, name: str, body: str = "") -> None:
    path = folder / name
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$CALLS"\n{body}\n')
    path.chmod(0o755)


@pytest.fixture
def ci(tmp_path):
    """A copy of .ci/run in a repository-shaped folder with ``../shared/slurm/local_slurm.sh`` beside it."""
    repo, bin_dir = tmp_path / "clone", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (tmp_path / "shared" / "slurm").mkdir(parents=True)
    fake(tmp_path / "shared" / "slurm", "local_slurm.sh")
    bin_dir.mkdir()
    fake(bin_dir, "scontrol", "exit 1")  # no cluster up yet
    fake(bin_dir, "chromium")
    calls = tmp_path / "calls"

    def run(make_body: str = "", **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        fake(bin_dir, "make", make_body)
        e = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "CI": "true", **env}
        e.pop("LOCAL_SLURM_SCRIPT", None)
        proc = subprocess.run(["bash", str(repo / ".ci" / "run")], env=e, capture_output=True, text=True, timeout=60)
        return proc, calls.read_text().splitlines() if calls.exists() else []

    return run


def test_phases_run_in_order_and_the_cluster_is_stopped(ci):
    proc, calls = ci()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == ["make check", "make test", "scontrol ping", "local_slurm.sh start", "make test-slow",
                     "local_slurm.sh stop"]  # fmt: skip
    for name in ("make check (with .venv)", "default suite", "slurm start", "slow tier"):
        assert f"ci:   {name} " in proc.stdout


def test_a_failing_default_suite_stops_ci_before_the_slow_tier(ci):
    proc, calls = ci('[ "$1" = test ] && exit 3; exit 0')
    assert proc.returncode == 3
    assert calls == ["make check", "make test"]


def test_a_failing_slow_tier_still_stops_the_cluster(ci):
    proc, calls = ci('[ "$1" = test-slow ] && exit 1; exit 0')
    assert proc.returncode == 1
    assert calls[-2:] == ["make test-slow", "local_slurm.sh stop"]


def test_without_the_shared_cluster_script_ci_fails_and_a_developer_run_goes_on(ci, tmp_path):
    (tmp_path / "shared" / "slurm" / "local_slurm.sh").unlink()
    proc, calls = ci()
    assert proc.returncode == 1 and "no Slurm cluster" in proc.stderr
    assert "make test-slow" not in calls
    (tmp_path / "calls").unlink()
    proc, calls = ci(CI="")
    assert proc.returncode == 0 and "the Slurm scenarios will skip" in proc.stdout
    assert calls == ["make check", "make test", "make test-slow"]
