"""Distillation losses: the KD term of a micro-batch, a divergence between the teacher's and the student's
next-token distributions (``divergences``: the formulas, T², top-k), summed over the target tokens.

**Memory**: the tokens are processed in chunks of ``chunk_size``; each chunk's fp32 softmax
intermediates exist only while that chunk is computed. The gradient with respect to the student's
logits is computed chunk by chunk during the forward (``torch.autograd.grad`` on the chunk) and kept in
the logits' dtype, so no fp32 ``tokens × vocabulary`` tensor of either model outlives its chunk; the
backward multiplies the stored gradient by the incoming scalar.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from flame.data.varlen import IGNORE_INDEX
from flame.distill.closed_form import dense_forward_kl, fused_dense_forward_kl, topk_forward_kl
from flame.distill.divergences import KDSpec, TopKTargets, divergence, topk_targets
from flame.distill.vocab import VocabView, view_of


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


class _ChunkedKD(torch.autograd.Function):
    """Sum of ``chunk_losses`` over the target tokens, chunk by chunk; the gradient with respect to the
    student's logits is computed in the forward (one chunk at a time, into one buffer) and scaled in
    place in the backward (which therefore runs once per forward, as every training step does).

    Outputs ``(loss, ce, kd)``: the KD sum, and with ``ce_weight`` w the cross entropy summed over the same
    tokens (on logits over exactly the vocabulary), ``loss`` then being (1 − w)·KD + w·CE; only ``loss``
    is differentiable."""

    @staticmethod
    def forward(ctx, student, labels, teacher_logits, ids, logprobs, log_rest, view, spec, ce_weight):  # type: ignore[override]
        teacher: torch.Tensor | TopKTargets = (
            teacher_logits if teacher_logits is not None else TopKTargets(ids, logprobs, log_rest)
        )
        need_grad = ctx.needs_input_grad[0]
        targets = labels != IGNORE_INDEX
        every = bool(targets.all())  # then every row's gradient is written: no zero fill needed
        num_tokens = student.shape[0]
        chunk = spec.chunk_size if spec.chunk_size > 0 else max(num_tokens, 1)
        forward_kl = spec.loss == "forward_kl" or (spec.loss == "jsd" and spec.beta == 0.0)
        dense = teacher_logits is not None and spec.top_k is None
        # the fused dense case compiled (plain logits over exactly the vocabulary: fused_loss_sums checked it)
        compiled = need_grad and spec.compiled and dense and forward_kl and ce_weight is not None
        grad = None  # one chunk of the compiled kernel: its gradient is the buffer
        if need_grad and not (compiled and every and chunk >= num_tokens):
            grad = torch.empty_like(student) if every else torch.zeros_like(student)
        kd_total = torch.zeros((), dtype=torch.float32, device=student.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            rows: torch.Tensor | slice
            if every:  # a slice: no copies of the chunk's logits
                rows = slice(start, end)
            else:
                rows = targets[start:end].nonzero().squeeze(1) + start
                if rows.numel() == 0:  # the same on every TP rank: the labels are
                    continue
            part = _teacher_rows(teacher, rows)
            if compiled:
                raw = student[rows] if isinstance(rows, slice) else student.index_select(0, rows)
                kd, ce, g = fused_dense_forward_kl(raw, part, labels[rows], ce_weight, spec.temperature)  # type: ignore[arg-type]
                if grad is None:
                    grad = g
                else:
                    _put(grad, rows, g)
                kd_total += kd
                ce_total += ce
                continue
            zs = student[rows].float() if isinstance(rows, slice) else student.index_select(0, rows).float()
            fused = None if ce_weight is None else (labels[rows], ce_weight)
            closed = None
            if need_grad and forward_kl:  # closed-form gradients
                out = grad[rows] if isinstance(rows, slice) and grad.dtype == torch.float32 else None  # type: ignore[index]
                if dense:
                    closed = dense_forward_kl(zs, part, view, spec.temperature, out, fused)  # type: ignore[arg-type]
                else:
                    if isinstance(part, torch.Tensor):
                        part = topk_targets(part, view, spec.top_k, spec.temperature)  # type: ignore[arg-type]
                    closed = topk_forward_kl(zs, part, view, spec.temperature, out, fused)  # type: ignore[arg-type]
            if need_grad and closed is not None:
                kd, ce, g = closed
                if out is None or g.data_ptr() != out.data_ptr():
                    _put(grad, rows, g)  # type: ignore[arg-type]
            elif need_grad:
                zs.requires_grad_(True)
                with torch.enable_grad():
                    kd = chunk_losses(zs, part, view, spec).sum()
                    ce = _cross_entropy(zs, fused)
                    loss = kd if ce is None else (1.0 - ce_weight) * kd + ce_weight * ce
                (g,) = torch.autograd.grad(loss, zs)
                _put(grad, rows, g)  # type: ignore[arg-type]
            else:
                kd, ce = chunk_losses(zs, part, view, spec).sum(), _cross_entropy(zs, fused)
            kd_total += kd.detach()
            if ce is not None:
                ce_total += ce.detach()
        if need_grad and grad is None:  # no tokens at all
            grad = torch.zeros_like(student)
        ctx.grad = grad
        loss = kd_total.clone() if ce_weight is None else (1.0 - ce_weight) * kd_total + ce_weight * ce_total
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_output, _ce, _kd):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("backward through the KD term ran twice for one forward (retain_graph is not supported)")
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None, None, None


def _cross_entropy(z: torch.Tensor, fused: tuple[torch.Tensor, float] | None) -> torch.Tensor | None:
    if fused is None:
        return None
    return torch.nn.functional.cross_entropy(z, fused[0], reduction="sum")


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
    return _apply(student_logits, labels, teacher, spec, vocab_size, None)[0]


def _apply(student_logits: Any, labels: torch.Tensor, teacher: Any, spec: KDSpec, vocab_size: int, ce_weight):
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
    return _ChunkedKD.apply(_flat(student_local), flat_labels, *args, view, spec, ce_weight)


def can_fuse(student_logits: Any, vocab_size: int) -> bool:
    """Whether ``fused_loss_sums`` applies: plain logits (not vocabulary-sharded) over exactly the
    vocabulary (the cross entropy spans every column; padding columns would be in it)."""
    return not isinstance(student_logits, DTensor) and student_logits.shape[-1] == vocab_size


def fused_loss_sums(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher: Any, spec: KDSpec, vocab_size: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((1 − α)·CE + α·KD, CE, KD)`` summed over the target tokens of one micro-batch in one pass over the
    logits (``closed_form``: at T = 1 the cross entropy reuses the KD term's softmax); only the first is
    differentiable. For logits where ``can_fuse`` holds; the same values as ``token_loss_sum`` and
    ``kd_loss_sum`` up to rounding."""
    if not can_fuse(student_logits, vocab_size):
        raise ValueError("fused_loss_sums needs plain logits over exactly the vocabulary (see can_fuse)")
    return _apply(student_logits, labels, teacher, spec, vocab_size, float(1.0 - alpha))


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
