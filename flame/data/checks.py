"""The data settings' own checks, shared by ``flame.config.validate`` and ``build_dataloader``.

Each check is written once, here; plain number ranges that are not about data (seq_len, batch_size,
num_workers > 0 ...) are checked by ``validate`` with the other numbers. Kept free of heavy imports
(no torch, no datasets) so that validating a config stays fast.
"""

from __future__ import annotations

import math

from flame.config.schema import Training
from flame.data.flags import DatasetFlags, training_flags

# Lists with one entry per dataset; dataset_split may also be one entry for all.
PER_DATASET = ("dataset_name", "dataset_split", "data_dir", "data_files", "data_probs")


def dataset_problems(flags: DatasetFlags) -> list[str]:
    """Problems of one section's dataset entries, each naming that section's flag."""
    problems: list[str] = []
    datasets = flags.dataset
    if not datasets:
        problems.append(
            f"{flags.flag('dataset')} is required: a hub name, a local folder or file, or a builder such as json"
        )
    for i, spec in enumerate(datasets):
        if not str(spec).strip():
            problems.append(
                f"{flags.flag('dataset')}: entry {i + 1} is empty; give one name, folder, file or builder each"
            )
    num = max(1, len(datasets))
    for key in PER_DATASET:
        values = getattr(flags, key)
        allowed = (0, 1, num) if key == "dataset_split" else (0, num)
        if len(values) not in allowed:
            what = "one entry for all datasets or one per dataset" if key == "dataset_split" else "one per dataset"
            problems.append(
                f"{flags.flag(key)} has {len(values)} entries but {flags.flag('dataset')} has {len(datasets)}: "
                f"give {what}"
            )
    probs = flags.data_probs
    if any(not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0) for p in probs):
        problems.append(
            f"{flags.flag('data_probs')} must all be positive numbers (weights, normalized to 1), got {probs}"
        )
    return problems


def data_problems(training: Training, *, ignored_flags: bool = False) -> list[str]:
    """Every problem of the training data settings, each naming the flag and what is allowed.

    ``ignored_flags``: also report flags set where they would be ignored (for a whole parsed config,
    as ``validate`` does; ``build_dataloader`` leaves them to it)."""
    t = training
    problems = dataset_problems(training_flags(t))
    if t.varlen:
        if not 2 <= t.context_len <= t.seq_len:
            problems.append(
                f"--training.context_len must be in 2..seq_len ({t.seq_len}) with --training.varlen (the longest "
                f"piece of a document, in tokens), got {t.context_len}"
            )
    elif ignored_flags and t.context_len not in (Training.context_len, t.seq_len):
        problems.append(
            f"--training.context_len {t.context_len} only applies with --training.varlen; without it samples are "
            f"cut at --training.seq_len ({t.seq_len}), so leave context_len unset or equal to seq_len"
        )
    if t.shuffle_buffer_size < 1:
        problems.append(
            f"--training.shuffle_buffer_size must be >= 1 document (1: no shuffling), got {t.shuffle_buffer_size}"
        )
    return problems
