"""A data-limited setting for distillation experiments: the first documents of a JSON-lines corpus.

``first_documents`` is a ``kind = "python"`` stage function (configs/experiments/distill_demo.toml): it
copies the first ``documents`` lines of ``source`` to ``target`` (later stages link that value: field
``target``) and returns their count and size, so that students read a small subset for several epochs.
"""

from __future__ import annotations

import os


def first_documents(source: str, documents: int, target: str) -> dict:
    """Write the first ``documents`` lines of ``source`` to ``target``."""
    if documents < 1:
        raise ValueError(f"documents must be >= 1, got {documents}")
    path = target
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = size = 0
    with open(source) as f, open(path, "w") as out:
        for line in f:
            if count == documents:
                break
            out.write(line)
            count += 1
            size += len(line.encode())
    if count < documents:
        raise ValueError(f"{source} holds {count} documents, fewer than the {documents} asked for")
    return {"documents": count, "bytes": size}
