"""Streaming sources: a ``datasets.IterableDataset`` split over shards and read in shuffle blocks."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

from flame.config.errors import ConfigError
from flame.data.documents import ChunkReader, ReadContext, check_text

logger = logging.getLogger("flame.data")


class StreamDocuments:
    """A ``datasets.IterableDataset`` as a source, read in shuffle blocks.

    Splitting: when the dataset has a multiple of ``num_shards`` data files (``num_shards``), each
    shard reads its own files; otherwise every shard reads the stream and keeps the rows whose
    index is its shard id modulo ``num_shards``. Either way the shards are disjoint and together
    read every row once per epoch.

    Shuffling: ``buffer_size`` documents are read into a buffer, emitted in a permutation seeded
    by ``(seed, source, shard, epoch, block)``, then the next block is read. The checkpoint keeps
    the ``datasets`` position of the block's start and the place within it, not the buffered
    text: resuming re-reads one block, so the state stays small yet exact. Each epoch also
    reorders the data files (``IterableDataset.set_epoch``).
    """

    kind = "stream"

    def __init__(
        self, ds: Any, *, column: str = "text", tokenized: bool = False, name: str = "", spec: str = "",
        buffer_size: int = 1000,
    ) -> None:  # fmt: skip
        self.ds, self.column, self.tokenized = ds, column, tokenized
        self.name = name or spec or "data"
        self.spec = spec or f"dataset {self.name!r}"  # messages start with it
        self.buffer_size = buffer_size  # >= 1, checked with the config

    def initial_state(self) -> dict[str, Any]:
        return {"epoch": 0, "block": 0, "position": None, "index": 0, "piece": 0, "doc_offset": 0}

    def state_problems(self, state: dict[str, Any]) -> list[str]:
        return [] if "block" in state else ["a map-style source's state given to a streaming source"]

    def reader(self, ctx: ReadContext) -> StreamReader:
        return StreamReader(self, ctx)


class StreamReader(ChunkReader):
    """One shard's cursor over a ``StreamDocuments`` source."""

    source: StreamDocuments

    def __init__(self, source: StreamDocuments, ctx: ReadContext) -> None:
        super().__init__(source, ctx)
        self.by_files = source.ds.num_shards % ctx.num_shards == 0
        self.epoch, self.block, self.position = 0, 0, None  # position: datasets' state at the block start
        self._iter: Any = None
        self._next_position: Any = None

    def _open(self) -> None:
        # shard() returns a new IterableDataset (with its own epoch counter): the source's stays untouched
        ds = self.source.ds
        if self.by_files:
            ds = ds.shard(num_shards=self.ctx.num_shards, index=self.ctx.shard_id, contiguous=False)
        else:
            ds = ds.shard(num_shards=1, index=0)
        ds.set_epoch(self.epoch)
        if self.position is not None:
            ds.load_state_dict(self.position)
        rows = self.source.buffer_size * (1 if self.by_files else self.ctx.num_shards)
        self._stream, self._iter = ds, ds.iter(batch_size=rows)

    def _read_chunk(self) -> list[Any]:
        spec, column = self.source.spec, self.source.column
        while True:
            if self._iter is None:
                self._open()
            try:
                batch = next(self._iter)
                break
            except StopIteration:
                self._roll_epoch()
            except ConfigError:
                raise
            except Exception as exc:  # decoding and parsing errors surface here, deep in datasets
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ConfigError(f"{spec} (streaming): reading failed with {type(exc).__name__}: {first}") from exc
        if column not in batch:
            raise ConfigError(f"{spec} (streaming): rows without the column {column!r} (found {sorted(batch)})")
        self._next_position = self._stream.state_dict()
        values = batch[column] if self.by_files else batch[column][self.ctx.shard_id :: self.ctx.num_shards]
        for value in values:
            check_text(value, spec, column, self.source.tokenized)
        seed = [self.ctx.seed, self.ctx.index, self.ctx.shard_id, self.ctx.num_shards, self.epoch, self.block]
        order = np.random.default_rng(seed).permutation(len(values))
        docs = [values[i] for i in order.tolist()]
        return [d for d in docs if d is not None and len(d)]

    def _roll_epoch(self) -> None:
        self._check_epoch_not_empty("got no documents")
        logger.info(
            "source %r (streaming), data shard %d/%d: epoch %d done after %d blocks; reshuffling for epoch %d",
            self.source.name,
            self.ctx.shard_id,
            self.ctx.num_shards,
            self.epoch,
            self.block,
            self.epoch + 1,
        )
        self.epoch, self.block, self.position, self._iter = self.epoch + 1, 0, None, None

    def _next_chunk(self) -> None:
        self.block, self.position = self.block + 1, self._next_position

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "block": self.block,
            "position": copy.deepcopy(self.position),
            **self._cursor(),
        }

    def _at_epoch_start(self, state: dict[str, Any]) -> bool:
        return int(state["block"]) == 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.block = int(state["epoch"]), int(state["block"])
        self.position, self._iter = copy.deepcopy(state["position"]), None
        self._set_cursor(state)
