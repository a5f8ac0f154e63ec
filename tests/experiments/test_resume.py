"""Kill the local driver mid-stage and run again: finished trials untouched, the interrupted one resumed from its
checkpoint, the results those of an uninterrupted experiment. Fast on the fake trainer; real train.sh in slow."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flame.experiments import api
from tests.helpers import PYTHON, ROOT, env

SPEC = """
[experiment]
name = "resume"
root = "ROOT"
max_parallel = 1

[[stage]]
name = "search"
kind = "KIND"
config = "{base}"
override = { "training.steps" = STEPS, "checkpoint.interval" = 2 }
space = { "optimizer.lr" = { grid = [1e-3, 3e-3, 1e-2] } }
reduce = { top_k = 1 }

[[stage]]
name = "final"
kind = "KIND"
config = "{base}"
override = { "training.steps" = STEPS, "optimizer.lr" = { link = "search", field = "optimizer.lr", pick = "best" } }
"""


def records(root: Path) -> list[dict]:
    path = root / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def wait_for(check, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def kill_and_resume(write_spec, tmp_path: Path, kind: str, steps: int, timeout: float, **extra_env: str) -> None:
    reference = write_spec(
        SPEC.replace("ROOT", str(tmp_path / "ref")).replace("KIND", kind).replace("STEPS", str(steps)), "ref.toml"
    )
    spec = write_spec(SPEC.replace("ROOT", str(tmp_path / "exp")).replace("KIND", kind).replace("STEPS", str(steps)))
    root = tmp_path / "exp"
    driver = subprocess.Popen(
        [PYTHON, "-m", "flame.experiment", "run", str(spec)],
        cwd=ROOT,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: any(e["event"] == "end" and e["status"] == "done" for e in records(root)),
            timeout,
            "a trial to finish",
        )
        wait_for(lambda: sum(e["event"] == "launch" for e in records(root)) >= 2, timeout, "the second launch")
        second = [e for e in records(root) if e["event"] == "launch"][1]["trial"]
        ck = root / "search" / second / "checkpoint"
        wait_for(lambda: ck.is_dir() and any((p / ".metadata").exists() for p in ck.iterdir()), timeout, "a checkpoint")
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    # The orphaned trial got SIGTERM (parent-death signal): it saves and exits 75 (preempted, resumable).
    exit_file = root / "search" / second / "exit.json"
    wait_for(exit_file.exists, timeout, "the interrupted trial to stop")
    assert json.loads(exit_file.read_text())["code"] == 75
    lost = api.status(spec)  # the driver's pid is gone and the experiment has no end: flagged, with the way on
    assert lost["driver"]["state"] == "lost", lost["driver"]
    assert f"local driver pid {driver.pid}" in lost["driver"]["hint"] and "again to resume" in lost["driver"]["hint"]
    first = next(e for e in records(root) if e["event"] == "end" and e["status"] == "done")["trial"]
    untouched = {name: digest(root / "search" / first / name) for name in ("metrics.jsonl", "summary.json")}
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "run", str(spec)],
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout * 4,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {name: digest(root / "search" / first / name) for name in untouched} == untouched
    assert f"search/{first}" not in proc.stdout.split("experiment resume in")[0]  # not launched again
    log = (root / "search" / second / "train.log").read_text()
    assert "resumed at step" in log, log[-2000:]
    launches = [e for e in records(root) if e["event"] == "launch" and e["stage"] == "search" and e["trial"] == second]
    assert [e["attempt"] for e in launches] == [1, 2]
    api.run(reference, echo=lambda *a, **k: None)
    got, want = api.status(spec), api.status(reference)
    for g, w in zip(got["stages"], want["stages"], strict=True):
        assert [(t["id"], t["status"], t["metric"]) for t in g["trials"]] == [
            (t["id"], t["status"], t["metric"]) for t in w["trials"]
        ]
        assert g["best"] == w["best"]
    assert got["driver"]["state"] == "ended" and got["driver"]["status"] == "done"


def test_kill_driver_and_resume(write_spec, tmp_path):
    kill_and_resume(
        write_spec, tmp_path, "fake", 10, 120, FAKE_STEP_SECONDS="0.3", FLAME_STAGE_KINDS="tests.experiments.fake_kind"
    )


@pytest.mark.slow
def test_kill_driver_and_resume_real_training(write_spec, tmp_path):
    kill_and_resume(write_spec, tmp_path, "train", 8, 600)


def test_status_while_another_process_drives(write_spec, tmp_path):
    spec = write_spec(SPEC.replace("ROOT", str(tmp_path / "exp")).replace("KIND", "fake").replace("STEPS", "100"))
    driver = subprocess.Popen(
        [PYTHON, "-m", "flame.experiment", "run", str(spec)],
        cwd=ROOT,
        env=env(FAKE_STEP_SECONDS="0.2", FLAME_STAGE_KINDS="tests.experiments.fake_kind"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any(e["event"] == "launch" for e in records(tmp_path / "exp")), 60, "a launch")
        proc = subprocess.run(
            [PYTHON, "-m", "flame.experiment", "status", str(spec), "--json"],
            cwd=ROOT,
            env=env(FLAME_STAGE_KINDS="tests.experiments.fake_kind"),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert set(status) >= {"experiment", "root", "stages"} and status["experiment"] == "resume"
        search, final = status["stages"]
        assert set(search) >= {"name", "best", "trials"} and final["trials"] == []
        assert [t["status"] for t in search["trials"]].count("running") == 1
        for t in search["trials"]:
            assert set(t) >= {
                "id",
                "contender",
                "params",
                "status",
                "step",
                "steps",
                "metric",
                "dump_folder",
                "lineage",
            }
            assert t["steps"] == 100 and isinstance(t["params"]["optimizer.lr"], float)
        proc = subprocess.run(
            [PYTHON, "-m", "flame.experiment", "run", str(spec)],
            cwd=ROOT,
            env=env(FLAME_STAGE_KINDS="tests.experiments.fake_kind"),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and "another driver is running" in proc.stderr
    finally:
        driver.terminate()
        driver.wait(60)
    assert os.path.exists(tmp_path / "exp" / "records.jsonl")


def test_the_drivers_own_table_says_nothing_of_a_driver(tmp_path):
    """While the local driver prints its final table the experiment's end is not yet recorded: the driver
    is this process (no 'driven by' line); another live process is named; one gone is lost."""
    import socket

    from flame.experiments.records import Records
    from flame.experiments.status import driver, table

    records = Records(str(tmp_path), writable=True)
    records.append("start", pid=os.getpid(), host=socket.gethostname(), launcher="local")
    mine = driver(Records(str(tmp_path)))
    assert mine == {"state": "running", "by": "this process", "hint": None}
    status = {"experiment": "x", "root": str(tmp_path), "stages": [], "driver": mine}
    assert "driven by" not in table(status) and "not running" not in table(status)
    other = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(30)"])
    try:
        records.append("start", pid=other.pid, host=socket.gethostname(), launcher="local")
        assert driver(Records(str(tmp_path)))["by"] == f"local driver pid {other.pid} on {socket.gethostname()}"
    finally:
        other.kill()
        other.wait()
    assert driver(Records(str(tmp_path)))["state"] == "lost"
    records.append("experiment", status="done")
    assert driver(Records(str(tmp_path)))["state"] == "ended"
