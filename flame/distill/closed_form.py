"""Forward KL (dense and top-k) with its gradient in closed form, optionally fused with the cross entropy.

``losses._ChunkedKD`` calls these per chunk of fp32 student logits ``[n, width]`` where the divergence is
forward KL (or JSD at β = 0, defined as forward KL): they return the chunk's KD sum and the gradient
with respect to the student's logits, the same value and, up to rounding, the same gradient as autograd
through ``divergences.divergence`` at a fraction of its cost. Written for large chunks on a CPU, where
each new tensor of that size costs its page faults as much as a pass over it: the gradient is built in
``out`` (the chunk's rows of the gradient buffer) in place when it is given.

**Fused cross entropy** (``ce = (labels, w)``): the training loss is (1 − α)·CE + α·KD; its gradient with
respect to the student's logits is (1 − α)(Q₁ − onehot) + α·G_KD, Q₁ the student's softmax at T = 1. At
T = 1 that softmax is the KD term's own Q, so the cross entropy costs two ``[n]`` gathers and a scatter
instead of a log-softmax pass and its backward; at T ≠ 1 one extra log-softmax is taken. The functions
then return the CE sum too and the gradient of ``(1 − w)·KD + w·CE``.

**Scratch buffers on a CPU.** The teacher's log-probabilities and probabilities of a chunk go into two
buffers kept between calls (``_scratch``): a fresh ``[n, width]`` tensor of 16 MiB or more comes from a
new ``mmap`` whose page faults cost as much as a pass over it, and whether glibc hands out fresh pages
or reused ones depends on what the process freed before (measured on 1,024 x 4,096: 24-27 ms with fresh
tensors, 11-12 ms with the buffers). They hold two chunks of fp32 logits, which the pass needs anyway.
On a GPU the caching allocator already reuses memory: no buffers are kept.

**Compiled** (``fused_dense_forward_kl``, with ``--training.compile``): the fused dense case as one
function of whole tensors that ``torch.compile`` turns into a few loops over the chunk (Triton kernels on
a GPU, vectorised C++ on a CPU): both softmaxes, the KL, the cross entropy and the gradient in about
three passes instead of a dozen, the dtype conversions included.
"""

from __future__ import annotations

import torch

from flame.components.loss import CompiledOnDemand
from flame.distill.divergences import TopKTargets, divergence
from flame.distill.vocab import VocabView

Fused = tuple[torch.Tensor, float] | None  # (the chunk's labels, the cross entropy's weight w) or None


_SCRATCH: dict[int, torch.Tensor] = {}


