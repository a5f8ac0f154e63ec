"""The KD losses against direct formulas on small tensors (one process, float64 references)."""

from __future__ import annotations

import math

import pytest
import torch

from flame.distill.divergences import LOSSES, KDSpec, TopKTargets, divergence, topk_targets
from flame.distill.losses import agreement_sums, kd_loss_sum
from flame.distill.vocab import VocabView

V = 11


def direct(p: torch.Tensor, q: torch.Tensor, loss: str, beta: float = 0.5) -> torch.Tensor:
    """The textbook formulas, per row, in float64."""
    p, q = p.double(), q.double()
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if loss == "forward_kl":
        return kl(p, q)
    if loss == "reverse_kl":
        return kl(q, p)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return 0.5 * (p - q).abs().sum(-1)


def logits(rows: int = 6, width: int = V, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_loss_equals_the_direct_formula_times_t_squared(loss, temperature):
    zs, zt = logits(seed=1), logits(seed=2)
    labels = torch.tensor([3, -100, 1, 4, -100, 0])
    spec = KDSpec(loss, temperature, beta=0.3, chunk_size=0)
    got = kd_loss_sum(zs, labels, zt, spec, vocab_size=V)
    p, q = torch.softmax(zt.double() / temperature, -1), torch.softmax(zs.double() / temperature, -1)
    keep = labels != -100
    want = temperature**2 * direct(p, q, loss, beta=0.3)[keep].sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    log_p, log_q = torch.log_softmax(logits(seed=3), -1), torch.log_softmax(logits(seed=4), -1)
    assert torch.equal(divergence(log_p, log_q, "jsd", 0.0), divergence(log_p, log_q, "forward_kl", 0.5))
    assert torch.equal(divergence(log_p, log_q, "jsd", 1.0), divergence(log_p, log_q, "reverse_kl", 0.5))
    # and in between it is TRL's generalized JSD, which vanishes like beta * KL near the ends
    small = divergence(log_p.double(), log_q.double(), "jsd", 1e-7)
    assert torch.allclose(small / 1e-7, divergence(log_p.double(), log_q.double(), "forward_kl", 0.5), rtol=1e-3)


@pytest.mark.parametrize("loss", LOSSES)
def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(loss):
    z = logits(seed=5).requires_grad_(True)
    labels = torch.arange(6) % V
    kd = kd_loss_sum(z, labels, z.detach().clone(), KDSpec(loss, 2.0, 0.5, chunk_size=4), vocab_size=V)
    kd.backward()
    assert abs(kd.item()) < 1e-6
    assert z.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_forward_kl_gradient_is_t_times_q_minus_p(temperature):
    """d/dz_S of T² KL(P_T‖Q_T) = T (Q_T − P_T): the T² factor cancels the 1/T² shrinkage of softened targets."""
    zs, zt = logits(seed=6).requires_grad_(True), logits(seed=7)
    labels = torch.zeros(6, dtype=torch.long)
    kd_loss_sum(zs, labels, zt, KDSpec("forward_kl", temperature), vocab_size=V).backward()
    want = temperature * (torch.softmax(zs.detach() / temperature, -1) - torch.softmax(zt / temperature, -1))
    assert torch.allclose(zs.grad, want, atol=1e-6)


def test_forward_kl_with_a_teacher_logit_of_minus_infinity():
    """A token the teacher rules out (logit -inf, P = 0) adds nothing to KL(P‖Q), and its gradient is T·Q."""
    zs, zt = logits(seed=8).requires_grad_(True), logits(seed=9)
    zt[:, 3] = float("-inf")
    labels = torch.zeros(6, dtype=torch.long)
    got = kd_loss_sum(zs, labels, zt, KDSpec("forward_kl", 2.0), vocab_size=V)
    got.backward()
    p, q = torch.softmax(zt / 2.0, -1), torch.softmax(zs.detach() / 2.0, -1)
    want = 4.0 * torch.where(p > 0, p * (p.log() - q.log()), torch.zeros(())).sum()
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(zs.grad, 2.0 * (q - p), atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_equals_autograd_of_the_direct_formula(loss):
    zs, zt = logits(seed=8).double().requires_grad_(True), logits(seed=9).double()
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    ours = zs.detach().float().requires_grad_(True)
    kd_loss_sum(ours, labels, zt.float(), KDSpec(loss, 2.0, 0.7, chunk_size=2), vocab_size=V).backward()
    keep = labels != -100
    ref = 4.0 * direct(torch.softmax(zt / 2, -1), torch.softmax(zs / 2, -1), loss, 0.7)[keep].sum()
    ref.backward()
    assert torch.allclose(ours.grad.double(), zs.grad, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("top_k", [None, 4])
def test_chunked_equals_unchunked(loss, top_k):
    zs, zt = logits(rows=37, seed=10), logits(rows=37, seed=11)
    labels = torch.randint(0, V, (37,), generator=torch.Generator().manual_seed(0))
    labels[::5] = -100
    results = []
    for chunk in (0, 1, 5, 16, 1000):
        z = zs.clone().requires_grad_(True)
        kd = kd_loss_sum(z, labels, zt, KDSpec(loss, 1.5, 0.4, top_k, chunk), vocab_size=V)
        kd.backward()
        results.append((kd.detach(), z.grad))
    for kd, grad in results[1:]:
        assert torch.allclose(kd, results[0][0], rtol=1e-6)
        assert torch.allclose(grad, results[0][1], atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_top_k_with_k_equal_to_the_vocabulary_is_the_dense_loss(loss):
    zs, zt = logits(seed=12), logits(seed=13)
    labels = torch.arange(6) % V
    values = []
    for top_k in (None, V):
        z = zs.clone().requires_grad_(True)
        kd = kd_loss_sum(z, labels, zt, KDSpec(loss, 2.0, 0.5, top_k), vocab_size=V)
        kd.backward()
        values.append((kd.detach(), z.grad))
    assert torch.allclose(values[0][0], values[1][0], rtol=1e-6)
    assert torch.allclose(values[0][1], values[1][1], atol=1e-6)


def test_top_k_is_the_divergence_of_the_coarsened_distributions():
    """k ids plus one bucket with the rest of the mass, for teacher and student alike."""
    zs, zt, k = logits(seed=14), logits(seed=15), 3
    labels = torch.zeros(6, dtype=torch.long)
    got = kd_loss_sum(zs, labels, zt, KDSpec("forward_kl", 1.0, 0.5, k), vocab_size=V)
    p, q = torch.softmax(zt.double(), -1), torch.softmax(zs.double(), -1)
    ids = p.topk(k, -1).indices
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    pc = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qc = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    assert got.item() == pytest.approx(direct(pc, qc, "forward_kl").sum().item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(("k", "size"), [(1, V), (4, V), (4, V - 3), (V, V)])
def test_top_k_forward_kl_gradient_equals_autograd_of_the_coarsened_formula(temperature, k, size):
    """The closed-form top-k gradient (T (s·Q − P) on the top ids, T (s·Q − P_rest·Q_rest) elsewhere, zero on
    padding columns) against float64 autograd of the divergence of the coarsened (k + 1)-way distributions,
    with -100 labels, chunks of 3 rows, padding columns (size < width) and k = the vocabulary (no rest)."""
    zs, zt = logits(rows=8, seed=30), logits(rows=8, seed=31)
    labels = torch.tensor([1, -100, 2, 3, -100, 4, 5, 0])
    ours = zs.clone().requires_grad_(True)
    got = kd_loss_sum(ours, labels, zt, KDSpec("forward_kl", temperature, 0.5, k, chunk_size=3), vocab_size=size)
    got.backward()
    ref = zs.double().requires_grad_(True)
    p = torch.softmax(zt.double()[:, :size] / temperature, -1)
    q = torch.softmax(ref[:, :size] / temperature, -1)
    ids = p.topk(k, -1).indices
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    pc = torch.cat([pk, (1 - pk.sum(-1, keepdim=True)).clamp_min(0)], -1)
    qc = torch.cat([qk, (1 - qk.sum(-1, keepdim=True)).clamp_min(1e-300)], -1)
    terms = torch.where(pc > 0, pc * (pc.clamp_min(1e-300).log() - qc.log()), torch.zeros((), dtype=pc.dtype))
    want = temperature**2 * terms.sum(-1)[labels != -100].sum()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(ours.grad.double(), ref.grad, atol=2e-6), (ours.grad - ref.grad).abs().max()
    assert not ours.grad[labels == -100].any() and not ours.grad[:, size:].any()


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_top_k_closed_form_equals_autograd_through_chunk_losses(loss):
    """The closed form the trainer takes (forward KL, and JSD at β = 0, which is defined as forward KL) and
    autograd through ``chunk_losses`` (the path of the other divergences) agree on value and gradient,
    for online targets and for cached ones whose rest bucket is empty (log_rest = -inf)."""
    from flame.distill.losses import chunk_losses

    zs, zt = logits(rows=7, seed=32), logits(rows=7, seed=33)
    labels = torch.zeros(7, dtype=torch.long)
    spec = KDSpec(loss, 2.0, 0.0, 3, chunk_size=4)
    full = topk_targets(zt, VocabView(V), 3, 2.0)
    empty_rest = TopKTargets(full.ids, torch.log_softmax(full.logprobs, -1), torch.full((7,), float("-inf")))
    for teacher in (zt, full, empty_rest):
        z = zs.clone().requires_grad_(True)
        kd = kd_loss_sum(z, labels, teacher, spec, vocab_size=V)
        kd.backward()
        ref = zs.clone().requires_grad_(True)
        targets = teacher if isinstance(teacher, TopKTargets) else full
        want = chunk_losses(ref, targets, VocabView(V), spec).sum()
        want.backward()
        assert kd.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(z.grad, ref.grad, atol=1e-6)


def test_top_k_when_the_students_rest_underflows():
    """Every logit outside the top-k 150 below the largest: exp underflows in fp32, so the closed form hands the
    chunk to autograd through ``chunk_losses``, which still gives the float64 value and gradient."""
    zt = logits(rows=4, seed=34)
    zs = torch.full((4, V), -150.0)
    ids = torch.softmax(zt, -1).topk(2, -1).indices
    zs.scatter_(-1, ids, torch.tensor([[1.0, 0.5]]).expand(4, 2).contiguous())
    labels = torch.zeros(4, dtype=torch.long)
    ours = zs.clone().requires_grad_(True)
    got = kd_loss_sum(ours, labels, zt, KDSpec("forward_kl", 1.0, 0.5, 2), vocab_size=V)
    got.backward()
    ref = zs.double().requires_grad_(True)
    p, log_q = torch.softmax(zt.double(), -1), torch.log_softmax(ref, -1)
    pk = p.gather(-1, ids)
    log_qk = log_q.gather(-1, ids)
    log_q_rest = torch.logsumexp(log_q.scatter(-1, ids, float("-inf")), -1)
    p_rest = 1 - pk.sum(-1)
    want = ((pk * (pk.log() - log_qk)).sum(-1) + p_rest * (p_rest.log() - log_q_rest)).sum()
    want.backward()
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(ours.grad.double(), ref.grad, atol=1e-5)


def test_top_k_targets_keep_a_tiny_rest_mass():
    """A teacher sure of one token (logit 50 against ten of 0): the rest mass, 10·e^-50, is summed, not
    taken as 1 − P_top (which is 0 in fp32)."""
    zt = torch.zeros(2, V)
    zt[:, 4] = 50.0
    targets = topk_targets(zt, VocabView(V), 1, 1.0)
    assert targets.ids[:, 0].tolist() == [4, 4]
    assert targets.log_rest.tolist() == pytest.approx([math.log(10) - 50] * 2, rel=1e-6)
    assert targets.logprobs[:, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_padded_vocabulary_rows_are_masked_out():
    """A teacher whose head is 4 rows wider than the tokenizer (an embedding padded for speed): the extra
    logits, however large, take no part in either softmax."""
    zs, zt = logits(seed=16), logits(seed=17)
    padded = torch.cat([zt, torch.full((6, 4), 30.0)], dim=-1)
    labels = torch.zeros(6, dtype=torch.long)
    for top_k in (None, 5):
        spec = KDSpec("forward_kl", 2.0, 0.5, top_k)
        wide_student = torch.cat([zs, torch.full((6, 4), -7.0)], dim=-1)
        a = kd_loss_sum(zs, labels, zt, spec, vocab_size=V)
        b = kd_loss_sum(wide_student, labels, padded, spec, vocab_size=V)
        assert torch.allclose(a, b, rtol=1e-6), (top_k, a, b)


def test_top_k_targets_round_trip_equals_online_top_k():
    """Targets computed once (what the cache stores) give the loss and gradient of online top-k KD."""
    zs, zt = logits(seed=18), logits(seed=19)
    labels = torch.tensor([1, 2, 3, -100, 4, 5])
    spec = KDSpec("reverse_kl", 2.0, 0.5, 4)
    targets = topk_targets(zt, VocabView(V), 4, 2.0)
    out = []
    for teacher in (zt, TopKTargets(targets.ids.clone(), targets.logprobs.clone(), targets.log_rest.clone())):
        z = zs.clone().requires_grad_(True)
        kd = kd_loss_sum(z, labels, teacher, spec, vocab_size=V)
        kd.backward()
        out.append((kd.detach(), z.grad))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


def test_agreement_sums_count_top1_and_kl():
    zs, zt = logits(seed=20), logits(seed=21)
    labels = torch.tensor([0, 1, -100, 2, 3, 4])
    sums = agreement_sums(zs, labels, zt, V, chunk_size=2)
    keep = labels != -100
    kl = direct(torch.softmax(zt.double(), -1), torch.softmax(zs.double(), -1), "forward_kl")[keep].sum()
    agree = (zs.argmax(-1) == zt.argmax(-1))[keep].sum()
    assert sums[0].item() == pytest.approx(kl.item(), rel=1e-5)
    assert sums[1].item() == agree.item()


def test_three_dimensional_logits_and_bf16_students():
    zs, zt = logits(rows=12, seed=22).view(2, 6, V), logits(rows=12, seed=23).view(2, 6, V)
    labels = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    flat = kd_loss_sum(zs.reshape(12, V), labels.reshape(12), zt.reshape(12, V), KDSpec(), V)
    assert torch.equal(kd_loss_sum(zs, labels, zt, KDSpec(), V), flat)
    half = zs.bfloat16().requires_grad_(True)
    kd_loss_sum(half, labels, zt.bfloat16(), KDSpec(), V).backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("loss", "top_k"), [("forward_kl", None), ("forward_kl", 3), ("jsd", None), ("reverse_kl", 3)])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_fused_cross_entropy_and_kd_equal_the_separate_terms(temperature, loss, top_k, alpha):
    """``fused_loss_sums`` (the trainer's path on plain logits: one pass for both terms; forward KL in closed
    form, the other divergences through autograd) against ``token_loss_sum`` + ``kd_loss_sum``: the same CE,
    KD, (1 − α)·CE + α·KD and gradient, with -100 labels and chunks of 4 rows."""
    from flame.components.loss import token_loss_sum
    from flame.distill.losses import can_fuse, fused_loss_sums

    zs, zt = logits(rows=14, seed=40).view(2, 7, V), logits(rows=14, seed=41).view(2, 7, V)
    labels = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    labels[0, 3] = labels[1, 0] = -100
    spec = KDSpec(loss, temperature, 0.0 if loss == "jsd" else 0.5, top_k, chunk_size=4)
    fused = zs.clone().requires_grad_(True)
    assert can_fuse(fused, V) and not can_fuse(fused, V - 1)
    total, ce, kd = fused_loss_sums(fused, labels, zt, spec, V, alpha)
    total.backward()
    assert not ce.requires_grad and not kd.requires_grad
    separate = zs.clone().requires_grad_(True)
    want_ce, want_kd = token_loss_sum(separate, labels), kd_loss_sum(separate, labels, zt, spec, V)
    ((1 - alpha) * want_ce + alpha * want_kd).backward()
    assert ce.item() == pytest.approx(want_ce.item(), rel=1e-6)
    assert kd.item() == pytest.approx(want_kd.item(), rel=1e-6)
    assert total.item() == pytest.approx(((1 - alpha) * want_ce + alpha * want_kd).item(), rel=1e-6)
    assert torch.allclose(fused.grad, separate.grad, atol=1e-6), (fused.grad - separate.grad).abs().max()


@pytest.mark.parametrize(
    ("temperature", "chunk", "dtype", "alpha"),
    [
        (1.0, 4, torch.float32, 0.3),
        (1.0, 0, torch.float32, 1.0),
        (2.0, 4, torch.float32, 0.3),
        (1.0, 0, torch.bfloat16, 0.5),
    ],
)
def test_the_compiled_fused_kernel_equals_the_eager_closed_form(temperature, chunk, dtype, alpha):
    """``--training.compile``: the fused dense forward KL + CE through ``torch.compile`` (one kernel per chunk,
    its gradient the buffer when one chunk spans the micro-batch) against the eager closed form: the same
    CE, KD and gradient (fp32: 1e-5 relative, 1e-6 absolute on the gradient; bf16 logits: the gradient
    rounded to bf16 either way, so one bf16 step), with -100 labels, several chunks and a teacher logit of
    -inf."""
    from flame.distill.losses import fused_loss_sums

    zs, zt = logits(rows=14, seed=50).view(2, 7, V).to(dtype), logits(rows=14, seed=51).view(2, 7, V).to(dtype)
    zt[1, 2, 4] = -math.inf
    labels = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    if chunk:
        labels[0, 3] = labels[1, 0] = -100
    grads, sums = [], []
    for compiled in (False, True):
        student = zs.clone().requires_grad_(True)
        spec = KDSpec("forward_kl", temperature, 0.5, None, chunk_size=chunk, compiled=compiled)
        total, ce, kd = fused_loss_sums(student, labels, zt, spec, V, alpha)
        total.backward()
        grads.append(student.grad)
        sums.append(torch.stack([total.detach(), ce, kd]))
    assert torch.allclose(sums[1], sums[0], rtol=1e-5), (sums[0], sums[1])
    assert grads[1].dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 2**-8 * grads[0].abs().max().item()
    assert torch.allclose(grads[1].float(), grads[0].float(), atol=atol), (
        (grads[1].float() - grads[0].float()).abs().max()
    )
