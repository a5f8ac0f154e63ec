"""The stateful packing dataset behind flame's training data loader.

Per data shard (data-parallel rank x dataloader worker) it draws documents from its sources
(``flame.data.mixing``), joins them with EOS into one token stream and cuts rows from it:

* plain: windows of ``seq_len + 1`` tokens, ``input_ids = window[:-1]``, ``labels = window[1:]``;
* varlen: rows of ``seq_len`` tokens with per-document ``position_ids`` and -100 labels at
  boundaries, documents split into pieces of at most ``context_len`` (``flame.data.varlen``).

Rows go out through the sequence shuffle (``flame.data.sequence_shuffle``): windows of
``window_steps`` steps of ``window_lanes`` rows each, dealt out in a seeded order (one step: the
stream order).

Resume state stays small on purpose: StatefulDataLoader asks every worker for its state after
every batch. Instead of buffered tokens we keep the packer's position at the start of the current
window: the source positions as they were when the stream was last *rebased* (whenever fewer
tokens than a row are left), those leftover tokens (the carry, less than a row) and how many
tokens of the stream since then went into rows; plus the window's index and how many of its rows
went out. Resuming restores the sources, cuts the same rows again (tokenization is deterministic),
draws the same order and skips what went out. Per-source realized counts (documents and tokens in
the rows handed out) are part of the state, so they resume too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flame.data import documents
from flame.data.documents import MapDocuments, ReadContext
from flame.data.mixing import MixedReader, normalize_probs
from flame.data.sequence_shuffle import lane_order, shard_epoch_tokens
from flame.data.varlen import varlen_row

STATE_VERSION = 3
PACKER_KEYS = ("reader", "carry", "carry_sources", "carry_pieces", "carry_docs", "consumed", "documents_cut")


class _Stream:
    """Tokens not yet cut into rows, with each token's source and boundary flags."""

    def __init__(self, tokens: np.ndarray, sources: np.ndarray, pieces: np.ndarray, docs: np.ndarray) -> None:
        self.tokens, self.sources, self.pieces, self.docs = tokens, sources, pieces, docs
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.length = len(tokens)

    def append(self, ids: np.ndarray, source: int, offset: int, context_len: int) -> None:
        """Add a document part that starts ``offset`` tokens into its document."""
        n = len(ids)
        pieces = np.zeros(n, dtype=bool)
        if context_len:  # varlen: a piece starts at every multiple of context_len in the document
            pieces[(-offset) % context_len :: context_len] = True
        docs = np.zeros(n, dtype=bool)
        if offset == 0:
            docs[0] = True
        self._pending.append((ids, np.full(n, source, dtype=np.int16), pieces, docs))
        self.length += n

    def flush(self) -> None:
        if self._pending:
            columns = zip((self.tokens, self.sources, self.pieces, self.docs), *self._pending, strict=True)
            self.tokens, self.sources, self.pieces, self.docs = (np.concatenate(c) for c in columns)
            self._pending = []

    def tail(self, pos: int) -> _Stream:
        self.flush()
        return _Stream(*(a[pos:].copy() for a in (self.tokens, self.sources, self.pieces, self.docs)))

    def carry_state(self) -> dict[str, Any]:
        self.flush()
        starts = np.flatnonzero(np.diff(self.sources)) + 1 if len(self.sources) else np.zeros(0, dtype=np.int64)
        bounds = [0, *starts.tolist(), len(self.sources)] if len(self.sources) else []
        runs = [[int(self.sources[a]), b - a] for a, b in itertools.pairwise(bounds)]
        return {
            "carry": self.tokens.tolist(),
            "carry_sources": runs,
            "carry_pieces": np.flatnonzero(self.pieces).tolist(),
            "carry_docs": np.flatnonzero(self.docs).tolist(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Stream:
        tokens = np.asarray(state["carry"], dtype=np.int64)
        n = len(tokens)
        runs = state.get("carry_sources") or ([[0, n]] if n else [])
        sources = np.concatenate([np.full(k, s, dtype=np.int16) for s, k in runs]) if runs else np.zeros(0, np.int16)
        pieces, docs = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        pieces[state.get("carry_pieces", [])] = True
        docs[state.get("carry_docs", [])] = True
        return cls(tokens, sources, pieces, docs)


class PackedDataset(IterableDataset):
    """Endless stream of packed rows (dicts of int64 tensors) for one data-parallel rank.

    Args:
        sources: ``MapDocuments``/``StreamDocuments``, one per dataset.
        tokenizer: a ``tokenizers.Tokenizer`` without truncation or padding.
        eos_id: token id appended after every document.
        seq_len: tokens per row (plain rows use ``seq_len + 1`` tokens of the stream).
        probs: sampling probability of each source (normalized; equal when empty).
        varlen: cut varlen rows (see the module docstring) instead of plain windows.
        context_len: with varlen, the longest piece of a document in tokens (<= seq_len).
        seed: shuffling and mixing seed.
        dp_rank, dp_world_size: this rank's place among the data-parallel ranks.
        window_steps: steps of rows a sequence-shuffle window holds (1: rows in stream order).
        window_lanes: rows of one step per data shard (batch x gradient accumulation; per worker
            batch_size).
        document_spans: add ``document_span`` (the first and last document serial number of the
            row, per data shard) to every row, for the inspector.
        max_part_chars: longer texts are tokenized piecewise, bounding memory (default:
            ``flame.data.documents.MAX_PART_CHARS``).
    """

    def __init__(
        self,
        sources: list[Any],
        tokenizer: Any,
        eos_id: int,
        seq_len: int,
        *,
        probs: list[float] | None = None,
        varlen: bool = False,
        context_len: int = 0,
        seed: int = 0,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        window_steps: int = 1,
        window_lanes: int = 1,
        document_spans: bool = False,
        max_part_chars: int | None = None,
    ) -> None:
        super().__init__()
        # The settings arrive checked (flame.data.checks via build_dataloader, and validate).
        self.sources = list(sources)
        self.names = [s.name for s in self.sources]
        self.probs = normalize_probs(list(probs or []), len(self.sources))
        self.tokenizer, self.eos_id, self.seq_len = tokenizer, int(eos_id), int(seq_len)
        self.varlen = bool(varlen)
        self.context_len = int(context_len) if varlen else 0
        self.seed, self.dp_rank, self.dp_world_size = int(seed), dp_rank, dp_world_size
        self.window_steps, self.window_lanes, self.document_spans = window_steps, window_lanes, document_spans
        self.max_part_chars = max_part_chars or documents.MAX_PART_CHARS
        self._state = self._initial_state()
        self._live: MixedReader | None = None  # the reader of the running iteration

    def _initial_state(self) -> dict[str, Any]:
        reader = {"draws": 0, "current": -1, "sources": {str(i): s.initial_state() for i, s in enumerate(self.sources)}}
        zeros = [0] * len(self.sources)
        return {
            "reader": reader,
            **_Stream.from_state({"carry": []}).carry_state(),
            "consumed": 0,
            "documents_cut": 0,  # document starts in the rows cut so far: the next document's serial number
            "window": 0,
            "taken": 0,
            "counts": {"documents": list(zeros), "tokens": list(zeros)},
        }

    # ----------------------------------------------------------------- sharding

    def _shard(self) -> tuple[int, int]:
        """(shard id, number of shards) for the calling process: rank-major, then worker."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # perm[rank::world][worker::nw] == perm[rank + world * worker :: world * nw]
        return self.dp_rank + self.dp_world_size * worker, self.dp_world_size * num_workers

    def _reader(self, shard_id: int, num_shards: int) -> MixedReader:
        readers = [
            source.reader(
                ReadContext(i, shard_id, num_shards, self.seed, self.tokenizer, self.eos_id, self.max_part_chars)
            )
            for i, source in enumerate(self.sources)
        ]
        reader = MixedReader(readers, self.probs, self.seed, shard_id, num_shards)
        reader.load_state_dict(self._state["reader"])
        return reader

    def window_rows_available(self, shard_id: int, num_shards: int, enough: int) -> int:
        """Rows that one epoch of this data shard's documents fills (counted up to ``enough``)."""
        window = self.seq_len if self.varlen else self.seq_len + 1
        contexts = [
            ReadContext(i, shard_id, num_shards, self.seed, self.tokenizer, self.eos_id, self.max_part_chars)
            for i in range(len(self.sources))
        ]
        return shard_epoch_tokens(self.sources, contexts, enough * window) // window

    # ---------------------------------------------------------------- iteration

    def _cut(self, reader: MixedReader, packer: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
        """Rows in stream order from the position ``packer``, which is kept up to date (before each
        yield) as a restorable position: ``(tokens (int32), piece starts, source of each token, document
        starts, first document serial)``, the arrays copies."""
        stream = _Stream.from_state(packer)
        pos = packer["consumed"]
        window = self.seq_len if self.varlen else self.seq_len + 1
        while True:
            while stream.length < pos + window:
                ids, source, offset, _ = reader.next_part()
                stream.append(ids, source, offset, self.context_len)
            stream.flush()
            end = pos + window
            starts = stream.docs[pos:end]
            # the document of the row's first token: the one starting there, else the one before
            first = packer["documents_cut"] - (0 if starts[0] else 1)
            # int32 halves the memory of the shuffle windows (token ids stay far below 2**31)
            row = (stream.tokens[pos:end].astype(np.int32), stream.pieces[pos:end].copy(),
                   stream.sources[pos:end].copy(), starts.copy(), first)  # fmt: skip
            packer["documents_cut"] += int(starts.sum())
            pos = end
            if stream.length - pos < window:
                # Rebase: the leftover, less than a row, becomes the carry and the sources' positions after
                # it the snapshot.
                stream, pos = stream.tail(pos), 0
                packer.update(reader=reader.state_dict(), consumed=0, **stream.carry_state())
            else:
                packer["consumed"] = pos
            yield row

    def _row(self, cut: tuple[Any, ...]) -> dict[str, torch.Tensor]:
        tokens, pieces, _, starts, first = cut
        if self.varlen:
            row = varlen_row(tokens, pieces)
        else:
            window_tokens = torch.from_numpy(tokens.astype(np.int64))
            row = {"input_ids": window_tokens[:-1], "labels": window_tokens[1:]}
        if self.document_spans:
            row["document_span"] = torch.tensor([first, first + int(starts[1:].sum())])  # serials of its documents
        return row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield rows forever, continuing from the current (or loaded) state."""
        state = self._state
        shard_id, num_shards = self._shard()
        reader = self._live = self._reader(shard_id, num_shards)
        packer = {k: state[k] for k in PACKER_KEYS}  # the live cut position, ahead of state
        rows = self._cut(reader, packer)
        steps, width = self.window_steps, self.window_lanes
        lanes = [shard_id + num_shards * i for i in range(width)]  # positions in the global batch
        documents, tokens = state["counts"]["documents"], state["counts"]["tokens"]
        num_sources = len(self.sources)
        size = steps * width
        window = [next(rows) for _ in range(size)]
        while True:
            # The next window is cut one row per row handed out (a worker's work stays even, overlapping
            # training); its start is where this window's rows end.
            upcoming: list[tuple[Any, ...]] = []
            upcoming_start = {key: packer[key] for key in PACKER_KEYS}
            order = lane_order(self.seed, state["window"], steps, lanes)
            for k in range(state["taken"], size):
                while len(upcoming) <= k:  # after a resume in mid-window: catch up once
                    upcoming.append(next(rows))
                cut = window[order[k]]
                sources = cut[2]
                for i, n in enumerate(np.bincount(sources, minlength=num_sources).tolist()):
                    tokens[i] += n
                for i, n in enumerate(np.bincount(sources[cut[3]], minlength=num_sources).tolist()):
                    documents[i] += n
                if k + 1 < size:
                    state["taken"] = k + 1
                else:  # the window is out (state_dict() is taken after the yield): the next one starts
                    state.update(window=state["window"] + 1, taken=0, **upcoming_start)
                yield self._row(cut)
            window = upcoming

    # -------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """This shard's position: the packer's position at the window's start (source snapshot, carry,
        tokens used since), the window's index and rows handed out of it, realized counts."""
        state = self._state
        shard = list(self._shard())
        return {
            "version": STATE_VERSION,
            **state,
            "counts": {k: list(v) for k, v in state["counts"].items()},
            # for a quick look: the epoch the first source is reading now (the restorable
            # position of every source is the snapshot in "reader")
            "epoch": self._live.readers[0].epoch if self._live else int(state["reader"]["sources"]["0"]["epoch"]),
            "seed": self.seed,
            "shard": shard,
            "packing": [self.seq_len, self.context_len],
            "window_shape": [self.window_steps, self.window_lanes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``; the next ``iter()`` continues there.

        Raises ValueError when the state belongs to other data (sources, document counts, seed),
        another sharding (ranks x workers), other packing settings or, in the middle of a window,
        another shuffle window. States of versions 1 and 2 (no sequence shuffle) resume at their
        position with a new window.
        """
        version = int(state.get("version", 1))
        if version == 1:
            state = _from_version_1(state, self)
        if version < 3:
            state = {**state, "documents_cut": 0, "window": 0, "taken": 0}
        expected = {"seed": self.seed, "shard": list(self._shard()), "packing": [self.seq_len, self.context_len]}
        if state["taken"]:  # rows of the window went out: only the same window can continue it
            expected["window_shape"] = [self.window_steps, self.window_lanes]
        wrong = [f"{k}: saved {state.get(k)}, now {v}" for k, v in expected.items() if state.get(k) != v]
        saved_sources = state["reader"]["sources"]
        if len(saved_sources) != len(self.sources):
            wrong.append(f"sources: saved {len(saved_sources)}, now {len(self.sources)}")
        else:
            for i, source in enumerate(self.sources):
                wrong += [f"source {source.name!r} {p}" for p in source.state_problems(saved_sources[str(i)])]
        if wrong:
            raise ValueError(f"data loader state does not match this data/sharding ({', '.join(wrong)})")
        self._live = None
        self._state = {k: state[k] for k in (*PACKER_KEYS, "window", "taken")}
        self._state["counts"] = {k: [int(x) for x in v] for k, v in state["counts"].items()}


def _from_version_1(state: dict[str, Any], dataset: PackedDataset) -> dict[str, Any]:
    """A state saved by flame's first data loader (one map-style source, plain rows), converted.

    Its stream was ``carry`` + the tokens of the chunk at ``chunk_start``, ``consumed`` tokens in:
    exactly a snapshot at that chunk with this carry, so the conversion resumes exactly.
    """
    source = dict(dataset.sources[0].initial_state(), epoch=state["epoch"], chunk_start=state["chunk_start"])
    source.update(num_docs=state["num_docs"], chunking=state.get("chunking", source["chunking"]))
    zeros = [0] * len(dataset.sources)
    return {
        **{k: state[k] for k in ("seed", "shard")},
        "packing": [dataset.seq_len, 0],
        "reader": {"draws": 0, "current": -1, "sources": {"0": source}},
        **_Stream.from_state({"carry": state["carry"]}).carry_state(),
        "consumed": state["consumed"],
        "counts": {"documents": list(zeros), "tokens": list(zeros)},
    }


class PackedTextDataset(PackedDataset):
    """One map-style source of texts (a ``datasets.Dataset`` column or a list of strings), plain rows.

    ``docs_per_chunk`` documents are tokenized per call (batched encoding is much faster and uses
    the tokenizer's thread pool); a chunk stops early past ``max_chunk_chars`` characters.
    """

    def __init__(
        self,
        docs: Any,
        tokenizer: Any,
        eos_id: int,
        seq_len: int,
        *,
        column: str = "text",
        seed: int = 0,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        docs_per_chunk: int = 128,
        max_chunk_chars: int = 4_000_000,
    ) -> None:
        source = MapDocuments(docs, column=column, docs_per_chunk=docs_per_chunk, max_chunk_chars=max_chunk_chars)
        super().__init__([source], tokenizer, eos_id, seq_len, seed=seed, dp_rank=dp_rank, dp_world_size=dp_world_size)
