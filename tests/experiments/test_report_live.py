"""Live status: the refreshing table while ``run`` drives (in a pseudo-terminal), plain lines without a
terminal, and ``status --watch`` for an experiment driven by another process."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
import time

from rich.console import Console

from flame.experiments import api
from flame.experiments.live import render, stage_rows
from flame.experiments.records import Records
from tests.experiments.conftest import FAKE
from tests.helpers import PYTHON, ROOT, env

SPEC = """
[experiment]
name = "live"
root = "{root}"
max_parallel = 2

[[stage]]
name = "search"
kind = "fake"
config = "{base}"
override = { "training.steps" = 8 }
space = { "optimizer.lr" = { grid = [1e-3, 3e-3, 0.7] } }

[[stage]]
name = "final"
kind = "fake"
config = "{base}"
override = { "training.steps" = 4, "optimizer.lr" = { link = "search", field = "optimizer.lr", pick = "best" } }
"""
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_pty(cmd: list[str], timeout: float = 240, **extra: str) -> tuple[int, str]:
    """Run ``cmd`` with a 120 x 40 pseudo-terminal as stdout and stderr; its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(TERM="xterm-256color", **extra), stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_run_in_a_terminal_shows_one_refreshing_table(write_spec):
    spec = write_spec(SPEC)
    code, out = in_pty(
        [PYTHON, "-m", "flame.experiment", "run", str(spec)], FAKE_STEP_SECONDS="0.25", FLAME_STAGE_KINDS=FAKE
    )
    assert code == 0, out[-3000:]
    assert "\x1b[2K" in out and "\x1b[1A" in out  # rich redraws the table in place (erase line, cursor up)
    text = ESCAPE.sub("", out)
    frames = [f for f in text.split("experiment live") if "best so far" in f]
    assert len(frames) >= 3, len(frames)  # the table was drawn again and again
    assert re.search(r"search/\S+\s+│\s+\d/8", text), "a running trial with its step/steps"
    assert re.search(r"search\s+│\s+3\s+│\s+2\s+│\s+0\s+│\s+1\s+│", text), "search: 3 trials, 2 done, 1 failed"
    assert "search/" in text and ": started" in text  # event lines above the table
    assert "report: " in text  # the report hook ran at the end


def test_run_without_a_terminal_prints_plain_lines(write_spec):
    spec = write_spec(SPEC)
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "run", str(spec)],
        cwd=ROOT,
        env=env(FLAME_STAGE_KINDS=FAKE, TERM="xterm-256color"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    started = [ln for ln in lines if re.fullmatch(r"\d\d:\d\d:\d\d (search|final)/\S+: started", ln)]
    ended = [ln for ln in lines if re.fullmatch(r"\d\d:\d\d:\d\d (search|final)/\S+: (done|failed) in .*", ln)]
    assert len(started) == len(ended) == 4
    counts = [ln for ln in lines if re.fullmatch(r"\d\d:\d\d:\d\d \[\w+\] \d+ done, \d+ running, \d+ failed.*", ln)]
    assert len(counts) == 8  # one after each event


def test_the_table_shows_counts_running_trials_and_the_best(write_spec):
    """render() on a status object: every stage's counts, each running trial's step, loss, ETA."""
    spec = write_spec(SPEC)
    api.run(spec, echo=lambda *a, **k: None)
    status = api.status(spec)
    search = status["stages"][0]
    running = search["trials"][0]
    running["status"] = "running"  # as if it were still at step 8 of 16
    running["steps"] = 16
    rows = stage_rows(status)
    assert [(r["name"], r["trials"], r["done"], r["running"], r["failed"]) for r in rows] == [
        ("search", 3, 1, 1, 1),
        ("final", 1, 1, 0, 0),
    ]
    console = Console(record=True, width=160, file=open(os.devnull, "w"))
    console.print(render(status, Records(status["root"]), line="[search] 1 done, 1 running, 1 failed"))
    text = console.export_text()
    assert "8/16" in text and f"search/{running['id']}" in text
    done = next(t for t in search["trials"] if t["status"] == "done")
    assert f"{done['id']}  validation_loss {done['metric']:.4g}" in text
    assert "[search] 1 done, 1 running, 1 failed" in text


def test_status_watch_follows_an_experiment_driven_elsewhere(write_spec):
    spec = write_spec(SPEC)
    extra = {"FAKE_STEP_SECONDS": "0.25", "FLAME_STAGE_KINDS": FAKE}
    driver = subprocess.Popen(
        [PYTHON, "-m", "flame.experiment", "run", str(spec)],
        cwd=ROOT,
        env=env(**extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        watch = subprocess.run(
            [PYTHON, "-m", "flame.experiment", "status", str(spec), "--watch", "--interval", "0.5"],
            cwd=ROOT,
            env=env(**extra),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert driver.wait(timeout=240) == 0
    finally:
        driver.kill()
    assert watch.returncode == 0, watch.stderr
    assert "\x1b" not in watch.stdout
    lines = watch.stdout.splitlines()
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d final/\S+: done \(exit 0, metric [\d.]+\)", ln) for ln in lines)
    assert any(re.match(r"\d\d:\d\d:\d\d experiment done", ln) for ln in lines)  # it stopped at the end
    # after each end, every stage's counts and best so far in one line
    assert any(
        re.search(r" search: 2/3 done, 0 running, 1 failed; best lr0.003-\S+ [\d.]+ \| final: ", ln) for ln in lines
    )
    # in a terminal: the live table, until the experiment (already ended now) is over
    code, out = in_pty([PYTHON, "-m", "flame.experiment", "status", str(spec), "--watch"], FLAME_STAGE_KINDS=FAKE)
    assert code == 0, out[-2000:]
    text = ESCAPE.sub("", out)
    assert "best so far" in text and "watching" in text
