"""Errors of a run that one message explains fully: the CLI prints it on one line (exit code 1), no traceback."""

from __future__ import annotations


class RunError(RuntimeError):
    """A failure during training that one message explains fully (no traceback is printed)."""
