"""The Slurm launcher: arrays with throttles, chunks of MaxArraySize, the controller chain; the real cluster in slow.

The fast tests put a fake ``sbatch`` on the PATH that records its arguments; the slow ones run the
experiment on the local Slurm cluster (tests/launch/conftest.py starts it where it is not up; CI runs as
root), including one ``scancel`` of a running array task.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from flame.experiments import api
from flame.experiments.status import table
from tests.experiments.test_resume import SPEC, records, wait_for
from tests.helpers import PYTHON, ROOT, env
from tests.launch.conftest import slurm_cluster  # noqa: F401  (the fixture)


def test_arrays_throttle_chunk_and_chain(write_spec, fake_sbatch, tmp_path):
    log = fake_sbatch(2)
    spec = write_spec(
        SPEC.replace("ROOT", str(tmp_path / "exp")).replace("KIND", "fake").replace("STEPS", "4")
        + '[experiment.slurm]\npartition = "debug"\ntime = "00:30:00"\noptions = ["--qos=high"]\n'
    )
    api.run(spec, launcher="slurm", echo=lambda *a, **k: None)
    calls = log.read_text().splitlines()
    assert len(calls) == 3  # 3 trials in chunks of 2: two arrays, then the controller
    assert "--array=0-1%1" in calls[0] and "--array=0-0%1" in calls[1] and "--dependency=afterany:100" in calls[1]
    for call in calls[:2]:
        assert "--partition=debug" in call and "--time=00:30:00" in call and "--qos=high" in call
        assert "--requeue" in call and "--signal=USR1@180" in call and "flame.experiments.slurm task" in call
    assert "--dependency=afterany:100:101" in calls[2] and "flame.experiments.slurm controller" in calls[2]
    assert "--kill-on-invalid-dep=yes" in calls[2]
    events = records(tmp_path / "exp")
    assert [e["job"] for e in events if e["event"] == "launch"] == ["100_0", "100_1", "101_0"]
    assert (tmp_path / "exp" / "spec.toml").exists()
    # Each task file line names its trial; the trial folders hold their resolved configs already.
    lines = [
        json.loads(x) for f in sorted((tmp_path / "exp" / "slurm").glob("*.tasks")) for x in f.read_text().splitlines()
    ]
    assert len(lines) == 3 and all(os.path.exists(os.path.join(x["folder"], "config.toml")) for x in lines)
    for x in lines:  # trial.json names the experiment (the trials' W&B group) and the stage (the job type)
        described = json.loads(open(os.path.join(x["folder"], "trial.json")).read())
        assert (described["experiment"], described["stage"]) == ("resume", "search")
    # The plan says the same without submitting anything.
    plan = api.plan(spec, launcher="slurm")
    assert any("--array=0-1%1 + --array=0-0%1" in line for line in plan["launch"]), plan["launch"]
    # While the controller job waits in the queue, it drives the experiment; once it is gone without the
    # experiment's end (scancel, a node failure), status says so and how to go on, and --watch stops.
    assert api.status(spec)["driver"] == {"state": "running", "by": "Slurm controller job 102", "hint": None}
    (tmp_path / "queue").write_text("")
    lost = api.status(spec)
    assert lost["driver"]["state"] == "lost" and "controller job 102 is no longer queued" in lost["driver"]["hint"]
    assert "not running: Slurm controller job 102" in table(lost)
    from flame.experiments.live import watch

    out = io.StringIO()
    assert watch(lambda: api.status(spec), str(tmp_path / "exp"), stream=out, interval=0.01) == 1
    assert out.getvalue().count("not running: Slurm controller job 102") == 2  # the table before and after
    # A controller that cannot be contacted: squeue is asked once (it takes ~18 s to give up), not once
    # per trial; nothing is called lost or running.
    (tmp_path / "queue").write_text("UNREACHABLE\n")
    (tmp_path / "squeue.log").write_text("")
    unknown = api.status(spec)
    assert unknown["driver"]["state"] == "unknown" and "squeue failed" in unknown["driver"]["hint"]
    assert len((tmp_path / "squeue.log").read_text().splitlines()) == 1
    assert {t["status"] for t in unknown["stages"][0]["trials"]} == {"pending"}


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(r"\bJobState=(\S+)", out)
    return match.group(1) if match else ""


def experiment_done(root: Path) -> bool:
    return any(e["event"] == "experiment" for e in records(root))


def assert_equals_local_run(
    spec: Path, write_spec, tmp_path: Path, kind: str, steps: int, rel: float | None = None, **extra_env: str
) -> dict:
    """The experiment of ``spec`` ended with the trials, statuses and metrics of the same experiment run
    locally without interruption (metrics equal, or within ``rel``); its status."""
    reference = write_spec(
        SPEC.replace("ROOT", str(tmp_path / "local")).replace("KIND", kind).replace("STEPS", str(steps)), "ref.toml"
    )
    os.environ.update(extra_env)  # the local driver runs the trials in this process's environment
    api.run(reference, echo=lambda *a, **k: None)
    got, want = api.status(spec), api.status(reference)
    for g, w in zip(got["stages"], want["stages"], strict=True):
        assert [(t["id"], t["status"]) for t in g["trials"]] == [(t["id"], t["status"]) for t in w["trials"]]
        for a, b in zip(g["trials"], w["trials"], strict=True):
            assert a["metric"] == (b["metric"] if rel is None else pytest.approx(b["metric"], rel=rel))
    return got


def run_on_slurm(spec: Path, root: Path, timeout: float, scancel: bool, **extra_env: str) -> str | None:
    """Submit; optionally scancel the first running array task once it has a checkpoint; wait for the end."""
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "run", str(spec), "--launcher", "slurm"],
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cancelled = None
    if scancel:

        def running_with_checkpoint():
            for e in records(root):
                if e["event"] == "launch" and job_state(e["job"]) == "RUNNING":
                    ck = root / e["stage"] / e["trial"] / "checkpoint"
                    if ck.is_dir() and any((p / ".metadata").exists() for p in ck.iterdir()):
                        return e
            return None

        wait_for(lambda: running_with_checkpoint() is not None, timeout, "a running task with a checkpoint")
        task = running_with_checkpoint()
        subprocess.run(["scancel", task["job"]], check=True)
        cancelled = task["trial"]
    end = time.monotonic() + timeout
    while not experiment_done(root):
        if time.monotonic() > end:
            subprocess.run(["scancel", "--name", f"flame-{root.name}-controller"], capture_output=True)
            raise AssertionError(
                f"experiment not done after {timeout} s: {(root / 'records.jsonl').read_text()[-3000:]}"
            )
        time.sleep(1)
    return cancelled


def logs_text(folder: Path) -> str:
    """Every console log of a trial (train.log, and train.sbatch's per-node logs on Slurm)."""
    from flame.experiments.trial import console_logs

    return "".join(Path(p).read_text(errors="replace") for p in console_logs(str(folder)))


@pytest.mark.slow
def test_fake_experiment_on_the_cluster(slurm_cluster, write_spec, tmp_path):  # noqa: F811
    extra = {"FLAME_STAGE_KINDS": "tests.experiments.fake_kind", "FAKE_STEP_SECONDS": "0.5"}
    spec = write_spec(
        SPEC.replace("ROOT", str(tmp_path / "slurm"))
        .replace("KIND", "fake")
        .replace("STEPS", "12")
        .replace("max_parallel = 1", "max_parallel = 2")
    )
    cancelled = run_on_slurm(spec, tmp_path / "slurm", 300, scancel=True, **extra)
    assert_equals_local_run(spec, write_spec, tmp_path, "fake", 12, **extra)
    assert "resumed at step" in logs_text(tmp_path / "slurm" / "search" / cancelled)
    submits = [e for e in records(tmp_path / "slurm") if e["event"] == "submit"]
    assert [e["stage"] for e in submits] == ["search", "search", "final"]  # the cancelled task went again
    assert submits[1]["trials"] == [cancelled]


@pytest.mark.slow
def test_real_experiment_on_the_cluster(slurm_cluster, write_spec, tmp_path):  # noqa: F811
    spec = write_spec(
        SPEC.replace("ROOT", str(tmp_path / "slurm"))
        .replace("KIND", "train")
        .replace("STEPS", "16")
        .replace("max_parallel = 1", "max_parallel = 2")
    )
    cancelled = run_on_slurm(spec, tmp_path / "slurm", 1500, scancel=True)
    assert_equals_local_run(spec, write_spec, tmp_path, "train", 16, rel=1e-5)
    assert "resumed at step" in logs_text(tmp_path / "slurm" / "search" / cancelled)


@pytest.mark.slow
def test_cancelled_controller_is_lost_and_running_again_finishes(slurm_cluster, write_spec, tmp_path):  # noqa: F811
    """The controller job cancelled while its array runs (a user's scancel, a node lost): status reports the
    experiment lost with how to go on, the array finishes on its own, and the same `run` command carries the
    experiment to the end with the results of an uninterrupted run, the trials that had finished not run again."""
    extra = {"FLAME_STAGE_KINDS": "tests.experiments.fake_kind", "FAKE_STEP_SECONDS": "0.2"}
    root = tmp_path / "slurm"
    spec = write_spec(SPEC.replace("ROOT", str(root)).replace("KIND", "fake").replace("STEPS", "6"))
    command = [PYTHON, "-m", "flame.experiment", "run", str(spec), "--launcher", "slurm"]
    first = subprocess.run(command, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    controller = next(e for e in records(root) if e["event"] == "controller")["job"]
    subprocess.run(["scancel", str(controller)], check=True)
    tasks = [e["job"] for e in records(root) if e["event"] == "launch"]
    wait_for(lambda: not any(job_state(t) in ("PENDING", "RUNNING", "COMPLETING") for t in tasks), 300, "the array")
    lost = api.status(spec)
    assert lost["driver"]["state"] == "lost", lost["driver"]
    assert f"Slurm controller job {controller} is no longer queued" in lost["driver"]["hint"]
    assert "run the same `python -m flame.experiment run` command again" in lost["driver"]["hint"]
    # the array ran to its end: the search is complete (its best kept by reduce, the others masked)
    assert sorted(t["status"] for t in lost["stages"][0]["trials"]) == ["done", "masked", "masked"]
    again = subprocess.run(command, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    wait_for(lambda: experiment_done(root), 300, "the experiment's end")
    got = assert_equals_local_run(spec, write_spec, tmp_path, "fake", 6, **extra)
    assert got["driver"]["state"] == "ended"
    launches = [e for e in records(root) if e["event"] == "launch"]
    assert [e["stage"] for e in launches] == ["search"] * 3 + ["final"]  # nothing of the search ran twice
