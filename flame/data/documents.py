"""Document sources: one data shard's documents, tokenized, in a seeded order that resumes exactly.

A *source* (``MapDocuments``, ``StreamDocuments``) describes a dataset and is pickled into every
dataloader worker; its ``reader(ctx)`` is the per-shard cursor that hands out *parts*: token
arrays of one document each, except that a document far larger than usual (more than
``max_part_chars`` characters, or ``max_part_tokens`` pre-tokenized tokens) comes in several
parts, so memory stays bounded by the part size rather than by the largest document. EOS is
appended to a document's last part.

A reader's state is a handful of integers (plus, for a stream, the ``datasets`` position of the
current shuffle block): which chunk of documents is current, which document and part within it.
Resuming re-reads and re-tokenizes that one chunk; tokenization is deterministic, so the parts
are identical.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from flame.config.errors import ConfigError

logger = logging.getLogger("flame.data")

MAX_PART_CHARS = 1_000_000  # a longer text is tokenized piece by piece (bounded memory)
MAX_PART_TOKENS = 1 << 18  # a longer pre-tokenized document is handed on in slices


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, each cut just before a space
    or newline when one lies in the window (byte-level BPE attaches a leading space to the next
    word, so such a cut barely changes the tokens). Deterministic: preprocessing and online
    tokenization cut the same way."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (``encode_batch_fast`` skips offsets)."""
    return [enc.ids for enc in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def encode_documents(tokenizer: Any, texts: list[Any], max_part_chars: int = MAX_PART_CHARS) -> list[list[int]]:
    """Each document's full token ids, exactly as training tokenizes it online (empty: ``[]``).

    Used by ``flame.utils.preprocess`` so that preprocessed data equals online tokenization."""
    out: list[list[int]] = []
    small = [i for i, t in enumerate(texts) if t and len(t) <= max_part_chars]
    encoded = dict(zip(small, encode(tokenizer, [texts[i] for i in small]), strict=True))
    for i, text in enumerate(texts):
        if i in encoded:
            out.append(encoded[i])
        elif not text:
            out.append([])
        else:
            out.append([t for ids in encode(tokenizer, split_text(text, max_part_chars)) for t in ids])
    return out


def check_text(value: Any, spec: str, column: str, tokenized: bool) -> None:
    """Raise ConfigError for a value that is neither a string (text) nor a list of ids (tokenized)."""
    ok = value is None or (isinstance(value, (list, np.ndarray)) if tokenized else isinstance(value, str))
    if not ok:
        want = "lists of token ids" if tokenized else "strings"
        raise ConfigError(
            f"{spec}: column {column!r} holds a {type(value).__name__} ({str(value)[:40]!r}); it must "
            f"hold {want} (--training.text_column names the column to train on)"
        )


@dataclass
class ReadContext:
    """What a reader needs besides its source: the shard, seeds and the tokenizer."""

    index: int  # the source's position in its section's dataset list
    shard_id: int
    num_shards: int
    seed: int
    tokenizer: Any
    eos_id: int
    max_part_chars: int = MAX_PART_CHARS
    max_part_tokens: int = MAX_PART_TOKENS


class ChunkReader(abc.ABC):
    """Parts of the current chunk of documents, in order; subclasses say what a chunk is.

    Subclasses implement ``_read_chunk()`` (the documents of the current chunk, empty ones
    removed) and ``_next_chunk()`` (move the position past it, rolling the epoch over).
    """

    def __init__(self, source: Any, ctx: ReadContext) -> None:
        self.source, self.ctx = source, ctx
        self.index = self.piece = self.doc_offset = 0  # document, part, tokens of it already handed on
        # Parts handed on in the current epoch, and whether this process read it from its start: an
        # epoch read whole that yields nothing would otherwise loop forever.
        self._emitted, self._epoch_from_start = 0, True
        self._docs: list[Any] | None = None
        self._encoded: dict[int, np.ndarray] = {}
        self._pieces: tuple[int, list[Any]] = (-1, [])

    def _load(self) -> None:
        """Read and tokenize the current chunk (documents small enough are encoded in one batch)."""
        docs = self._read_chunk()
        self._docs, self._encoded, self._pieces = docs, {}, (-1, [])
        if not self.source.tokenized:
            small = [i for i, d in enumerate(docs) if len(d) <= self.ctx.max_part_chars]
            ids = encode(self.ctx.tokenizer, [docs[i] for i in small])
            self._encoded = {i: np.asarray(x, dtype=np.int64) for i, x in zip(small, ids, strict=True)}

    def _part(self) -> tuple[np.ndarray, int]:
        """Token ids of part ``self.piece`` of document ``self.index``, and its number of parts."""
        if self.index in self._encoded:
            return self._encoded[self.index], 1
        doc = self._docs[self.index]  # type: ignore[index]
        if self.source.tokenized:
            size = self.ctx.max_part_tokens
            count = max(1, -(-len(doc) // size))
            return np.asarray(doc[self.piece * size : (self.piece + 1) * size], dtype=np.int64), count
        if self._pieces[0] != self.index:  # a huge text: cut once, tokenize one piece at a time
            self._pieces = (self.index, split_text(doc, self.ctx.max_part_chars))
        pieces = self._pieces[1]
        ids = encode(self.ctx.tokenizer, [pieces[self.piece]])[0]
        return np.asarray(ids, dtype=np.int64), len(pieces)

    def next_part(self) -> tuple[np.ndarray, int, bool]:
        """``(ids, offset of the part in its document, is the document's last part)``."""
        while True:
            while self._docs is None or self.index >= len(self._docs):
                if self._docs is not None:
                    self._next_chunk()
                    self.index = self.piece = self.doc_offset = 0
                self._load()
            ids, count = self._part()
            offset, last = self.doc_offset, self.piece == count - 1
            if last:
                self.index, self.piece, self.doc_offset = self.index + 1, 0, 0
            else:
                self.piece, self.doc_offset = self.piece + 1, offset + len(ids)
            if last and offset == 0 and len(ids) == 0:
                continue  # a document that tokenizes to nothing adds no lone EOS
            if last:
                ids = np.append(ids, np.int64(self.ctx.eos_id))
            if len(ids):
                self._emitted += 1
                return ids, offset, last

    def _check_epoch_not_empty(self, what: str) -> None:
        """Raise when a whole epoch, read from its start, handed on nothing; then reset the count."""
        if self._epoch_from_start and self._emitted == 0:
            raise ConfigError(
                f"{self.source.spec}: data shard {self.ctx.shard_id} of {self.ctx.num_shards} "
                f"{what} in a whole epoch; the dataset has too few non-empty documents for every "
                "data-parallel rank and dataloader worker (--training.num_workers)"
            )
        self._emitted, self._epoch_from_start = 0, True

    def _cursor(self) -> dict[str, int]:
        return {"index": self.index, "piece": self.piece, "doc_offset": self.doc_offset}

    def _set_cursor(self, state: dict[str, Any]) -> None:
        self.index, self.piece, self.doc_offset = (int(state[k]) for k in ("index", "piece", "doc_offset"))
        self._docs = None  # re-read (and re-tokenize) the saved chunk on the next part
        # Only a position at the very start of an epoch knows that epoch's whole output.
        self._epoch_from_start = self.index == 0 and self.piece == 0 and self._at_epoch_start(state)

    @abc.abstractmethod
    def _at_epoch_start(self, state: dict[str, Any]) -> bool: ...

    @abc.abstractmethod
    def _read_chunk(self) -> list[Any]: ...

    @abc.abstractmethod
    def _next_chunk(self) -> None: ...


# ------------------------------------------------------------------------------ map-style


class MapDocuments:
    """A map-style dataset (``datasets.Dataset`` or a list of strings) as a source.

    Epoch ``e`` of shard ``i`` of ``n`` reads ``perm[i::n]`` of a fresh permutation seeded by
    ``(seed, e)`` (``(seed, e, k)`` for the k-th source, k > 0): within an epoch the shards are
    disjoint and cover every document once, and the global order does not depend on ``n``.
    """

    kind = "map"

    def __init__(
        self,
        docs: Any,
        *,
        column: str = "text",
        tokenized: bool = False,
        name: str = "",
        spec: str = "",
        docs_per_chunk: int = 128,
        max_chunk_chars: int = 4_000_000,
    ) -> None:
        self.docs, self.column, self.tokenized = docs, column, tokenized
        self.name = name or spec or "data"
        self.spec = spec or f"dataset {self.name!r}"  # messages start with it
        self.docs_per_chunk, self.max_chunk_chars = docs_per_chunk, max_chunk_chars
        self.num_docs = len(docs)

    def initial_state(self) -> dict[str, Any]:
        return {
            "epoch": 0,
            "chunk_start": 0,
            "index": 0,
            "piece": 0,
            "doc_offset": 0,
            "num_docs": self.num_docs,
            # chunk boundaries must be found again on resume, so the chunking travels along
            "chunking": [self.docs_per_chunk, self.max_chunk_chars],
        }

    def state_problems(self, state: dict[str, Any]) -> list[str]:
        """Why ``state`` cannot belong to this source (empty when it can)."""
        if state.get("num_docs") != self.num_docs:
            return [f"num_docs: saved {state.get('num_docs')}, now {self.num_docs}"]
        return []

    def reader(self, ctx: ReadContext) -> MapReader:
        return MapReader(self, ctx)

    def fetch(self, indices: np.ndarray) -> list[Any]:
        """Documents at ``indices``: strings, or int64 arrays for a tokenized source."""
        if isinstance(self.docs, (list, tuple)):
            return [self.docs[i] for i in indices.tolist()]
        if not self.tokenized:
            return self.docs[indices.tolist()][self.column]
        import pyarrow.compute as pc

        # Arrow all the way: one flat array and the lengths, no Python list per token.
        table = self.docs.with_format("arrow")[indices.tolist()]
        lists = table.column(self.column).combine_chunks()
        flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        return np.split(flat, np.cumsum(lengths)[:-1])


class MapReader(ChunkReader):
    """One shard's cursor over a ``MapDocuments`` source."""

    source: MapDocuments

    def __init__(self, source: MapDocuments, ctx: ReadContext) -> None:
        super().__init__(source, ctx)
        self.epoch = self.chunk_start = 0
        self.docs_per_chunk, self.max_chunk_chars = source.docs_per_chunk, source.max_chunk_chars
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)
        self._chunk_end = 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Document indices of this shard for ``epoch``, in reading order."""
        if self._order_epoch != epoch:
            seed = [self.ctx.seed, epoch] if self.ctx.index == 0 else [self.ctx.seed, epoch, self.ctx.index]
            perm = np.random.default_rng(seed).permutation(self.source.num_docs)
            self._order, self._order_epoch = perm[self.ctx.shard_id :: self.ctx.num_shards], epoch
            if len(self._order) == 0:
                raise RuntimeError(
                    f"source {self.source.name!r}: data shard {self.ctx.shard_id} of {self.ctx.num_shards} is "
                    f"empty: {self.source.num_docs} documents cannot feed every data-parallel rank and worker"
                )
        return self._order

    def _read_chunk(self) -> list[Any]:
        order = self.epoch_order(self.epoch)
        docs = self.source.fetch(order[self.chunk_start : self.chunk_start + self.docs_per_chunk])
        keep, total = len(docs), 0
        for i, doc in enumerate(docs):  # the boundary depends only on the data: resume finds it again
            total += len(doc) if doc is not None else 0
            if total >= self.max_chunk_chars:
                keep = i + 1
                break
        self._chunk_end = self.chunk_start + keep
        return [d for d in docs[:keep] if d is not None and len(d)]

    def _next_chunk(self) -> None:
        self.chunk_start = self._chunk_end
        if self.chunk_start < len(self.epoch_order(self.epoch)):
            return
        self._check_epoch_not_empty("produced no tokens")
        logger.info(
            "source %r, data shard %d/%d: epoch %d done after %d documents; reshuffling for epoch %d",
            self.source.name,
            self.ctx.shard_id,
            self.ctx.num_shards,
            self.epoch,
            len(self._order),
            self.epoch + 1,
        )
        self.epoch, self.chunk_start = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.source.initial_state(),
            "epoch": self.epoch,
            "chunk_start": self.chunk_start,
            **self._cursor(),
            "chunking": [self.docs_per_chunk, self.max_chunk_chars],
        }

    def _at_epoch_start(self, state: dict[str, Any]) -> bool:
        return int(state["chunk_start"]) == 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.chunk_start = int(state["epoch"]), int(state["chunk_start"])
        self.docs_per_chunk, self.max_chunk_chars = (int(v) for v in state["chunking"])
        self._set_cursor(state)
