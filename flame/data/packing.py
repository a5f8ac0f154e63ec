"""The stateful tokenizing and packing dataset behind flame's training data loader.

Documents are shuffled (seeded), split into disjoint shards over data-parallel ranks and then
over dataloader workers, tokenized in chunks, joined with EOS after every document and cut into
fixed windows of ``seq_len + 1`` tokens (``input_ids = window[:-1]``, ``labels = window[1:]``).

Resume state is small on purpose: StatefulDataLoader asks every worker for its state after
every batch, so instead of the (possibly megabytes large) tokenized chunk we keep where the
chunk starts, how many of its tokens were consumed and the < ``seq_len + 1`` tokens carried
over from before it. Resuming re-tokenizes that one chunk; tokenization is deterministic, so
the restored stream is identical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

logger = logging.getLogger("flame.data")

STATE_VERSION = 1


class PackedTextDataset(IterableDataset):
    """Endless stream of packed ``{"input_ids", "labels"}`` rows of ``seq_len`` tokens each.

    Args:
        docs: the documents: a ``datasets.Dataset`` (read column ``column``) or a list of
            strings. ``None`` and empty strings are skipped.
        tokenizer: a ``tokenizers.Tokenizer`` without truncation or padding.
        eos_id: token id appended after every document.
        seq_len: tokens per row; each row consumes ``seq_len + 1`` tokens of the stream.
        seed: shuffle seed; epoch ``e`` uses the permutation seeded by ``(seed, e)``.
        dp_rank, dp_world_size: this rank's shard of the documents.
        docs_per_chunk: documents per tokenizer call (batched encode is much faster than one
            call per document and uses the tokenizer's thread pool).
        max_chunk_chars: a chunk stops early past this many characters, bounding memory when
            documents are huge (a chunk always holds at least one document).
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
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_world_size - 1}")
        self.docs = docs
        self.column = column
        self.tokenizer = tokenizer
        self.eos_id = int(eos_id)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.docs_per_chunk = docs_per_chunk
        self.max_chunk_chars = max_chunk_chars
        self.num_docs = len(docs)
        # Position in this worker's stream; see the module docstring for why it looks like this.
        self._state: dict[str, Any] = {"epoch": 0, "chunk_start": 0, "consumed": 0, "carry": []}

    # ----------------------------------------------------------------- sharding

    def _shard(self) -> tuple[int, int]:
        """(shard id, number of shards) for the calling process: rank-major, then worker."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # perm[rank::world][worker::nw] == perm[rank + world * worker :: world * nw]
        return self.dp_rank + self.dp_world_size * worker, self.dp_world_size * num_workers

    def epoch_order(self, epoch: int, shard_id: int, num_shards: int) -> np.ndarray:
        """Document indices of one shard for ``epoch``, in reading order.

        Every epoch draws a fresh global permutation seeded by ``(seed, epoch)`` (a tuple seed,
        so seed 1 / epoch 0 and seed 0 / epoch 1 do not collide) and strides it, so within an
        epoch the shards are disjoint and together cover every document exactly once.
        """
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
        return perm[shard_id::num_shards]

    # ------------------------------------------------------------------ reading

    def _fetch(self, indices: np.ndarray) -> list[str | None]:
        if isinstance(self.docs, (list, tuple)):
            return [self.docs[i] for i in indices.tolist()]
        return self.docs[indices.tolist()][self.column]

    def _read_chunk(self, order: np.ndarray, start: int) -> tuple[list[str], int]:
        """Texts of the chunk starting at ``order[start]`` and the index where it ends.

        The chunk boundary depends only on the documents, so a resume finds the same chunk.
        """
        texts = self._fetch(order[start : start + self.docs_per_chunk])
        keep, total = len(texts), 0
        for i, text in enumerate(texts):
            total += len(text) if text else 0
            if total >= self.max_chunk_chars:
                keep = i + 1
                break
        return [t for t in texts[:keep] if t], start + keep

    def _tokenize(self, texts: list[str], carry: list[int]) -> np.ndarray:
        """``carry`` followed by every document's tokens plus EOS, as one int64 array."""
        stream = list(carry)
        eos = self.eos_id
        if texts:
            # encode_batch_fast skips offset tracking; ids are identical to encode_batch.
            for enc in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False):
                ids = enc.ids
                if ids:  # a document that tokenizes to nothing adds no lone EOS
                    stream.extend(ids)
                    stream.append(eos)
        return np.asarray(stream, dtype=np.int64)

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield packed rows forever, continuing from the current (or loaded) state."""
        shard_id, num_shards = self._shard()
        state = self._state
        window = self.seq_len + 1
        while True:
            epoch = state["epoch"]
            order = self.epoch_order(epoch, shard_id, num_shards)
            if len(order) == 0:
                raise RuntimeError(
                    f"data shard {shard_id} of {num_shards} is empty: {self.num_docs} documents "
                    "cannot feed every data-parallel rank and dataloader worker"
                )
            fresh_epoch = state["chunk_start"] == 0 and state["consumed"] == 0
            epoch_tokens = 0
            while state["chunk_start"] < len(order):
                texts, end = self._read_chunk(order, state["chunk_start"])
                stream = self._tokenize(texts, state["carry"])
                epoch_tokens += len(stream) - len(state["carry"])
                tensor = torch.from_numpy(stream)
                pos = state["consumed"]
                if pos > len(stream):  # only a state from other data or another tokenizer does this
                    raise RuntimeError(
                        f"data loader state points {pos} tokens into a chunk of {len(stream)}; it "
                        "was saved with other data or another tokenizer"
                    )
                while pos + window <= len(stream):
                    row = tensor[pos : pos + window]
                    pos += window
                    state["consumed"] = pos  # updated before yield: state_dict() is taken after
                    yield {"input_ids": row[:-1], "labels": row[1:]}
                state.update(chunk_start=end, consumed=0, carry=stream[pos:].tolist())
            if fresh_epoch and epoch_tokens == 0:
                raise RuntimeError(
                    f"data shard {shard_id} of {num_shards} produced no tokens in a whole epoch "
                    "(all its documents are empty)"
                )
            logger.info(
                "data shard %d/%d (dp rank %d): epoch %d done after %d documents; reshuffling for epoch %d",
                shard_id,
                num_shards,
                self.dp_rank,
                epoch,
                len(order),
                epoch + 1,
            )
            state.update(epoch=epoch + 1, chunk_start=0, consumed=0)

    # -------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Position of this worker's stream: epoch, chunk start, tokens consumed, carry."""
        shard_id, num_shards = self._shard()
        return {
            "version": STATE_VERSION,
            **{k: v for k, v in self._state.items() if k != "carry"},
            "carry": list(self._state["carry"]),
            "num_docs": self.num_docs,
            "seed": self.seed,
            "shard": [shard_id, num_shards],
            # chunk boundaries must be found again on resume, so the chunking travels along
            "chunking": [self.docs_per_chunk, self.max_chunk_chars],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``; the next ``iter()`` continues there.

        Raises ValueError when the state belongs to other data (document count, seed) or to
        another sharding (ranks x workers), since the position would then mean nothing.
        """
        shard = list(self._shard())
        expected = {"num_docs": self.num_docs, "seed": self.seed, "shard": shard}
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in wrong.items())
            raise ValueError(f"data loader state does not match this data/sharding ({detail})")
        if "chunking" in state:
            self.docs_per_chunk, self.max_chunk_chars = (int(v) for v in state["chunking"])
        self._state = {
            "epoch": int(state["epoch"]),
            "chunk_start": int(state["chunk_start"]),
            "consumed": int(state["consumed"]),
            "carry": [int(t) for t in state["carry"]],
        }
