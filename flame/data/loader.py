"""``build_dataloader``: from the parsed ``[training]`` section to a resumable batch iterator.

Attributes read from ``training`` (lists hold one entry per dataset, ``""`` = not given):
``batch_size``, ``seq_len``, ``dataset``, ``dataset_name``, ``dataset_split``, ``data_dir``,
``data_files`` (``;`` between several files/globs of one dataset), ``text_column``,
``num_workers``, ``prefetch_factor``, ``pin_memory``, ``persistent_workers``, ``seed``, and
``streaming``/``varlen``/``data_probs`` which must be off/single for now.
"""

from __future__ import annotations

from typing import Any

import torch

import flame.distributed.titan  # noqa: F401  (patches torchtitan for CPU; import it first)
from flame.config.errors import ConfigError
from flame.data.packing import PackedTextDataset
from flame.data.sources import load_source, pick_text_column, resolve_source

from torchtitan.components.dataloader import ParallelAwareDataloader


def _check_supported(training: Any, dp_rank: int, dp_world_size: int) -> None:
    """Reject settings this data path does not handle yet, before loading anything."""
    problems = []
    if not training.dataset:
        problems.append("--training.dataset is required: a hub name, a local folder or file, or a builder such as json")
    elif len(training.dataset) != 1:
        problems.append(
            f"--training.dataset: {len(training.dataset)} datasets given; mixing several datasets "
            "(--training.data_probs) is not supported yet, give exactly one"
        )
    if getattr(training, "streaming", False):
        problems.append("--training.streaming: streaming datasets are not supported yet")
    if getattr(training, "varlen", False):
        problems.append("--training.varlen: variable-length (document-masked) packing is not supported yet")
    for flag in ("dataset_name", "dataset_split", "data_dir", "data_files"):
        values = getattr(training, flag, [])
        if len(values) > max(1, len(training.dataset)):
            problems.append(
                f"--training.{flag}: {len(values)} entries for {len(training.dataset)} dataset(s); "
                "give one entry per dataset"
            )
    if training.seq_len < 1:
        problems.append(f"--training.seq_len must be >= 1, got {training.seq_len}")
    if training.batch_size < 1:
        problems.append(f"--training.batch_size must be >= 1, got {training.batch_size}")
    if training.num_workers < 0:
        problems.append(f"--training.num_workers must be >= 0, got {training.num_workers}")
    if not 0 <= dp_rank < dp_world_size:
        problems.append(f"data-parallel rank {dp_rank} is outside 0..{dp_world_size - 1}")
    if problems:
        raise ConfigError(problems)


def backend_tokenizer(tokenizer: Any) -> Any:
    """A private copy of the ``tokenizers.Tokenizer`` inside a transformers fast tokenizer.

    Why a copy: encoding through the Rust tokenizer directly avoids the transformers wrapper's
    per-call overhead, and truncation/padding settings saved in tokenizer.json must not cut or
    pad documents; we turn them off on the copy without touching the caller's tokenizer.
    """
    from tokenizers import Tokenizer

    inner = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if inner is None:
        raise ConfigError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; flame needs a "
            "tokenizer folder with tokenizer.json (transformers PreTrainedTokenizerFast)"
        )
    copy = Tokenizer.from_str(inner.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def build_dataloader(
    training: Any, tokenizer: Any, *, dp_rank: int = 0, dp_world_size: int = 1
) -> ParallelAwareDataloader:
    """Build this data-parallel rank's loader of packed token rows.

    Each batch is ``{"input_ids": LongTensor[batch_size, seq_len], "labels": same shape}``,
    labels being the inputs shifted left by one token. The loader never runs dry (epochs roll
    over with a reshuffle) and its ``state_dict()``/``load_state_dict()`` resume exactly,
    keyed by ``dp_rank`` so distributed checkpoints keep every rank's position.

    Args:
        training: the parsed ``[training]`` section (attributes: see this module's docstring).
        tokenizer: a transformers fast tokenizer with an ``eos_token_id``.
        dp_rank, dp_world_size: this rank's place among the data-parallel ranks.

    Raises:
        ConfigError: for unsupported settings, missing files, unloadable datasets, a missing
            or non-string text column, a tokenizer without EOS, or too few documents.
    """
    _check_supported(training, dp_rank, dp_world_size)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ConfigError(
            "the tokenizer has no eos_token; flame appends EOS after every document, so set "
            "eos_token in the tokenizer folder's tokenizer_config.json"
        )
    tok = backend_tokenizer(tokenizer)

    source = resolve_source(training, 0)  # cheap checks first: files, globs, folders
    ds = load_source(source)
    column = pick_text_column(ds, getattr(training, "text_column", ""), source.spec)

    num_workers = training.num_workers
    shards = dp_world_size * max(1, num_workers)
    if len(ds) < shards:
        raise ConfigError(
            f"--training.dataset {source.spec!r} has {len(ds)} documents, fewer than the "
            f"{shards} shards ({dp_world_size} data-parallel ranks x {max(1, num_workers)} "
            "workers, --training.num_workers) that each need at least one"
        )
    dataset = PackedTextDataset(
        ds.select_columns([column]).with_format(None),
        tok,
        eos_id,
        training.seq_len,
        column=column,
        seed=training.seed,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )
    prefetch = getattr(training, "prefetch_factor", None)
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        batch_size=training.batch_size,
        num_workers=num_workers,
        # ParallelAwareDataloader drops these two when num_workers == 0.
        prefetch_factor=prefetch if prefetch and prefetch > 0 else None,
        persistent_workers=bool(getattr(training, "persistent_workers", False)),
        # Pinned memory only helps host-to-GPU copies; on CPU torch warns and ignores it.
        pin_memory=bool(getattr(training, "pin_memory", False)) and torch.cuda.is_available(),
    )
