"""``build_dataloader``: from the parsed ``[training]`` (and ``[validation]``) sections to a resumable
batch iterator. It reads the schema's dataclasses as they are: every default is the schema's."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import flame.distributed.titan  # noqa: F401  (patches torchtitan for CPU; import it first)
from flame.config.errors import ConfigError
from flame.config.schema import Training, Validation
from flame.data.checks import (
    data_problems,
    dataset_problems,
    shuffle_problems,
    unfillable_buffer,
    window_lanes,
    window_steps,
)
from flame.data.documents import MapDocuments
from flame.data.flags import DatasetFlags, training_flags, validation_flags
from flame.data.mixing import normalize_probs, source_metrics
from flame.data.packing import PackedDataset
from flame.data.sources import Source, load_source, pick_text_column, resolve_source, source_names
from flame.data.streaming import StreamDocuments
from flame.data.tokenized import COLUMN, check_tokenizer, read_meta
from flame.data.varlen import collate_varlen

from torchtitan.components.dataloader import ParallelAwareDataloader

logger = logging.getLogger("flame.data")


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


class FlameDataLoader(ParallelAwareDataloader):
    """torchtitan's rank-aware StatefulDataLoader, plus the realized per-source counts."""

    def source_counts(self) -> np.ndarray:
        """``[2, num_sources]`` int64: documents and tokens of each source in the rows yielded so far
        by this rank (all its workers), as of the last batch handed out."""
        dataset: PackedDataset = self.dataset  # type: ignore[assignment]
        total = np.zeros((2, len(dataset.sources)), dtype=np.int64)
        if self.num_workers == 0:
            states = [dataset.state_dict()]
        else:
            # StatefulDataLoader keeps each worker's dataset state as of the last batch it handed out.
            snapshot = StatefulDataLoader.state_dict(self).get("_snapshot", {})
            states = [w.get("dataset_state") for w in snapshot.get("_worker_snapshots", {}).values()]
        for state in states:
            if state and "counts" in state:
                total += np.asarray([state["counts"]["documents"], state["counts"]["tokens"]], dtype=np.int64)
        return total

    def source_metrics(self, group: Any = None, device: Any = "cpu") -> dict[str, float]:
        """Realized per-source documents, tokens and shares summed over the data-parallel ranks of
        ``group`` (a collective when given: call it on every rank), as flat metric fields; empty
        with a single source."""
        dataset: PackedDataset = self.dataset  # type: ignore[assignment]
        if len(dataset.sources) < 2:
            return {}
        counts = torch.from_numpy(self.source_counts()).to(device)
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        documents, tokens = counts.cpu().numpy()
        return source_metrics(dataset.names, dataset.probs, documents, tokens)


