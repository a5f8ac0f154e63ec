"""Packed rows of several documents: rows, batches and the boundaries attention needs.

A varlen row holds ``seq_len`` tokens cut from the stream of document *pieces* (a document
longer than ``context_len`` is split into pieces of at most ``context_len`` tokens, each piece a
separate sample). A *segment* is a run of one piece inside a row; a piece cut by the end of a
row continues as a new segment, at position 0, in the next row. Per segment:

* ``position_ids`` count 0, 1, 2, ... from the segment's start;
* ``labels`` are the next tokens, except at the segment's last token, whose label is -100, so no
  target crosses a document (or piece) boundary;
* attention stays inside the segment (the model adapter builds the mask or the cu_seqlens).

``position_ids`` alone therefore carry every boundary: a segment starts where they are 0.
"""

from __future__ import annotations

import numpy as np
import torch

# The label of positions without a target; the trainer's cross_entropy ignores it (its default).
IGNORE_INDEX = -100


def varlen_row(tokens: np.ndarray, starts: np.ndarray) -> dict[str, torch.Tensor]:
    """One row from ``tokens`` (``seq_len`` ids) and ``starts`` (True where a segment begins).

    The first token always begins a segment. Returns ``input_ids``, ``labels`` and
    ``position_ids``, each an int64 tensor of ``seq_len``.
    """
    length = len(tokens)
    starts = starts.copy()
    starts[0] = True
    index = np.arange(length, dtype=np.int64)
    segment_start = np.maximum.accumulate(np.where(starts, index, 0))
    labels = np.empty(length, dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[-1] = IGNORE_INDEX
    labels[:-1][starts[1:]] = IGNORE_INDEX  # the last token of a segment predicts nothing
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(index - segment_start),
    }


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths over the flattened batch (int32, ``[num_segments + 1]``).

    Segment ``i`` spans ``flat[cu[i]:cu[i + 1]]`` of ``position_ids.flatten()``; every row starts
    a segment, so rows never share one. This is the layout flash-attention's varlen kernels and
    fla's ``cu_seqlens`` expect for a batch flattened to one sequence.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten()
    end = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, 1, L, L]`` mask: query ``i`` sees key ``j`` iff ``j <= i`` in the same segment."""
    segment = torch.cumsum(position_ids == 0, dim=1)  # [batch, L]; segment ids per row
    same = segment[:, :, None] == segment[:, None, :]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril_()
    return (same & causal)[:, None, :, :]


def collate_varlen(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack varlen rows into a batch and add ``cu_seqlens`` of the flattened batch."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    batch["cu_seqlens"] = cu_seqlens_from_position_ids(batch["position_ids"])
    return batch


def label_stats(labels: torch.Tensor) -> tuple[int, int]:
    """(label positions, positions with a target): their ratio is the packing efficiency."""
    return labels.numel(), int((labels != IGNORE_INDEX).sum())