def _scratch(slot: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``like``'s shape and dtype: on a CPU a view of buffer ``slot``, kept
    between calls and grown when too small; elsewhere a new tensor."""
    if like.device.type != "cpu":
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    buffer = _SCRATCH.get(slot)
    if buffer is None or buffer.dtype != like.dtype or buffer.numel() < like.numel():
        buffer = _SCRATCH[slot] = torch.empty(like.numel(), dtype=like.dtype)
    return buffer[: like.numel()].view(like.shape)


def _onehot_sub(grad: torch.Tensor, labels: torch.Tensor, w: float) -> None:
    """``grad -= w · onehot(labels)`` in place."""
    grad.scatter_add_(-1, labels.unsqueeze(-1), torch.full((len(labels), 1), -w, dtype=grad.dtype, device=grad.device))


def _add_cross_entropy(grad: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, w: float) -> torch.Tensor:
    """``grad ← (1 − w)·grad + w·(softmax(z) − onehot)`` in place, for logits ``z`` at T = 1; the CE sum."""
    log_q = torch.log_softmax(z, dim=-1)
    ce = -log_q.gather(-1, labels.unsqueeze(-1)).sum()
    grad.mul_(1.0 - w).add_(log_q.exp_(), alpha=w)
    _onehot_sub(grad, labels, w)
    return ce


def _pad(grad: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``grad`` widened to the student's columns: dropped padding columns get a zero gradient."""
    if grad.shape[-1] == student.shape[-1]:
        return grad
    full = torch.zeros_like(student)
    full[:, : grad.shape[-1]] = grad
    return full


def dense_forward_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    view: VocabView,
    t: float,
    out: torch.Tensor | None = None,
    ce: Fused = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``T² Σ_rows KL(P‖Q)``, the CE sum (``None`` unless fused) and the gradient; ``T (Q − P)`` unfused.

    Two ``[n, width]`` tensors are allocated (log P and P); log Q is written into ``out`` when it has the
    chunk's shape (not sharded) and becomes the gradient there; the sum over the vocabulary reuses log
    P's buffer. Padding columns get no gradient (they are out of both softmaxes). Fusing needs logits
    over exactly the vocabulary (no padding columns, not sharded): the cross entropy spans every column."""
    zt = view.mask_padding(teacher.float())
    z1 = view.mask_padding(student)
    zs = z1 / t if t != 1.0 else z1
    zt = zt / t if t != 1.0 else zt
    if view.sharded:
        log_p = view.log_softmax(zt)
        p = torch.exp(log_p)
    else:  # into the scratch buffers (see the module docstring)
        log_p = torch.log_softmax(zt, dim=-1, out=_scratch(0, zt))
        p = torch.exp(log_p, out=_scratch(1, zt))
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
    ce_sum = None
    if ce is not None and t == 1.0:  # Q is the CE's softmax: (1 − w)(Q − P) + w(Q − onehot)
        labels, w = ce
        ce_sum = -log_q.gather(-1, labels.unsqueeze(-1)).sum()
        grad = log_q.exp_().sub_(p, alpha=1.0 - w)
        _onehot_sub(grad, labels, w)
        return total, ce_sum, _pad(grad, student)
    grad = log_q.exp_().sub_(p)  # Q − P, in place (log Q is not needed any more)
    if padding is not None:
        grad.masked_fill_(padding, 0.0)
    if t != 1.0:
        grad.mul_(t)
    if ce is not None:
        ce_sum = _add_cross_entropy(grad, z1, *ce)
    return total, ce_sum, _pad(grad, student)


def _fused_dense_kernel(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, w: float, t: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dense_forward_kl`` fused with the cross entropy, on logits over exactly the vocabulary, written as
    whole-tensor operations for ``torch.compile``: ``(T² Σ KL(P‖Q), CE sum, gradient in the student's dtype)``,
    the gradient that of ``(1 − w)·KD + w·CE``."""
    z1 = student.float()
    zs = z1 / t if t != 1.0 else z1
    zt = teacher.float() / t if t != 1.0 else teacher.float()
    log_p = torch.log_softmax(zt, dim=-1)
    log_q = torch.log_softmax(zs, dim=-1)
    p, q = torch.exp(log_p), torch.exp(log_q)
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum() * (t * t)  # a teacher logit of -inf adds nothing
    log_q1 = log_q if t == 1.0 else torch.log_softmax(z1, dim=-1)
    ce = -log_q1.gather(-1, labels.unsqueeze(-1)).sum()
    onehot = torch.zeros_like(z1).scatter_(-1, labels.unsqueeze(-1), 1.0)
    q1 = q if t == 1.0 else torch.exp(log_q1)
    grad = (1.0 - w) * t * (q - p) + w * (q1 - onehot)
    return kl, ce, grad.to(student.dtype)


# ``--training.compile``'s kernel: the student's logits in their own dtype (converted inside), the gradient
# in that dtype; compiled at the first call, dynamic in the number of tokens and in ``w``
fused_dense_forward_kl = CompiledOnDemand(_fused_dense_kernel)


def topk_forward_kl(
    student: torch.Tensor,
    targets: TopKTargets,
    view: VocabView,
    t: float,
    out: torch.Tensor | None = None,
    ce: Fused = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """Top-k forward KL against the teacher's ``targets`` (the coarsened distributions of ``divergences``),
    the CE sum (``None`` unless fused) and the gradient; ``None`` in the rare case it cannot be computed
    this way (below): the caller then differentiates through ``losses.chunk_losses``.

    Categories: the k ids S and the rest R; s = Σ_c P_c (1 up to the teacher's rounding), Q the student's
    softmax, Q^R its softmax over the ids outside S: ``d/dz_v = T (s·Q_v − P_v)`` on S and
    ``T (s·Q_v − P_R·Q^R_v)`` elsewhere. One exponential e = exp(z − max z) serves everything: its columns
    at S are taken out (gathered, then zeroed exactly by adding their negatives), so the rest's sum Z_R
    is summed, not obtained by a subtraction that would cancel when the top-k hold nearly all the mass;
    Q = e / Z and Q^R = e / Z_R. Where the whole rest underflows (every logit outside S more than ~100
    below the largest) while the teacher puts mass there, ``None``."""
    z1 = view.mask_padding(student)
    zs = z1 / t if t != 1.0 else z1
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
    total = divergence(log_p, log_q, "forward_kl", 0.0).sum() * (t * t)
    s_over_z = (p_top.sum(dim=-1) + p_rest) / total_sum
    rest_coef = torch.where(rest_sum > 0, p_rest / torch.where(rest_sum > 0, rest_sum, 1.0), 0.0)
    off, on = s_over_z - rest_coef, s_over_z.unsqueeze(-1) * e_top - p_top  # off S: s·Q − P_R·Q^R; on S: s·Q − P
    ce_sum = None
    if ce is not None and t == 1.0:  # Q = e / Z is the CE's softmax: add w(Q − onehot), scale the KD by 1 − w
        labels, w = ce
        ce_sum = (m + log_total - zs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()
        off = (1.0 - w) * off + w / total_sum
        on = (1.0 - w) * on + (w / total_sum).unsqueeze(-1) * e_top
    grad = e.mul_(off.unsqueeze(-1))
    grad.scatter_add_(-1, local, torch.where(inside, on, torch.zeros_like(on)))
    if ce is not None and t == 1.0:
        _onehot_sub(grad, ce[0], ce[1])
    else:
        if t != 1.0:
            grad.mul_(t)
        if ce is not None:
            ce_sum = _add_cross_entropy(grad, z1, *ce)
    return total, ce_sum, _pad(grad, student)
