"""A pure-PyTorch path for flash-linear-attention (fla) models on the CPU.

fla 0.6.0 runs its layers only as Triton kernels, which need a GPU. For some fla families flame
supplies PyTorch implementations of the pieces their layers call — the gated-linear-attention
recurrence (chunked, exact), the (gated) delta rule, fla's fused RMSNorm and gated RMSNorm, its short
causal convolution and its SwiGLU — and ``patch`` installs them behind a device check: tensors on the
CPU take the PyTorch code, tensors on a GPU take fla's kernels unchanged. So a GLA model trains on a
laptop (slowly: these are references, not kernels), and tensor and context parallelism of fla layers
are checked here with real processes on gloo.

Gated DeltaNet's recurrence runs step by step (a loop over the sequence), so keep its CPU runs short.

Which fla function each reference replaces is the family's business: the family modules in
``flame/models/families/`` patch their lists when flame imports fla (the adapter's ``on_import``);
patching is idempotent and changes nothing for CUDA tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------- GLA
def _gla_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float, h: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence batch ``[B, T, H, *]`` of gated linear attention from state ``h`` ``[B, H, K, V]``.

    Recurrence: ``h_t = diag(exp(g_t)) h_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T h_t``; computed
    chunk by chunk with the cumulative log-gates, exact up to float rounding (fp32 inside)."""
    dtype = q.dtype
    q, k, v, g = (x.float().transpose(1, 2) for x in (q, k, v, g))  # [B, H, T, *]
    h = h.float()
    T = q.shape[2]
    outputs = []
    for start in range(0, T, chunk):
        qc, kc, vc, gc = (x[:, :, start : start + chunk] for x in (q, k, v, g))
        G = gc.cumsum(2)  # [B, H, C, K] log-decay from the chunk start up to and including t
        C = G.shape[2]
        # inter-chunk: what the carried state contributes to every position of the chunk
        o = torch.einsum("bhck,bhkv->bhcv", qc * G.exp() * scale, h)
        # intra-chunk: sum over j <= i of (q_i * k_j * exp(G_i - G_j)) v_j, masked before exp
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        diff = G[:, :, :, None, :] - G[:, :, None, :, :]  # [B, H, C(i), C(j), K]
        diff = diff.masked_fill(~causal[None, None, :, :, None], float("-inf"))
        scores = torch.einsum("bhik,bhjk,bhijk->bhij", qc * scale, kc, diff.exp())
        o = o + scores @ vc
        outputs.append(o)
        last = G[:, :, -1:, :]  # [B, H, 1, K]
        h = h * last.squeeze(2).exp()[..., None] + torch.einsum("bhck,bhcv->bhkv", kc * (last - G).exp(), vc)
    return torch.cat(outputs, 2).transpose(1, 2).to(dtype), h


def gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    reverse: bool = False,
    chunk_size: int = 64,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_gla`` / ``fused_recurrent_gla`` in PyTorch: inputs ``[B, T, H, K|V]``, log-gates ``g``
    (or ``gk``) like ``k``; ``initial_state`` ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``);
    ``cu_seqlens`` for documents packed in one row (``B == 1``). Returns ``(o, final_state or None)``."""
    g = gk if g is None else g
    if g is None or gv is not None or reverse:
        raise ValueError("the CPU path of fla's GLA takes key gates only (no gv, no reverse)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, _, H, K = q.shape
    V = v.shape[-1]
    bounds = (
        [(0, q.shape[1])]
        if cu_seqlens is None
        else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    )
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs a batch of one row, got {B}")
    h0 = initial_state
    if h0 is not None and state_v_first:
        h0 = h0.transpose(-1, -2)
    outputs, finals = [], []
    for n, (start, end) in enumerate(bounds):
        rows = slice(n, n + 1) if cu_seqlens is not None else slice(None)
        h = h0[rows] if h0 is not None else q.new_zeros(q.shape[0] if cu_seqlens is None else 1, H, K, V)
        piece = slice(start, end)
        o, h = _gla_chunk(q[:, piece], k[:, piece], v[:, piece], g[:, piece], scale, h, chunk_size)
        outputs.append(o)
        finals.append(h)
    o = torch.cat(outputs, 1)
    if not output_final_state:
        return o, None
    final = torch.cat(finals, 0)
    return o, final.transpose(-1, -2) if state_v_first else final


# ---------------------------------------------------------------------------------- Gated DeltaNet
def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _gated_delta_steps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, H, *]`` fp32 inputs (``q`` already scaled), state ``h`` ``[B, H, K, V]``:
    ``h <- exp(g_t) h``; ``h <- h + k_t (beta_t (v_t - h^T k_t))^T``; ``o_t = h^T q_t``."""
    outputs = []
    for t in range(q.shape[1]):
        h = h * g[:, t].exp()[..., None, None]
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], h)
        h = h + k[:, t, :, :, None] * (beta[:, t, :, None] * error)[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], h))
    return torch.stack(outputs, 1), h


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` in PyTorch, with the options
    fla's GatedDeltaNet layer uses: q/k L2 norm, ``beta = sigmoid(b)`` (``2 sigmoid(b)`` with negative
    eigenvalues), the gate ``-exp(A_log) softplus(a + dt_bias)``, grouped value heads (value head ``j``
    reads q/k head ``j // (HV / H)``), per-document ``cu_seqlens`` and initial/final states."""
    dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("use_gate_in_kernel needs A_log")
        g = -A_log.float().exp() * F.softplus(g + (dt_bias.float() if dt_bias is not None else 0.0))
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    heads, value_heads = q.shape[2], v.shape[2]
    if value_heads != heads:
        q, k = (x.repeat_interleave(value_heads // heads, dim=2) for x in (q, k))
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    K, V = q.shape[-1], v.shape[-1]
    bounds = (
        [(0, q.shape[1])]
        if cu_seqlens is None
        else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    )
    h0 = initial_state.transpose(-1, -2) if initial_state is not None and state_v_first else initial_state
    outputs, finals = [], []
    for n, (start, end) in enumerate(bounds):
        rows = slice(n, n + 1) if cu_seqlens is not None else slice(None)
        rows_count = 1 if cu_seqlens is not None else q.shape[0]
        h = h0[rows].float() if h0 is not None else q.new_zeros(rows_count, value_heads, K, V)
        piece = slice(start, end)
        o, h = _gated_delta_steps(q[:, piece], k[:, piece], v[:, piece], g[:, piece], beta[:, piece], h)
        outputs.append(o)
        finals.append(h)
    o = torch.cat(outputs, 1).to(dtype)
    if not output_final_state:
        return o, None
    final = torch.cat(finals, 0)
    return o, final.transpose(-1, -2) if state_v_first else final


def delta_rule_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` (DeltaNet): the gated delta rule
    without a gate; ``beta`` comes in after its sigmoid."""
    return gated_delta_rule_reference(q, k, v, torch.zeros_like(beta, dtype=torch.float32), beta, **kwargs)


# ------------------------------------------------------------------------------------ fla modules
def _rms(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None, in_fp32: bool) -> torch.Tensor:
    if residual is None:
        return x.float() if in_fp32 else x
    return x.float() + residual.float() if in_fp32 else x + residual


def rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    """``fla.modules.RMSNorm.forward`` in PyTorch (optionally adding ``residual`` first; ``prenorm``
    also returns the sum)."""
    summed = _add_residual(x, residual, residual_in_fp32)
    y = _rms(summed, self.weight, self.bias, self.eps).to(x.dtype)
    return (y, summed) if prenorm else y


def rms_norm_gated_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    """``fla.modules.FusedRMSNormGated.forward`` in PyTorch: ``rmsnorm(x) * act(g)``."""
    summed = _add_residual(x, residual, residual_in_fp32)
    y = _rms(summed, self.weight, self.bias, self.eps)
    gate = g.float()
    y = y * (torch.sigmoid(gate) if self.activation == "sigmoid" else F.silu(gate))
    y = y.to(x.dtype)
    return (y, summed) if prenorm else y


def short_convolution_forward(
    self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **_: Any
):
    """``fla.modules.ShortConvolution.forward`` in PyTorch: a depthwise causal convolution over ``[B, T, D]``
    per document (``cu_seqlens``), optionally continuing from ``cache`` ``[N, D, W]``; returns ``(y, cache)``."""
    width = self.kernel_size[0]
    if mask is not None:
        x = x * mask[..., None]
    bounds = (
        [(0, x.shape[1])]
        if cu_seqlens is None
        else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    )
    outputs, states = [], []
    for n, (start, end) in enumerate(bounds):
        seg = x[:, start:end].transpose(1, 2)  # [B, D, T]
        if cu_seqlens is not None:
            past = cache[n : n + 1, :, 1:] if cache is not None else seg.new_zeros(1, seg.shape[1], width - 1)
        else:
            past = cache[:, :, 1:] if cache is not None else seg.new_zeros(seg.shape[0], seg.shape[1], width - 1)
        extended = torch.cat([past.to(seg.dtype), seg], 2)
        y = F.conv1d(extended, self.weight, self.bias, groups=self.weight.shape[0])
        if self.activation in ("silu", "swish"):
            y = F.silu(y)
        outputs.append(y.transpose(1, 2))
        states.append(
            extended[:, :, -width:] if extended.shape[2] >= width else F.pad(extended, (width - extended.shape[2], 0))
        )
    y = torch.cat(outputs, 1)
    if residual is not None:
        y = y + residual
    return y, (torch.cat(states, 0) if output_final_state else None)


def causal_conv1d_reference(
    x,
    weight=None,
    bias=None,
    residual=None,
    initial_state=None,
    output_final_state=False,
    activation=None,
    cu_seqlens=None,
    **unused: Any,
):
    """``fla.modules.convolution.causal_conv1d`` in PyTorch (weight ``[D, W]``), as ShortConvolution."""
    if weight is None:
        raise ValueError("the CPU path of fla's causal_conv1d needs a weight")

    class _Conv:  # the attributes short_convolution_forward reads
        kernel_size = (weight.shape[-1],)

    conv = _Conv()
    conv.weight, conv.bias, conv.activation = weight.unsqueeze(1), bias, activation  # type: ignore[attr-defined]
    return short_convolution_forward(
        conv, x, residual=residual, cache=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens
    )


def swiglu_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.silu(x.float()).to(x.dtype) * y


def swiglu_linear_reference(x, y, weight, bias):
    return F.linear(swiglu_reference(x, y), weight, bias)


# ------------------------------------------------------------------------------------ installation
def _on_cpu(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _dispatch(original: Callable, reference: Callable, first_tensor: Callable[..., Any]) -> Callable:
    """``reference`` for CPU tensors, ``original`` (fla's kernel) otherwise."""

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _on_cpu(first_tensor(*args, **kwargs)):
            return reference(*args, **kwargs)
        return original(*args, **kwargs)

    call.__flame_reference__ = True  # type: ignore[attr-defined]
    return call


def op_input(*args: Any, **kwargs: Any) -> Any:
    """The tensor that decides the device of an fla op call ``op(q, k, v, ...)``."""
    return args[0] if args else kwargs.get("q")


def method_input(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The tensor that decides the device of an fla module's ``forward(self, x, ...)``."""
    return args[0] if args else kwargs.get("x")


def first_input(*args: Any, **kwargs: Any) -> Any:
    """The tensor that decides the device of a function ``f(x, ...)``."""
    return args[0] if args else kwargs.get("x")


def patch(owner: Any, name: str, reference: Callable, first_tensor: Callable[..., Any]) -> None:
    """Route ``owner.<name>`` to ``reference`` for CPU tensors (idempotent)."""
    original = getattr(owner, name)
    if getattr(original, "__flame_reference__", False):
        return
    setattr(owner, name, _dispatch(original, reference, first_tensor))
