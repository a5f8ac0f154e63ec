"""Distillation losses: a divergence between the teacher's and the student's next-token distributions.

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

**Memory**: the tokens are processed in chunks of ``chunk_size``; each chunk's fp32 softmax
intermediates exist only while that chunk is computed. The gradient with respect to the student's
logits is computed chunk by chunk during the forward (``torch.autograd.grad`` on the chunk) and kept in
the logits' dtype, so no fp32 ``tokens × vocabulary`` tensor of either model outlives its chunk; the
backward multiplies the stored gradient by the incoming scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from flame.data.varlen import IGNORE_INDEX
from flame.distill.vocab import VocabView, view_of

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


@dataclass(frozen=True)
class KDSpec:
    """What KD term to compute: divergence, β (jsd), temperature, top-k (None: dense), tokens per chunk."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int | None = None
    chunk_size: int = 1024  # tokens; 0: all at once

    @classmethod
    def from_config(cls, distill: Any) -> KDSpec:
        return cls(distill.loss, distill.temperature, distill.beta, distill.top_k, distill.chunk_size)


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


# ---- per-chunk losses -----------------------------------------------------------------------------------


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


def chunk_losses(
    student: torch.Tensor, teacher: torch.Tensor | TopKTargets, view: VocabView, spec: KDSpec
) -> torch.Tensor:
    """T² · divergence per token (``[n]``, replicated over tensor-parallel ranks) of fp32 student logits
    ``[n, width]`` against the teacher's logits (same layout) or its top-k targets."""
    t = spec.temperature
    zs = view.mask_padding(student) / t
    if spec.top_k is None and isinstance(teacher, torch.Tensor):
        with torch.no_grad():
            log_p = view.log_softmax(view.mask_padding(teacher.float()) / t)
        log_q = view.log_softmax(zs)
        return t * t * divergence(log_p, log_q, spec.loss, spec.beta, view.sum)
    if isinstance(teacher, torch.Tensor):
        with torch.no_grad():
            teacher = topk_targets(teacher, view, spec.top_k, t)  # type: ignore[arg-type]
    lse = view.logsumexp(zs, for_replicated=True)
    log_q_top = view.gather(zs, teacher.ids) - lse.unsqueeze(-1)
    log_q_rest = view.logsumexp_without(zs, teacher.ids) - lse
    log_p = torch.cat([teacher.logprobs, teacher.log_rest.unsqueeze(-1)], dim=-1)
    log_q = torch.cat([log_q_top, log_q_rest.unsqueeze(-1)], dim=-1)
    return t * t * divergence(log_p, log_q, spec.loss, spec.beta)


def _teacher_rows(teacher: torch.Tensor | TopKTargets, rows: torch.Tensor | slice) -> torch.Tensor | TopKTargets:
    if isinstance(teacher, TopKTargets):
        return teacher.rows(rows)  # type: ignore[arg-type]
    return teacher[rows] if isinstance(rows, slice) else teacher.index_select(0, rows)


