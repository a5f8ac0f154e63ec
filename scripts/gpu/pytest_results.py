"""A pytest plugin for scripts/gpu/check.py: one JSON line per test outcome, written as soon as it is known.

The file (``GPU_CHECK_RESULTS``) survives a run stopped by its time limit, unlike a report written at
the end. Each line: ``{"test", "outcome", "seconds", "message"}`` (the skip reason or the failure's last
line).
"""

from __future__ import annotations

import json
import os


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    if report.failed:
        return str(report.longrepr).strip().splitlines()[-1][:500] if report.longrepr else ""
    return ""


def pytest_runtest_logreport(report) -> None:
    # a test's outcome: its call, or the setup that skipped or failed it, or a failing teardown
    if (
        report.when == "call"
        or (report.when == "setup" and not report.passed)
        or (report.when == "teardown" and report.failed)
    ):
        record = {
            "test": report.nodeid,
            "outcome": report.outcome if report.when != "teardown" else "error",
            "seconds": round(report.duration, 2),
            "message": _message(report),
        }
        with open(os.environ["GPU_CHECK_RESULTS"], "a") as f:
            f.write(json.dumps(record) + "\n")
