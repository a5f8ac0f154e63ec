"""The data settings' own checks, shared by ``flame.config.validate`` and ``build_dataloader``.

Kept free of heavy imports (no torch, no datasets) so that validating a config stays fast.
"""

from __future__ import annotations

import math
from typing import Any

# Lists with one entry per dataset; dataset_split may also be one entry for all.
PER_DATASET = ("dataset_name", "dataset_split", "data_dir", "data_files", "data_probs")
DEFAULT_CONTEXT_LEN = 2048  # the schema's default: "not set" when varlen is off


def data_problems(training: Any, *, ignored_flags: bool = False) -> list[str]:
    """Every problem of the data settings in ``training``, each naming the flag and what is allowed.

    ``ignored_flags``: also report flags set where they would be ignored (for a whole parsed
    config; ``build_dataloader`` also serves callers that fill only the fields it reads). Plain
    ranges (seq_len, batch_size, num_workers) are checked by ``validate`` with the other numbers."""
    t = training
    problems: list[str] = []
    datasets = list(t.dataset or [])
    if not datasets:
        problems.append("--training.dataset is required: a hub name, a local folder or file, or a builder such as json")
    for i, spec in enumerate(datasets):
        if not str(spec).strip():
            problems.append(f"--training.dataset: entry {i + 1} is empty; give one name, folder, file or builder each")
    num = max(1, len(datasets))
    for flag in PER_DATASET:
        values = list(getattr(t, flag, []) or [])
        allowed = (0, 1, num) if flag == "dataset_split" else (0, num)
        if len(values) not in allowed:
            what = "one entry for all datasets or one per dataset" if flag == "dataset_split" else "one per dataset"
            problems.append(
                f"--training.{flag} has {len(values)} entries but --training.dataset has {len(datasets)}: give {what}"
            )
    probs = list(getattr(t, "data_probs", []) or [])
    if any(not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0) for p in probs):
        problems.append(f"--training.data_probs must all be positive numbers (weights, normalized to 1), got {probs}")
    context_len = getattr(t, "context_len", DEFAULT_CONTEXT_LEN)
    if getattr(t, "varlen", False):
        if not 2 <= context_len <= t.seq_len:
            problems.append(
                f"--training.context_len must be in 2..seq_len ({t.seq_len}) with --training.varlen (the longest "
                f"piece of a document, in tokens), got {context_len}"
            )
    elif ignored_flags and context_len not in (DEFAULT_CONTEXT_LEN, t.seq_len):
        problems.append(
            f"--training.context_len {context_len} only applies with --training.varlen; without it samples are "
            f"cut at --training.seq_len ({t.seq_len}), so leave context_len unset or equal to seq_len"
        )
    buffer = getattr(t, "shuffle_buffer_size", 1)
    if buffer < 1:
        problems.append(f"--training.shuffle_buffer_size must be >= 1 document (1: no shuffling), got {buffer}")
    return problems
