"""The data settings' own checks, shared by ``flame.config.validate`` and ``build_dataloader``.

Each check is written once, here; plain number ranges that are not about data (seq_len, batch_size,
num_workers > 0 ...) are checked by ``validate`` with the other numbers. Kept free of heavy imports
(no torch, no datasets) so that validating a config stays fast.
"""

from __future__ import annotations

import math

from flame.config.errors import ConfigError
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


def source_problems(flags: DatasetFlags) -> list[str]:
    """The files, globs and folders of each dataset entry (``resolve_source``: the file system only, no
    data read; a hub name is left to ``datasets``). For entries that ``dataset_problems`` passed."""
    from flame.data.sources import resolve_source

    problems: list[str] = []
    for index in range(len(flags.dataset)):
        try:
            resolve_source(flags, index)
        except ConfigError as e:
            problems.extend(e.problems)
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


# The sequence shuffle's size when --training.sequence_shuffle_buffer is unset: windows of about this many
# tokens over all data-parallel ranks (each rank holds its share), and at least AUTO_SHUFFLE_MIN_STEPS
# steps. Measured with benchmarks/training_quality.py (stdlib corpus, batch 8 x 128): windows of 0.5M,
# 2.1M and 8.5M tokens end 2.7 %, 1.2 % and 0.6 % above the random-row reference loop.
AUTO_SHUFFLE_TOKENS = 1 << 22
AUTO_SHUFFLE_MIN_STEPS = 16


def window_lanes(training: Training) -> int:
    """Rows of one step per data shard (a dataloader worker hands out whole batches in turn)."""
    t = training
    return t.batch_size if t.num_workers else t.batch_size * t.gradient_accumulation_steps


def shuffle_unit(training: Training, dp_world_size: int) -> int:
    """Rows of one window step over all data shards (ranks x workers): the buffer's granularity."""
    return dp_world_size * max(1, training.num_workers) * window_lanes(training)


def window_steps(training: Training, dp_world_size: int) -> int:
    """Steps of one shuffle window for ``--training.sequence_shuffle_buffer`` rows (unset: the automatic
    size, before ``build_dataloader`` fits it to the data); 1 keeps the stream order."""
    t, unit = training, shuffle_unit(training, dp_world_size)
    if t.sequence_shuffle_buffer is None:
        row_tokens = t.seq_len if t.varlen else t.seq_len + 1
        return max(AUTO_SHUFFLE_TOKENS // (row_tokens * unit), AUTO_SHUFFLE_MIN_STEPS)
    return max(1, t.sequence_shuffle_buffer // unit)


def _unit_words(training: Training, dp_world_size: int) -> str:
    per_shard = (
        "--training.num_workers x --training.batch_size"
        if training.num_workers
        else "--training.batch_size x --training.gradient_accumulation_steps"
    )
    return f"{dp_world_size} data-parallel rank(s) x {per_shard} = {shuffle_unit(training, dp_world_size)} rows"


def shuffle_problems(training: Training, dp_world_size: int) -> list[str]:
    """Problems of ``--training.sequence_shuffle_buffer`` for ``dp_world_size`` data-parallel ranks."""
    rows = training.sequence_shuffle_buffer
    if rows is None or rows in (0, 1):
        return []
    if rows < 0:
        return [
            f"--training.sequence_shuffle_buffer must be >= 0 packed rows (0 or 1: rows in stream order; unset: "
            f"automatic), got {rows}"
        ]
    unit = shuffle_unit(training, dp_world_size)
    if rows < 2 * unit:
        return [
            f"--training.sequence_shuffle_buffer {rows} holds fewer rows than two steps ({_unit_words(training, dp_world_size)} "
            f"each), so no row could change its step; give at least {2 * unit}, or 0 for the stream order"
        ]
    return []


def unfillable_buffer(training: Training, dp_world_size: int, shard: int, steps_fit: int, rows_fit: int) -> str:
    """The message for a buffer larger than one epoch of a data shard's share of the data."""
    unit, rows = shuffle_unit(training, dp_world_size), training.sequence_shuffle_buffer or 0
    steps = rows // unit
    suggest = f"at most {steps_fit * unit}" if steps_fit >= 2 else "0 (the stream order; two steps of rows do not fit)"
    return (
        f"--training.sequence_shuffle_buffer {rows} cannot be filled: its windows of {steps} steps hold "
        f"{steps * window_lanes(training)} rows per data shard (data-parallel rank x worker), but shard {shard} "
        f"holds only {rows_fit} rows in one epoch of its share of the data (a window would repeat documents); "
        f"use {suggest}, or leave it unset to fit the data"
    )
