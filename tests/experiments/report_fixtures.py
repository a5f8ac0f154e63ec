"""A finished toy experiment for the report tests (fake trainer: recorded, deterministic metrics) and
helpers to read what a report wrote."""

from __future__ import annotations

import re
import struct
from pathlib import Path

TOY = """
[experiment]
name = "toy"
root = "{root}"
max_parallel = 2

[[stage]]
name = "search"
kind = "fake"
config = "{base}"
space = { "optimizer.lr" = { loguniform = [1e-4, 1e-1] }, "lr_scheduler.warmup_steps" = { int = [1, 3] }, "training.seed" = { grid = [0, 1] } }
search = { kind = "random", samples = 3, seed = 1 }
reduce = { top_k = 2 }
[[stage.contender]]
name = "short"
override = { "training.steps" = 4 }
[[stage.contender]]
name = "long"
override = { "training.steps" = 6 }

[[stage]]
name = "final"
kind = "fake"
config = "{base}"
override = { "training.steps" = 8, "optimizer.lr" = { link = "search", field = "optimizer.lr", pick = "each" } }
space = { "training.seed" = { grid = [0, 1] } }

[[stage]]
name = "probe"
kind = "fake"
config = "{base}"
override = { "training.steps" = 3 }
space = { "optimizer.lr" = { grid = [1e-3, 0.7] } }
"""


def png_size(path: str | Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def md_tables(text: str) -> dict[str, list[list[str]]]:
    """The trials table of every ``## Stage <name>`` section of report.md: rows of cells (bold removed)."""
    out: dict[str, list[list[str]]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        if not title.startswith("Stage "):
            continue
        rows = []
        for line in body.splitlines():
            if line.startswith("| "):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                if cells[1:2] != ["trial"]:  # not the header
                    rows.append([re.sub(r"^\*\*(.*)\*\*$", r"\1", c).replace("\\|", "|") for c in cells])
        out[title[len("Stage ") :]] = rows
    return out
