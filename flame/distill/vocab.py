"""Operations over the vocabulary dimension of logits that may be sharded over tensor-parallel ranks.

Under tensor parallelism with loss parallelism the output head is column-parallel: every TP rank
holds the logits of a contiguous slice of the vocabulary (``Shard(-1)``). The KD losses never gather
the vocabulary: a log-softmax needs the global maximum (one all-reduce MAX, no gradient: the result
does not depend on it) and the global sum of exponentials (one all-reduce SUM); a sum over the
vocabulary is a local sum plus an all-reduce. ``VocabView`` says which slice of the vocabulary a rank
holds and offers these reductions; with ``group=None`` they are the ordinary dense operations, so one
code path computes the dense and the sharded loss.

Two all-reduces with different backward passes, because autograd runs on every rank separately:

* ``reduce_for_local``: the sum is consumed by per-rank (local) terms that are summed later (the exp-sum
  inside a dense log-softmax). Its gradient on each rank holds only that rank's terms' contributions,
  so the backward all-reduces the gradient too (``torch.distributed.nn``'s semantics).
* ``reduce_for_replicated``: the sum is consumed by a computation every rank repeats identically (the
  final sum over the vocabulary, or the student's logits at the teacher's top-k ids). Each rank's
  gradient already is the whole gradient, so the backward is the identity (Megatron's
  "reduce from the model-parallel region").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class _ReduceForReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ReduceForLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass(frozen=True)
class VocabView:
    """This rank's slice ``[start, start + width)`` of a vocabulary whose first ``size`` ids are compared.

    ``size`` is the tokenizer's vocabulary: columns at or past it (the padding rows of an embedding
    larger than the tokenizer, e.g. 152,064 vs 151,936) are masked out of every softmax. ``group`` is
    the tensor-parallel process group the vocabulary is sharded over (``None``: the whole vocabulary
    is local).
    """

    size: int
    start: int = 0
    group: Any = None

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (fp32, ``[n, width]``) with columns whose global id is ``>= size`` set to -inf."""
        width = logits.shape[-1]
        valid = self.size - self.start
        if valid >= width:
            return logits
        if not self.sharded:  # plain logits: drop the padding columns outright
            return logits[..., : max(valid, 0)]
        column = torch.arange(width, device=logits.device)
        return logits.masked_fill(column >= valid, float("-inf"))

    # ---- reductions over the vocabulary ------------------------------------------------------------

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """The global maximum over the last dimension (no gradient; -inf rows stay -inf)."""
        m = x.detach().amax(dim=-1)
        if self.sharded:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return m

    def reduce_for_local(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceForLocal.apply(x, self.group) if self.sharded else x

    def reduce_for_replicated(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceForReplicated.apply(x, self.group) if self.sharded else x

    def logsumexp(self, x: torch.Tensor, for_replicated: bool = False) -> torch.Tensor:
        """``log Σ_v exp(x_v)`` over the whole vocabulary; ``-inf`` for rows with no finite entry.

        ``for_replicated``: the result feeds only computations every rank repeats (top-k terms)."""
        m = self.max(x)
        safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        local = torch.exp(x - safe_m.unsqueeze(-1)).sum(dim=-1)
        total = self.reduce_for_replicated(local) if for_replicated else self.reduce_for_local(local)
        # An empty sum (the rest mass when top-k covers the vocabulary) is -inf with a zero gradient,
        # not log(0) with a 0/0 gradient.
        nonempty = total > 0
        log_total = torch.log(torch.where(nonempty, total, torch.ones_like(total)))
        return torch.where(nonempty, safe_m + log_total, torch.full_like(total, float("-inf")))

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of this rank's columns under the softmax over the whole vocabulary."""
        if not self.sharded:
            return torch.log_softmax(x, dim=-1)
        return x - self.logsumexp(x).unsqueeze(-1)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_v x_v`` over the whole vocabulary, consumed by replicated computations (a loss)."""
        return self.reduce_for_replicated(x.sum(dim=-1))

    # ---- top-k ---------------------------------------------------------------------------------------

    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest entries of every row over the whole vocabulary (no gradient): values and
        global ids, in descending order. Sharded: each rank's local top-k are all-gathered (``k`` per
        rank, never the vocabulary) and the top-k of those is taken."""
        x = x.detach()
        local_k = min(k, x.shape[-1])
        values, ids = torch.topk(x, local_k, dim=-1)
        ids = ids + self.start
        if not self.sharded:
            return values, ids
        world = dist.get_world_size(self.group)
        # pad to k columns so that every rank gathers the same shape (a slice may be narrower than k)
        if local_k < k:
            pad = k - local_k
            values = torch.cat([values, values.new_full((*values.shape[:-1], pad), float("-inf"))], dim=-1)
            ids = torch.cat([ids, ids.new_zeros((*ids.shape[:-1], pad))], dim=-1)
        all_values = [torch.empty_like(values) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_values, values.contiguous(), group=self.group)
        dist.all_gather(all_ids, ids.contiguous(), group=self.group)
        values, pick = torch.topk(torch.cat(all_values, dim=-1), k, dim=-1)
        return values, torch.gather(torch.cat(all_ids, dim=-1), -1, pick)

    def gather(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``x`` at global ``ids`` (``[n, k]``), for replicated use. Sharded: each rank contributes the
        ids in its slice (zero elsewhere) and the contributions are summed over the ranks."""
        local, inside = self.local_ids(ids, x.shape[-1])
        picked = torch.gather(x, -1, local)
        if not self.sharded:
            return picked
        return self.reduce_for_replicated(torch.where(inside, picked, torch.zeros_like(picked)))

    def logsumexp_without(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``log Σ exp(x_v)`` over the vocabulary except ``ids`` (the rest mass; -inf when nothing is
        left), for replicated use."""
        return self.logsumexp(self.without(x, ids), for_replicated=True)

    def without(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (``[n, width]``) with the columns of global ``ids`` (``[n, k]``) in this slice
        set to -inf."""
        local, inside = self.local_ids(ids, x.shape[-1])
        # counts, not a boolean scatter: ids outside the slice are clamped onto a column that an id
        # inside it may also hit, and a plain scatter would let either write win
        hits = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
        hits.scatter_add_(-1, local, inside.to(torch.int32))
        return x.masked_fill(hits > 0, float("-inf"))

    def local_ids(self, ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``ids`` as column indices of this slice (clamped into it) and whether each is inside it."""
        local = ids - self.start
        inside = (local >= 0) & (local < width)
        return local.clamp(0, width - 1), inside


def view_of(logits: Any, size: int) -> tuple[torch.Tensor, VocabView]:
    """Local logits and their ``VocabView``: a DTensor sharded on the last dimension (loss parallel)
    gives its local slice over the TP group, a replicated DTensor its full value, a tensor itself."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(logits, DTensor):
        return logits, VocabView(size)
    placements = logits.placements
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim in (-1, logits.ndim - 1)]
    if not shard_dims:
        return logits.full_tensor(), VocabView(size)
    if len(placements) != 1:
        raise ValueError(f"vocabulary-sharded logits must live on a 1-D (tensor-parallel) mesh, got {placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, placements)
    return logits.to_local(), VocabView(size, start=int(offset[-1]), group=logits.device_mesh.get_group())
