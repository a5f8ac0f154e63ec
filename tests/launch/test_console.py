"""What train.sh shows on the console: colour codes only for a terminal (a pipe or a file, such as a Slurm
log or ``make demo > log``, gets plain text), and a config error found by the workers as one message alone."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import subprocess
from types import SimpleNamespace

import pytest

from flame.components.metrics import console_color
from flame.distributed.torchrun import AGENT_LOGGER, HoldFailureLines, refusal_message
from tests.helpers import ROOT, env
from tests.launch.conftest import train_sh

ESC = b"\x1b["


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("disabled", "environ", "tty", "color"),
    [
        (False, {}, True, True),  # python -m flame.train in a terminal
        (False, {}, False, False),  # ... into a file
        (False, {"FLAME_COLOR": "1"}, False, True),  # a worker under train.sh run from a terminal
        (False, {"FLAME_COLOR": "0"}, True, False),  # ... from a Slurm job
        (True, {"FLAME_COLOR": "1"}, True, False),  # --metrics.disable_color_printing wins
        (False, {"NO_COLOR": "1", "FLAME_COLOR": "1"}, True, False),  # so does NO_COLOR
        (False, {"NO_COLOR": ""}, True, True),  # an empty NO_COLOR means unset (no-color.org)
    ],
)
def test_console_color_decision(disabled, environ, tty, color):
    assert console_color(disabled, environ, _Stream(tty)) is color


def _launch_env() -> dict[str, str]:
    e = env()
    e.pop("NO_COLOR", None)
    e.pop("FLAME_COLOR", None)
    return e


def _through_a_terminal(cmd: list[str], timeout: float = 300) -> tuple[int, bytes]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal; return its exit code and everything it wrote."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_launch_env(), stdin=subprocess.DEVNULL, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks)


@pytest.mark.slow  # CI's slow tier: train.sh under a pty, ~30 s
def test_train_sh_colours_a_terminal_and_not_a_pipe(launch_flags, tmp_path):
    piped = subprocess.run(
        train_sh(launch_flags(tmp_path / "piped", training__steps=2)),
        cwd=ROOT, env=_launch_env(), capture_output=True, timeout=300,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr.decode()
    assert b"step 2/2" in piped.stdout
    assert ESC not in piped.stdout + piped.stderr

    code, shown = _through_a_terminal(train_sh(launch_flags(tmp_path / "tty", training__steps=2)))
    assert code == 0, shown.decode(errors="replace")
    assert b"\x1b[36mstep 2/2" in shown  # the step counter in cyan


def test_the_agents_failure_lines_are_held_until_released():
    logger = logging.getLogger(AGENT_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    hold = HoldFailureLines()
    logger.addFilter(hold)
    try:
        logger.warning("Sending process %s closing signal %s", 12, "SIGTERM")
        logger.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", 2, 0, 11, "python")
        logger.warning("something else")
        assert seen == ["something else"]
        hold.release(logger)
        assert seen[1:] == [
            "Sending process 12 closing signal SIGTERM",
            "failed (exitcode: 2) local_rank: 0 (pid: 11) of binary: python",
        ]
        logger.warning("Sending process %s closing signal %s", 13, "SIGTERM")  # released: passes straight through
        assert seen[-1] == "Sending process 13 closing signal SIGTERM"
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(hold)


@pytest.mark.parametrize("log_rank", ["0", "5"], ids=["rank-0-shown", "no-rank-shown"])
def test_a_config_error_found_by_the_workers_is_all_the_user_sees(launch_flags, tmp_path, log_rank):
    """Both workers refuse compiled autograd on 2 ranks (exit code 2): stderr is flame's one message, without
    torchrun's lines about stopping the other worker. With LOG_RANK=5 no worker's output reaches the console,
    so the message comes from the refusing rank's log file."""
    args = launch_flags(tmp_path / "run", experimental__enable_compiled_autograd="true")
    proc = subprocess.run(
        train_sh(args), cwd=ROOT, env=env(NGPU="2", LOG_RANK=log_rank), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [re.sub(r"^\[default\d+\]:", "", line) for line in proc.stderr.splitlines()]
    assert len(lines) == 1 and lines[0].startswith("flame: error: --experimental.enable_compiled_autograd"), lines
    assert proc.stdout.splitlines() == [line for line in proc.stdout.splitlines() if line.startswith("flame: 1 node")]


@pytest.mark.parametrize(
    ("stderr_logs", "exit_codes", "shown", "printed"),
    [
        ({0: "flame: error: bad", 1: "flame: error: bad"}, {0: 2, 1: 2}, {0}, None),  # rank 0 showed it
        ({0: "flame: error: bad", 1: "flame: error: bad"}, {0: -15, 1: 2}, {0}, None),  # ... then was stopped
        ({0: "", 1: "warning\nflame: error: bad\n  - more"}, {0: -15, 1: 2}, {0}, "flame: error: bad\n  - more"),
        ({0: "flame: error: bad", 1: "flame: error: bad"}, {0: 2, 1: 2}, {5}, "flame: error: bad"),  # none shown
    ],
    ids=["shown", "shown-then-stopped", "stopped-before-printing", "no-rank-shown"],
)
def test_the_refusal_is_copied_from_the_log_only_when_the_console_lacks_it(
    tmp_path, stderr_logs, exit_codes, shown, printed
):
    (tmp_path / "flame_old" / "attempt_0" / "1").mkdir(parents=True)
    (tmp_path / "flame_old" / "attempt_0" / "1" / "stderr.log").write_text("flame: error: an older run")
    attempt = tmp_path / "flame_new" / "attempt_0"
    for rank, text in stderr_logs.items():
        (attempt / str(rank)).mkdir(parents=True)
        (attempt / str(rank) / "stderr.log").write_text(text)
    os.utime(tmp_path / "flame_old" / "attempt_0", (1, 1))  # the older run's folder is older
    failures = {rank: SimpleNamespace(local_rank=rank, exitcode=code) for rank, code in exit_codes.items()}
    assert refusal_message(failures, shown, str(tmp_path)) == printed
