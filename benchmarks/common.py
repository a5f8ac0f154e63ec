"""Helpers shared by the benchmark scripts: machine description, load average, RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, cores, torch, Python."""
    import torch

    return (
        f"{platform.machine()} {cpu_model()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def load_average() -> str:
    """``uptime``'s load averages (1, 5, 15 minutes)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def today() -> str:
    return date.today().isoformat()


def command_line() -> str:
    """How this script was run, relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join([".venv/bin/python", script, *map(shlex.quote, sys.argv[1:])])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """min–max of ``values`` as a percentage around their median."""
    if len(values) < 2:
        return ""
    m = median(values)
    return f"{100 * (min(values) / m - 1):+.0f} % / {100 * (max(values) / m - 1):+.0f} %"


def table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A Markdown table; columns in ``right`` are right-aligned."""
    right = right if right is not None else set(range(1, len(header)))
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def append_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Append ``## title`` and ``body`` to RESULTS.md."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    path.write_text(text.rstrip("\n") + f"\n\n## {title}\n\n{body.strip()}\n")
    print(f"appended '{title}' to {os.path.relpath(path, ROOT)}")
