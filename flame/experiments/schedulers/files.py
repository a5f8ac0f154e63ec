"""The files a scheduled stage keeps besides its run folders: decisions.jsonl lines and ASHA's claim files."""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any


def read_lines(path: str) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` ([] when it does not exist yet); a torn last line is skipped."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def read_claims(folder: str) -> list[dict[str, Any]]:
    """ASHA's claim files in order (``NNNNNN.json``, created exclusively)."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and n[:-5].isdigit())
    except OSError:
        return []
    out = []
    for n in names:
        try:
            with open(os.path.join(folder, n)) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue
    return out


def write_claim(folder: str, claim: dict[str, Any]) -> str:
    """The next claim file, created exclusively (the caller holds ``claims.lock``)."""
    os.makedirs(folder, exist_ok=True)
    n = len([x for x in os.listdir(folder) if x.endswith(".json") and x[:-5].isdigit()])
    while True:
        path = os.path.join(folder, f"{n:06d}.json")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            n += 1
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({**claim, "n": n}, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        return path


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