def _forward_kl_with_grad(
    student: torch.Tensor, teacher: torch.Tensor, view: VocabView, t: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense forward KL of fp32 student logits ``[n, width]``: ``T² Σ_rows KL(P‖Q)`` and its gradient with
    respect to the student's logits in closed form, ``T (Q − P)``: the same value and, up to rounding, the
    same gradient as autograd through ``divergence``, at a fraction of its cost.

    Written for large ``[n, width]`` chunks on a CPU, where each new tensor of that size costs its page
    faults as much as a pass over it: two are allocated (log P and P); log Q is written into ``out`` (the
    chunk's rows of the gradient buffer, when given and of the same shape) and becomes the gradient
    there in place; the sum over the vocabulary reuses log P's buffer. Padding columns get no gradient
    (they are out of both softmaxes)."""
    zt = view.mask_padding(teacher.float())
    zs = view.mask_padding(student)
    if t != 1.0:
        zt, zs = zt / t, zs / t
    log_p = view.log_softmax(zt)
    p = torch.exp(log_p)
    direct = out is not None and not view.sharded and out.shape == zs.shape
    log_q = torch.log_softmax(zs, dim=-1, out=out) if direct else view.log_softmax(zs)
    padding = None
    if view.sharded and view.size - view.start < zs.shape[-1]:  # padding columns of this slice are -inf
        padding = torch.isinf(log_p)
        log_p.masked_fill_(padding, 0.0)
        log_q.masked_fill_(padding, 0.0)
    per_row = log_p.sub_(log_q).mul_(p).sum(dim=-1)  # Σ_v P (log P − log Q), this slice's part
    if torch.isnan(per_row).any():  # a teacher logit of -inf: its 0 · (−inf) term contributes nothing
        per_row = torch.where(p > 0, log_p, torch.zeros((), dtype=log_p.dtype, device=log_p.device)).sum(dim=-1)
    total = view.reduce_for_replicated(per_row).sum() * (t * t)
    grad = log_q.exp_().sub_(p)  # Q − P, in place (log Q is not needed any more)
    if padding is not None:
        grad.masked_fill_(padding, 0.0)
    if t != 1.0:
        grad.mul_(t)
    if grad.shape[-1] != student.shape[-1]:  # padding columns dropped: they get a zero gradient
        full = torch.zeros_like(student)
        full[:, : grad.shape[-1]] = grad
        grad = full
    return total, grad


def _topk_forward_kl_with_grad(
    student: torch.Tensor, targets: TopKTargets, view: VocabView, t: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k forward KL of fp32 student logits ``[n, width]`` against the teacher's top-k ``targets``: the
    same value as ``chunk_losses`` and its gradient with respect to the student's logits in closed form
    (``None`` in the rare case it cannot be computed this way: see below).

    With the coarsened distributions of the module docstring (categories: the k ids S, and the rest R),
    s = Σ_c P_c (1 up to the teacher's rounding), Q the student's softmax and Q^R its softmax over the ids
    outside S: ``d/dz_v = T (s·Q_v − P_v)`` for v in S and ``T (s·Q_v − P_R·Q^R_v)`` elsewhere.

    One vocabulary-sized exponential e = exp(z − max z) serves everything: its columns at S are taken out
    (gathered, then zeroed exactly by adding their negatives), so the rest's sum Z_R is summed, not
    obtained by a subtraction that would cancel when the top-k hold nearly all the mass; Q = e / Z and
    Q^R = e / Z_R. e lives in ``out`` when given (the chunk's rows of the gradient buffer) and becomes the
    gradient there in place. Where the whole rest underflows (every logit outside S more than ~100 below
    the largest) while the teacher puts mass there, the caller differentiates through ``chunk_losses``."""
    zs = view.mask_padding(student)
    if t != 1.0:
        zs = zs / t
    m = view.max(zs)
    e = torch.sub(zs, m.unsqueeze(-1), out=out) if out is not None and out.shape == zs.shape else zs - m.unsqueeze(-1)
    e.exp_()
    local, inside = view.local_ids(targets.ids, e.shape[-1])
    e_top = view.gather(e, targets.ids)  # [n, k], the same on every rank
    e.scatter_add_(-1, local, torch.where(inside, -e_top, torch.zeros_like(e_top)))  # e = 0 on S
    rest_sum = view.reduce_for_replicated(e.sum(dim=-1))
    total_sum = rest_sum + e_top.sum(dim=-1)
    p_top, p_rest = torch.exp(targets.logprobs), torch.exp(targets.log_rest)
    if bool(((rest_sum == 0) & (p_rest > 0)).any()):
        return None
    log_total = torch.log(total_sum)
    log_q_top = view.gather(zs, targets.ids) - (m + log_total).unsqueeze(-1)
    log_q_rest = torch.log(rest_sum) - log_total  # -inf where the rest is empty
    log_q = torch.cat([log_q_top, log_q_rest.unsqueeze(-1)], dim=-1)
    log_p = torch.cat([targets.logprobs, targets.log_rest.unsqueeze(-1)], dim=-1)
    loss = divergence(log_p, log_q, "forward_kl", 0.0).sum() * (t * t)
    mass = p_top.sum(dim=-1) + p_rest
    rest_coef = torch.where(rest_sum > 0, p_rest / torch.where(rest_sum > 0, rest_sum, 1.0), 0.0)
    grad = e.mul_((mass / total_sum - rest_coef).unsqueeze(-1))  # off S: s·Q − P_R·Q^R
    on_top = (mass / total_sum).unsqueeze(-1) * e_top - p_top  # on S: s·Q − P
    grad.scatter_add_(-1, local, torch.where(inside, on_top, torch.zeros_like(on_top)))
    if t != 1.0:
        grad.mul_(t)
    if grad.shape[-1] != student.shape[-1]:  # padding columns dropped: they get a zero gradient
        full = torch.zeros_like(student)
        full[:, : grad.shape[-1]] = grad
        grad = full
    return loss, grad


class _ChunkedKD(torch.autograd.Function):
    """Sum of ``chunk_losses`` over the target tokens, chunk by chunk; the gradient with respect to the
    student's logits is computed in the forward (one chunk at a time, into one buffer) and scaled in
    place in the backward (which therefore runs once per forward, as every training step does)."""

    @staticmethod
    def forward(ctx, student, labels, teacher_logits, ids, logprobs, log_rest, view, spec):  # type: ignore[override]
        teacher: torch.Tensor | TopKTargets = (
            teacher_logits if teacher_logits is not None else TopKTargets(ids, logprobs, log_rest)
        )
        need_grad = ctx.needs_input_grad[0]
        targets = labels != IGNORE_INDEX
        every = bool(targets.all())  # then every row's gradient is written: no zero fill needed
        grad = (torch.empty_like(student) if every else torch.zeros_like(student)) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        num_tokens = student.shape[0]
        chunk = spec.chunk_size if spec.chunk_size > 0 else max(num_tokens, 1)
        forward_kl = spec.loss == "forward_kl" or (spec.loss == "jsd" and spec.beta == 0.0)
        dense = teacher_logits is not None and spec.top_k is None
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            rows: torch.Tensor | slice
            if every:  # a slice: no copies of the chunk's logits
                rows = slice(start, end)
            else:
                rows = targets[start:end].nonzero().squeeze(1) + start
                if rows.numel() == 0:  # the same on every TP rank: the labels are
                    continue
            zs = student[rows].float() if isinstance(rows, slice) else student.index_select(0, rows).float()
            part = _teacher_rows(teacher, rows)
            closed = None
            if need_grad and forward_kl:  # closed-form gradients
                out = grad[rows] if isinstance(rows, slice) and grad.dtype == torch.float32 else None  # type: ignore[index]
                if dense:
                    closed = _forward_kl_with_grad(zs, part, view, spec.temperature, out)  # type: ignore[arg-type]
                else:
                    if isinstance(part, torch.Tensor):
                        part = topk_targets(part, view, spec.top_k, spec.temperature)  # type: ignore[arg-type]
                    closed = _topk_forward_kl_with_grad(zs, part, view, spec.temperature, out)  # type: ignore[arg-type]
            if need_grad and closed is not None:
                loss, g = closed
                if out is None or g.data_ptr() != out.data_ptr():
                    _put(grad, rows, g)  # type: ignore[arg-type]
            elif need_grad:
                zs.requires_grad_(True)
                with torch.enable_grad():
                    loss = chunk_losses(zs, part, view, spec).sum()
                (g,) = torch.autograd.grad(loss, zs)
                _put(grad, rows, g)  # type: ignore[arg-type]
            else:
                loss = chunk_losses(zs, part, view, spec).sum()
            total += loss.detach()
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("backward through the KD term ran twice for one forward (retain_graph is not supported)")
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None, None


def _put(grad: torch.Tensor, rows: torch.Tensor | slice, g: torch.Tensor) -> None:
    """Write a chunk's gradient ``g`` into the rows ``rows`` of the buffer ``grad``."""
    if isinstance(rows, slice):
        grad[rows] = g.to(grad.dtype)
    else:
        grad.index_copy_(0, rows, g.to(grad.dtype))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def kd_loss_sum(student_logits: Any, labels: torch.Tensor, teacher: Any, spec: KDSpec, vocab_size: int) -> torch.Tensor:
    """The KD term summed over the target tokens of one micro-batch (a float32 scalar, differentiable
    with respect to ``student_logits``).

    ``student_logits``: ``[..., width]`` logits (a tensor, or a DTensor sharded on the vocabulary under
    loss parallelism); ``labels``: the matching targets (``-100``: no target). ``teacher``: the
    teacher's logits in the same layout, or ``TopKTargets`` for the flattened tokens (from the cache).
    ``vocab_size``: the tokenizer's vocabulary (columns past it are masked out of both softmaxes).
    Under tensor parallelism the value is the same on every TP rank and the gradient of each rank's
    vocabulary slice is exact; the vocabulary is never gathered.
    """
    student_local, view = view_of(student_logits, vocab_size)
    flat_labels = labels.reshape(-1).to(student_local.device)
    args: tuple[Any, ...]
    if isinstance(teacher, TopKTargets):
        args = (
            None,
            teacher.ids.reshape(-1, teacher.ids.shape[-1]),
            _flat(teacher.logprobs),
            teacher.log_rest.reshape(-1),
        )
    else:
        teacher_local, teacher_view = view_of(teacher, vocab_size)
        if teacher_view.start != view.start or teacher_local.shape[-1] != student_local.shape[-1]:
            raise ValueError(
                f"teacher and student logits are laid out differently (vocabulary columns {teacher_view.start}+"
                f"{teacher_local.shape[-1]} vs {view.start}+{student_local.shape[-1]})"
            )
        args = (_flat(teacher_local).detach(), None, None, None)
    return _ChunkedKD.apply(_flat(student_local), flat_labels, *args, view, spec)


@torch.no_grad()
def agreement_sums(
    student_logits: Any, labels: torch.Tensor, teacher: Any, vocab_size: int, chunk_size: int = 1024
) -> torch.Tensor:
    """Validation numbers summed over target tokens: ``[KL(P‖Q) at T = 1, top-1 agreements]`` (float64).

    The KL is dense with teacher logits and over the top-k plus rest bucket with ``TopKTargets``;
    agreement counts the tokens where the student's most likely token is the teacher's."""
    student_local, view = view_of(student_logits, vocab_size)
    flat = _flat(student_local)
    rows_all = (labels.reshape(-1).to(flat.device) != IGNORE_INDEX).nonzero().squeeze(1)
    if isinstance(teacher, TopKTargets):
        targets: Any = TopKTargets(
            teacher.ids.reshape(-1, teacher.ids.shape[-1]), _flat(teacher.logprobs), teacher.log_rest.reshape(-1)
        )
        spec = KDSpec("forward_kl", 1.0, 0.5, targets.ids.shape[-1], chunk_size)
    else:
        targets = _flat(view_of(teacher, vocab_size)[0])
        spec = KDSpec("forward_kl", 1.0, 0.5, None, chunk_size)
    sums = torch.zeros(2, dtype=torch.float64, device=flat.device)
    chunk = chunk_size if chunk_size > 0 else max(len(rows_all), 1)
    for start in range(0, len(rows_all), chunk):
        rows = rows_all[start : start + chunk]
        zs = flat.index_select(0, rows).float()
        part = _teacher_rows(targets, rows)
        sums[0] += chunk_losses(zs, part, view, spec).sum().double()
        student_top = view.topk(view.mask_padding(zs), 1)[1][:, 0]
        if isinstance(part, TopKTargets):
            teacher_top = part.ids[:, 0]
        else:
            teacher_top = view.topk(view.mask_padding(part.float()), 1)[1][:, 0]
        sums[1] += (student_top == teacher_top).sum().double()
    return sums
