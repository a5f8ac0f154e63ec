"""The sequence shuffle: packed rows dealt out in a seeded order, one window of steps at a time.

Packing cuts rows from a stream of whole documents, so consecutive rows mostly come from the same
document; batching consecutive rows gives a batch of one or two documents when documents are long
next to ``batch x seq_len`` (a noisy gradient). The shuffle reads the rows of the next ``steps``
optimizer steps into a buffer (a *window*) and deals them out in a seeded order.

Lanes. A rank's rows of one step hold ``lanes`` positions (``batch_size x gradient_accumulation_steps``
without workers, ``batch_size`` per worker). Position ``i`` of this rank is position
``j = shard + num_shards x i`` of the global batch (ranks deal rows in turn, as they deal documents),
and the shuffle permutes, for each global position ``j`` on its own (seed ``(seed, window, j)``),
which of the window's steps the row at that position comes from. So a step's rows come from
``lanes`` far-apart places of the window, every row of the window goes out exactly once, and the
global batch of every step is the same for any split of it over data-parallel ranks that was the
same before (1 rank x batch 8 and 2 ranks x batch 4 see the same rows per step, when documents are
dealt the same way, as in the layout tests).

Resume. The checkpoint keeps the packer's position at the window's start, the window's index and
how many of its rows went out: resuming cuts the window's rows again (tokenization is
deterministic), draws the same order and skips what went out; the state stays a few integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_TAG = 0x726F7773  # "rows": keeps these seeds apart from the document and mixing seeds


def lane_order(seed: int, window: int, steps: int, lanes: Sequence[int]) -> np.ndarray:
    """Order in which a window's ``steps x len(lanes)`` rows (stream order) go out.

    Output row ``u * L + i`` (step ``u``, lane ``i``) is stream row ``perm_j[u] * L + i`` where
    ``perm_j`` is the permutation of the window's steps seeded by ``(seed, window, j)`` and ``j``
    the lane's position in the global batch. ``steps <= 1`` keeps the stream order.
    """
    width = len(lanes)
    if steps <= 1:
        return np.arange(steps * width, dtype=np.int64)
    perms = np.stack([np.random.default_rng([seed, _TAG, window, int(j)]).permutation(steps) for j in lanes])
    return (perms.T * width + np.arange(width)).reshape(-1)


def shard_epoch_tokens(sources: list[Any], contexts: list[Any], enough: int) -> int:
    """Tokens one data shard reads from its sources in one epoch each (documents with EOS), counted
    until ``enough``: how much of the data a window of that shard can hold before documents repeat."""
    total = 0
    for source, ctx in zip(sources, contexts, strict=True):
        reader = source.reader(ctx)
        while total < enough:
            ids, _, _ = reader.next_part()
            if reader.epoch != 0:  # the part just read opens the second epoch
                break
            total += len(ids)
    return total


def distinct_documents(spans: np.ndarray) -> int:
    """Distinct documents in a batch from each row's ``[first, last]`` document serial numbers."""
    covered: set[int] = set()
    for first, last in spans.tolist():
        covered.update(range(first, last + 1))
    return len(covered)
