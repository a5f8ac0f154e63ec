"""Colour codes go to a terminal only: a pipe or a file (a Slurm log, ``make demo > log``) gets plain text."""

from __future__ import annotations

import io
import os
import pty
import subprocess

import pytest

from flame.components.metrics import console_color
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
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_launch_env(), stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
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
