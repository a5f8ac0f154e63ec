"""Mixing several sources by probability, and reporting the shares that were realized.

Each document's source is drawn with a seeded RNG of its own per data shard (rank x worker):
draw ``k`` comes from a block of choices seeded by ``(seed, shard, k // block)``, so the mixing
state is one counter. A source that runs out starts a new, reshuffled epoch of its own (logged by
the source) instead of dropping out of the mixture.

Realized counts are kept per source in the packing state: the tokens that went into yielded rows
and the documents whose first token did. They resume with the checkpoint, and the trainer logs
them as ``source_*/<name>`` numbers in every metrics record.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MIX_TAG = 0x6D6978  # "mix": keeps these seeds apart from the shuffling seeds
_BLOCK = 4096  # draws per RNG block


def normalize_probs(probs: list[float], num_sources: int) -> list[float]:
    """Sampling probabilities as fractions of 1; equal shares when none are given."""
    if not probs:
        return [1.0 / num_sources] * num_sources
    total = float(sum(probs))
    return [float(p) / total for p in probs]


class MixedReader:
    """Hands on document parts, each document from a source drawn by probability.

    Args:
        readers: one reader per source (``next_part() -> (ids, offset, last)``).
        probs: sampling probability of each source (fractions of 1).
        seed, shard_id, num_shards: seed the draws of this shard.
    """

    def __init__(self, readers: list[Any], probs: list[float], seed: int, shard_id: int, num_shards: int) -> None:
        self.readers = readers
        self.probs = np.asarray(probs, dtype=np.float64)
        self.seed, self.shard_id, self.num_shards = seed, shard_id, num_shards
        self.draws = 0
        self.current = -1  # the source of a document whose parts are still coming, -1: none
        self._block, self._choices = -1, np.empty(0, dtype=np.int64)

    def _draw(self) -> int:
        if len(self.readers) == 1:
            return 0
        block, k = divmod(self.draws, _BLOCK)
        if block != self._block:
            rng = np.random.default_rng([self.seed, _MIX_TAG, self.shard_id, self.num_shards, block])
            self._choices, self._block = rng.choice(len(self.readers), size=_BLOCK, p=self.probs), block
        self.draws += 1
        return int(self._choices[k])

    def next_part(self) -> tuple[np.ndarray, int, int, bool]:
        """``(ids, source index, offset of the part in its document, last part of the document)``."""
        if self.current < 0:
            self.current = self._draw()
        source = self.current
        ids, offset, last = self.readers[source].next_part()
        if last:
            self.current = -1
        return ids, source, offset, last

    def state_dict(self) -> dict[str, Any]:
        # Sources keyed "0", "1", ...: StatefulDataLoader sends workers' states as deltas of nested
        # dicts, so a dict (unlike a list) lets an unchanged source's state stay out of the delta.
        return {
            "draws": self.draws,
            "current": self.current,
            "sources": {str(i): r.state_dict() for i, r in enumerate(self.readers)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws, self.current = int(state["draws"]), int(state["current"])
        for i, reader in enumerate(self.readers):
            reader.load_state_dict(state["sources"][str(i)])


def source_metrics(names: list[str], requested: list[float], documents: Any, tokens: Any) -> dict[str, float]:
    """Flat metric fields for per-source realized counts (empty for a single source).

    ``documents``/``tokens``: realized counts per source, summed over the data-parallel ranks.
    Shares are fractions of 1.
    """
    if len(names) < 2:
        return {}
    documents, tokens = np.asarray(documents, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    num_docs, num_tokens = max(documents.sum(), 1.0), max(tokens.sum(), 1.0)
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"source_requested/{name}"] = float(requested[i])
        out[f"source_documents/{name}"] = int(documents[i])
        out[f"source_tokens/{name}"] = int(tokens[i])
        out[f"source_document_share/{name}"] = float(documents[i] / num_docs)
        out[f"source_token_share/{name}"] = float(tokens[i] / num_tokens)
    return out


def describe_sources(record: dict[str, Any]) -> str:
    """One console line with each source's realized shares next to the requested one ('' if none)."""
    names = [k.split("/", 1)[1] for k in record if k.startswith("source_requested/")]
    parts = [
        f"{name} {record[f'source_document_share/{name}']:.1%} of documents, "
        f"{record[f'source_token_share/{name}']:.1%} of tokens (requested {record[f'source_requested/{name}']:.1%})"
        for name in names
    ]
    return ("data mix: " + "; ".join(parts)) if parts else ""