def _fit_window(training: Training, dataset: PackedDataset, dp_rank: int, dp_world_size: int, workers: int) -> int:
    """Steps of this rank's shuffle windows: those of ``--training.sequence_shuffle_buffer``, checked against
    one epoch of every data shard of this rank (ConfigError when a set buffer does not fit; unset, the
    automatic size shrinks to what fits)."""
    steps, lanes = window_steps(training, dp_world_size), window_lanes(training)
    if steps < 2:
        return 1
    window = training.seq_len if training.varlen else training.seq_len + 1
    num_shards = dp_world_size * max(1, workers)
    fit = steps
    for shard in range(dp_rank, num_shards, dp_world_size):  # this rank's workers
        # Every non-empty document adds at least 2 tokens (one and EOS): enough documents need no count.
        if all(isinstance(s, MapDocuments) and s.num_docs // num_shards * 2 >= steps * lanes * window
               for s in dataset.sources):  # fmt: skip
            continue
        rows = dataset.window_rows_available(shard, num_shards, steps * lanes)
        if rows // lanes < steps and training.sequence_shuffle_buffer is not None:
            raise ConfigError(unfillable_buffer(training, dp_world_size, shard, rows // lanes, rows))
        fit = min(fit, rows // lanes)
    if fit < 2:
        logger.info("sequence shuffle off: one epoch of this rank's data holds fewer than two steps of rows")
        return 1
    logger.info(
        "sequence shuffle: windows of %d steps (%d rows of %d tokens per data shard; %d over all ranks)%s",
        fit, fit * lanes, window, fit * lanes * num_shards,
        "" if fit == steps else ", fitted to one epoch of this rank's data",
    )  # fmt: skip
    return fit


def _open_source(
    flags: DatasetFlags, training: Training, index: int, tokenizer: Any, eos_id: int, num_shards: int
) -> tuple[Source, Any]:
    """Resolve, load and check dataset ``index``; returns it and its ``MapDocuments``/``StreamDocuments``."""
    src = resolve_source(flags, index)  # cheap checks first: files, globs, folders
    streaming = training.streaming
    tokenized = src.kind == "tokenized"
    if tokenized:
        check_tokenizer(src.described, read_meta(src.path, src.described), tokenizer, eos_id)
    ds = load_source(src, streaming=streaming, num_shards=num_shards)
    if tokenized:
        column = COLUMN
        if column not in (ds.column_names or []):
            raise ConfigError(f"{src.described}: preprocessed folder without an {column!r} column")
    else:
        column = pick_text_column(ds, training.text_column, src.described)
    if streaming:
        docs = StreamDocuments(
            ds.select_columns([column]), column=column, tokenized=tokenized, spec=src.described,
            buffer_size=training.shuffle_buffer_size,
        )  # fmt: skip
        mode = (
            "its own data files"
            if ds.num_shards % num_shards == 0
            else f"the rows whose index is its id mod {num_shards}"
        )
        what = ";".join(src.data_files) or src.path
        logger.info(
            "dataset %r: streaming %d data file(s); each of %d shards reads %s", what, ds.num_shards, num_shards, mode
        )
        return src, docs
    if len(ds) < num_shards:
        raise ConfigError(
            f"{src.described} has {len(ds)} documents, fewer than the {num_shards} shards "
            "(data-parallel ranks x --training.num_workers workers) that each need at least one"
        )
    return src, MapDocuments(
        ds.select_columns([column]).with_format(None), column=column, tokenized=tokenized, spec=src.described
    )


def build_dataloader(
    training: Training,
    tokenizer: Any,
    *,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    validation: Validation | None = None,
    document_spans: bool = False,
) -> FlameDataLoader:
    """Build this data-parallel rank's loader of packed token rows.

    Each batch is ``{"input_ids": LongTensor[batch_size, seq_len], "labels": same shape}``, labels
    being the inputs shifted left by one token; with ``varlen`` also ``position_ids`` (per
    document) and ``cu_seqlens`` (int32, over the flattened batch), labels -100 at document
    boundaries. The loader never runs dry (every source rolls over into a reshuffled epoch) and
    its ``state_dict()``/``load_state_dict()`` resume exactly, keyed by ``dp_rank`` so distributed
    checkpoints keep every rank's position.

    Args:
        training: the parsed ``[training]`` section.
        tokenizer: a transformers fast tokenizer with an ``eos_token_id``.
        dp_rank, dp_world_size: this rank's place among the data-parallel ranks.
        validation: build the validation loader instead: the ``[validation]`` datasets (the training
            ones read with ``validation.dataset_split`` when it names none), ``validation.batch_size``,
            no worker processes, rows in stream order; packing, tokenization and seed as in training.
        document_spans: add each row's ``document_span`` (first and last document serial numbers,
            per data shard) to the batches, for the inspector.

    Raises:
        ConfigError: for bad settings, missing files, unloadable datasets, a missing or non-string
            text column, a preprocessed folder from another tokenizer, a tokenizer without EOS, or
            too few documents. Messages name the flags of the section the data came from.
    """
    flags = training_flags(training) if validation is None else validation_flags(validation, training)
    problems = data_problems(training)
    problems += shuffle_problems(training, dp_world_size) if validation is None else dataset_problems(flags)
    if not 0 <= dp_rank < dp_world_size:
        problems.append(f"data-parallel rank {dp_rank} is outside 0..{dp_world_size - 1}")
    if problems:
        raise ConfigError(problems)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ConfigError(
            "the tokenizer has no eos_token; flame appends EOS after every document, so set "
            "eos_token in the tokenizer folder's tokenizer_config.json"
        )
    tok = backend_tokenizer(tokenizer)
    num_workers = training.num_workers if validation is None else 0
    batch_size = training.batch_size if validation is None else validation.batch_size
    num_shards = dp_world_size * max(1, num_workers)
    opened = [_open_source(flags, training, i, tokenizer, eos_id, num_shards) for i in range(len(flags.dataset))]
    sources = [docs for _, docs in opened]
    probs = normalize_probs(flags.data_probs, len(sources))
    for docs, name, prob in zip(sources, source_names([src for src, _ in opened]), probs, strict=True):
        docs.name = name
        if len(sources) > 1:
            logger.info("source %r (%s): sampling probability %.3f", name, docs.spec, prob)
    dataset = PackedDataset(
        sources,
        tok,
        eos_id,
        training.seq_len,
        probs=probs,
        varlen=training.varlen,
        context_len=training.context_len,
        seed=training.seed,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        # validation: the same rows every time, in stream order
        window_lanes=window_lanes(training) if validation is None else batch_size,
        document_spans=document_spans,
    )
    if validation is None:
        dataset.window_steps = _fit_window(training, dataset, dp_rank, dp_world_size, num_workers)
    return FlameDataLoader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_varlen if training.varlen else None,
        # ParallelAwareDataloader drops these two when num_workers == 0.
        prefetch_factor=training.prefetch_factor,
        persistent_workers=training.persistent_workers,
        # Pinned memory only helps host-to-GPU copies; on CPU torch warns and ignores it.
        pin_memory=training.pin_memory and torch.cuda.is_available(),
    )
