"""The divergences of the KD term and the teacher's top-k targets (``losses`` computes them chunk by chunk).

Notation: P the teacher's distribution, Q the student's, both at temperature T (``softmax(logits / T)``
over the tokenizer's vocabulary; padded columns masked out). Per target token:

* ``forward_kl``  KL(P‖Q) = Σ_v P_v (log P_v − log Q_v)
* ``reverse_kl``  KL(Q‖P) = Σ_v Q_v (log Q_v − log P_v)
* ``jsd``         β·KL(P‖M) + (1 − β)·KL(Q‖M), M = β·P + (1 − β)·Q (TRL's generalized JSD). As β → 0
  it vanishes like β·KL(P‖Q), so β = 0 is defined as exactly ``forward_kl`` and β = 1 as exactly
  ``reverse_kl`` (the limits of JSD/β and JSD/(1 − β)).
* ``tvd``         ½ Σ_v |P_v − Q_v|

The KD term is T² times the divergence (Hinton et al.: the gradient of a softened KL scales as 1/T², so
T² keeps its size comparable to the cross entropy's), **summed** over the target tokens (labels
!= -100) like flame's cross entropy: the trainer divides both by the global number of target tokens,
so the gradient does not depend on how a batch is split into micro-batches, ranks or packed rows.

**Top-k** (``top_k = k``): the teacher's k most likely tokens per position plus one bucket holding the
rest of its mass, 1 − Σ_top-k P; the student's distribution is coarsened the same way (its
probabilities at those k ids and its remaining mass). The divergence is then taken between two (k+1)-
category distributions: a proper divergence (never below zero, zero iff the coarsened distributions
agree) that keeps how confident the teacher is, where renormalising over the top-k would not; with
k = vocabulary the bucket is empty and the loss equals the dense one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from flame.distill.vocab import VocabView

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


@dataclass(frozen=True)
class KDSpec:
    """What KD term to compute: divergence, β (jsd), temperature, top-k (None: dense), tokens per chunk, and
    whether the dense forward KL fused with the cross entropy runs compiled (``--training.compile``)."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int | None = None
    chunk_size: int = 1024  # tokens; 0: all at once
    compiled: bool = False

    @classmethod
    def from_config(cls, distill: Any, compiled: bool = False) -> KDSpec:
        return cls(distill.loss, distill.temperature, distill.beta, distill.top_k, distill.chunk_size, compiled)


@dataclass
class TopKTargets:
    """The teacher's top-k per position, at the spec's temperature: global token ids ``[n, k]``, their
    log-probabilities ``[n, k]`` and the log of the remaining mass ``[n]`` (-inf when none is left)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_rest: torch.Tensor

    def rows(self, index: torch.Tensor) -> TopKTargets:
        return TopKTargets(self.ids[index], self.logprobs[index].float(), self.log_rest[index].float())


# ---- divergences on log-probabilities ------------------------------------------------------------------


def _plogratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a · (log a − log b)`` elementwise, with ``0 · log 0 = 0`` and finite gradients there."""
    ok = torch.isfinite(log_a)  # log-probabilities are <= 0: not finite means a = 0
    zero = torch.zeros_like(log_a)
    a = torch.where(ok, log_a, zero)
    b = torch.where(ok, log_b, zero)
    return torch.where(ok, torch.exp(a) * (a - b), zero)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, loss: str, beta: float, total=None) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``log_p`` and student log-probs ``log_q`` (``[n, C]``).

    ``total`` sums over the last dimension (a ``VocabView.sum`` when the vocabulary is sharded)."""
    total = total or (lambda x: x.sum(dim=-1))
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        return total(_plogratio(log_p, log_q))
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        return total(_plogratio(log_q, log_p))
    if loss == "jsd":
        some = torch.isfinite(log_p) | torch.isfinite(log_q)  # where both are 0, M is 0 (with a clean gradient)
        zero = torch.zeros_like(log_p)
        mixed = torch.logaddexp(
            torch.where(some, log_p, zero) + math.log(beta), torch.where(some, log_q, zero) + math.log1p(-beta)
        )
        log_m = torch.where(some, mixed, torch.full_like(log_p, float("-inf")))
        return beta * total(_plogratio(log_p, log_m)) + (1 - beta) * total(_plogratio(log_q, log_m))
    if loss == "tvd":
        return 0.5 * total((torch.exp(log_p) - torch.exp(log_q)).abs())
    raise ValueError(f"unknown distillation loss {loss!r}; one of {LOSSES}")


# ---- the teacher's top-k targets ---------------------------------------------------------------------


def topk_targets(teacher: torch.Tensor, view: VocabView, k: int, temperature: float) -> TopKTargets:
    """The teacher's top-k targets of fp32 logits ``teacher`` (``[n, width]``, this rank's columns)."""
    z = view.mask_padding(teacher.float())
    if temperature != 1.0:
        z = z / temperature
    values, ids = view.topk(z, k)
    m = values[:, 0]  # the global maximum
    e = (z - m.unsqueeze(-1)).exp_()
    # the rest mass summed with the top-k columns zeroed exactly (e - e = 0), not as 1 - Σ top-k, which
    # cancels when the top-k hold nearly all of it; a rest below fp32's range (~e^-100) reads as empty
    local, inside = view.local_ids(ids, e.shape[-1])
    e_top = torch.exp(values - m.unsqueeze(-1))
    e.scatter_add_(-1, local, torch.where(inside, -torch.gather(e, -1, local), torch.zeros_like(e_top)))
    rest = view.reduce_for_replicated(e.sum(dim=-1))
    log_total = torch.log(rest + e_top.sum(dim=-1))
    return TopKTargets(ids, values - m.unsqueeze(-1) - log_total.unsqueeze(-1), torch.log(rest) - log_total)
