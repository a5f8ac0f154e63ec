"""Context parallelism for fla's GLA, Gated DeltaNet and DeltaNet: state passing between sequence chunks.

The sequence layout is the one of ``flame.models.context_parallel`` (2·cp chunks, rank ``i`` holds
chunks ``i`` and ``2cp-1-i``). Linear attention needs no keys from other ranks, only the recurrent
state at the start of each chunk. For GLA the state map of a chunk is affine,
``S_out = diag(D) S_in + S0`` (``D``: the product of the chunk's gates, ``S0``: the chunk's state
from zero), so each layer:

1. runs fla's GLA kernel on each local chunk from a zero state to get ``S0`` (and ``D`` from the gates);
2. all-gathers ``(S0, D)`` of every chunk over the cp axis (one small differentiable collective:
   ``[2 cp, batch, heads, K·V + K]``) and folds them in global order into each chunk's start state;
3. runs the kernel again on the local chunks from those start states: the exact outputs.

The backward goes through both kernel calls, the fold and the all-gather (whose backward reduce-
scatters), so gradients equal the unsharded ones. The cost is two kernel calls per layer instead of
one, and no K/V traffic. Short convolutions before the kernel get the last ``conv_size - 1`` inputs of
the preceding chunk (a second small all-gather). The same code runs on fla's Triton kernels (CUDA)
and on flame's PyTorch path (CPU, ``flame/models/fla_reference.py``), which is how it is tested.
Gated DeltaNet's (and DeltaNet's) state map is affine too, with a full matrix instead of a diagonal
(``gated_delta_state_passing``): one more kernel call per layer gets it. Not covered: packed documents (``--training.varlen``) under CP, and decoding caches.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from flame.models.context_parallel import CONTEXT_SHARD_ATTR


@dataclass(frozen=True)
class _State:
    mesh: DeviceMesh
    degree: int
    rank: int


_ACTIVE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("flame_fla_cp", default=None)
_INSTALLED = False


def _all_gather(x: torch.Tensor, state: _State) -> torch.Tensor:
    """``x`` of every cp rank stacked on a new leading dim (rank-major), differentiable."""
    from torch.distributed import _functional_collectives as funcol

    gathered = funcol.all_gather_single_autograd(x.unsqueeze(0).contiguous(), 0, state.mesh.get_group())
    if isinstance(gathered, funcol.AsyncCollectiveTensor):
        gathered = gathered.wait()
    return gathered


def _chunk_of(row: int, degree: int) -> int:
    """Global chunk index of row ``row`` of a rank-major gather of (head chunk, tail chunk) pairs."""
    rank, half = divmod(row, 2)
    return rank if half == 0 else 2 * degree - 1 - rank


def _halves(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2C, ...]`` (this rank's two chunks side by side) -> ``[2B, C, ...]`` (chunks as batch rows)."""
    chunk = x.shape[1] // 2
    return torch.cat([x[:, :chunk], x[:, chunk:]], 0)


def _unhalves(x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0] // 2
    return torch.cat([x[:batch], x[batch:]], 1)


def _refuse(what: str) -> None:
    raise RuntimeError(f"fla context parallelism (flame/models/fla_context_parallel.py) does not support {what}")


def gla_state_passing(chunk_gla: Callable) -> Callable:
    """Wrap an fla GLA op (``chunk_gla`` / ``fused_recurrent_gla`` signature) so that inside a CP layer
    it computes the outputs of the whole sequence by state passing; outside one it is the op itself."""

    @functools.wraps(chunk_gla)
    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = _ACTIVE.get()
        if state is None:
            return chunk_gla(q, k, v, *args, **kwargs)
        if args:
            _refuse("positional arguments after q, k, v")
        gate = kwargs.pop("g", None)
        gate = kwargs.pop("gk", None) if gate is None else gate
        if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
            _refuse("recurrent-state caches (decoding)")
        if kwargs.get("cu_seqlens") is not None:
            _refuse("packed documents (cu_seqlens)")
        if kwargs.get("gv") is not None:
            _refuse("value gates (gv)")
        scale = kwargs.get("scale")
        batch = q.shape[0]
        q2, k2, v2, g2 = (_halves(x) for x in (q, k, v, gate))
        _, s0 = chunk_gla(q2, k2, v2, g=g2, scale=scale, output_final_state=True)  # [2B, H, K, V]
        heads, dk, dv = s0.shape[1:]
        decay = g2.float().sum(1).exp()  # [2B, H, K]: the product of the chunk's gates
        packed = torch.cat([s0.float().flatten(1), decay.flatten(1)], 1).view(2, batch, -1)
        rows = _all_gather(packed, state).flatten(0, 1)  # [cp * 2, B, H*K*V + H*K]
        by_chunk = {_chunk_of(r, state.degree): rows[r] for r in range(rows.shape[0])}
        starts, carried = [], s0.new_zeros(batch, heads, dk, dv, dtype=torch.float32)
        for chunk in range(2 * state.degree):
            starts.append(carried)
            s0_c = by_chunk[chunk][:, : heads * dk * dv].view(batch, heads, dk, dv)
            decay_c = by_chunk[chunk][:, heads * dk * dv :].view(batch, heads, dk)
            carried = decay_c[..., None] * carried + s0_c
        h0 = torch.cat([starts[state.rank], starts[2 * state.degree - 1 - state.rank]], 0)
        o2, _ = chunk_gla(q2, k2, v2, g=g2, scale=scale, initial_state=h0, output_final_state=False)
        return _unhalves(o2), None

    call.__flame_context_parallel__ = True  # type: ignore[attr-defined]
    return call


def gated_delta_state_passing(op: Callable) -> Callable:
    """Wrap fla's (gated) delta rule op (Gated DeltaNet, DeltaNet) for CP. Its chunk state map is affine with a full
    matrix, ``S_out = P S_in + S0`` (``P``: the product of the chunk's ``exp(g_t) (I - beta_t k_t k_t^T)``),
    so besides ``S0`` (the chunk from a zero state) each rank gets ``P`` from one more call of the same
    op, with zero values and the identity as start state (the op is linear in values and state); then
    fold and rerun as for GLA: three calls per layer."""

    @functools.wraps(op)
    def call(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        g: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        gate = {} if g is None else {"g": g}  # DeltaNet's op has no gate
        state = _ACTIVE.get()
        if state is None:
            return op(q=q, k=k, v=v, beta=beta, **gate, **kwargs)
        if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
            _refuse("recurrent-state caches (decoding)")
        if kwargs.get("cu_seqlens") is not None:
            _refuse("packed documents (cu_seqlens)")
        kwargs = {**kwargs, "state_v_first": False, "output_final_state": True}
        batch = q.shape[0]
        q2, k2, v2, b2 = (_halves(x) for x in (q, k, v, beta))
        gate = {name: _halves(x) for name, x in gate.items()}
        _, s0 = op(q=q2, k=k2, v=v2, beta=b2, **gate, **kwargs)  # [2B, HV, K, V]
        heads, dk, dv = s0.shape[1:]
        eye = torch.eye(dk, device=q.device, dtype=torch.float32).expand(2 * batch, heads, dk, dk).contiguous()
        zeros = v2.new_zeros(*v2.shape[:-1], dk)
        _, transition = op(q=q2, k=k2, v=zeros, beta=b2, **gate, **{**kwargs, "initial_state": eye})  # [2B, HV, K, K]
        packed = torch.cat([s0.float().flatten(1), transition.float().flatten(1)], 1).view(2, batch, -1)
        rows = _all_gather(packed, state).flatten(0, 1)
        by_chunk = {_chunk_of(r, state.degree): rows[r] for r in range(rows.shape[0])}
        starts, carried = [], s0.new_zeros(batch, heads, dk, dv, dtype=torch.float32)
        for chunk in range(2 * state.degree):
            starts.append(carried)
            s0_c = by_chunk[chunk][:, : heads * dk * dv].view(batch, heads, dk, dv)
            p_c = by_chunk[chunk][:, heads * dk * dv :].view(batch, heads, dk, dk)
            carried = p_c @ carried + s0_c
        h0 = torch.cat([starts[state.rank], starts[2 * state.degree - 1 - state.rank]], 0)
        o2, _ = op(q=q2, k=k2, v=v2, beta=b2, **gate, **{**kwargs, "initial_state": h0, "output_final_state": False})
        return _unhalves(o2), None

    call.__flame_context_parallel__ = True  # type: ignore[attr-defined]
    return call


def _conv_with_halo(forward: Callable) -> Callable:
    """Wrap ``ShortConvolution.forward``: inside a CP layer each local chunk is extended by the last
    ``kernel_size - 1`` inputs of the chunk before it (zeros for the first), gathered over the cp axis."""

    @functools.wraps(forward)
    def call(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = _ACTIVE.get()
        if state is None:
            return forward(self, x, *args, **kwargs)
        if args or kwargs.get("cache") is not None or kwargs.get("output_final_state"):
            _refuse("convolution caches (decoding)")
        if kwargs.get("cu_seqlens") is not None or kwargs.get("mask") is not None:
            _refuse("packed documents or padding masks in short convolutions")
        residual = kwargs.get("residual")
        halo = self.kernel_size[0] - 1
        batch = x.shape[0]
        x2 = _halves(x)  # [2B, C, D]
        if halo == 0:
            y, _ = forward(self, x2)
        else:
            tails = _all_gather(x2[:, -halo:].reshape(2, batch, halo, -1), state).flatten(0, 1)  # [2cp, B, halo, D]
            by_chunk = {_chunk_of(r, state.degree): tails[r] for r in range(tails.shape[0])}

            def before(chunk: int) -> torch.Tensor:
                return by_chunk[chunk - 1] if chunk > 0 else torch.zeros_like(by_chunk[0])

            mine = (state.rank, 2 * state.degree - 1 - state.rank)
            extended = torch.cat([torch.cat([before(c) for c in mine], 0), x2], 1)
            y, _ = forward(self, extended)
            y = y[:, halo:]
        y = _unhalves(y)
        return (y + residual if residual is not None else y), None

    call.__flame_context_parallel__ = True  # type: ignore[attr-defined]
    return call


def install() -> None:
    """Put the CP-aware wrappers around fla's GLA ops and short convolution (idempotent; outside a CP
    layer they call straight through)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from flame.models import fla_reference

    fla_reference.install()  # the wrappers call the device dispatch underneath
    gla_layer: Any = importlib.import_module("fla.layers.gla")
    modules: Any = importlib.import_module("fla.modules")
    # (fla layer module, its chunk op, its recurrent op, the state-passing wrapper)
    for layer, chunk_name, recurrent_name, wrap in (
        (gla_layer, "chunk_gla", "fused_recurrent_gla", gla_state_passing),
        (
            "fla.layers.gated_deltanet",
            "chunk_gated_delta_rule",
            "fused_recurrent_gated_delta_rule",
            gated_delta_state_passing,
        ),
        ("fla.layers.delta_net", "chunk_delta_rule", "fused_recurrent_delta_rule", gated_delta_state_passing),
    ):
        owner: Any = importlib.import_module(layer) if isinstance(layer, str) else layer
        chunk = getattr(owner, chunk_name)
        if not getattr(chunk, "__flame_context_parallel__", False):
            wrapped = wrap(chunk)
            setattr(owner, chunk_name, wrapped)
            setattr(owner, recurrent_name, _recurrent_or_cp(getattr(owner, recurrent_name), wrapped))
    conv = modules.ShortConvolution.forward
    if not getattr(conv, "__flame_context_parallel__", False):
        modules.ShortConvolution.forward = _conv_with_halo(conv)
    _INSTALLED = True


def _recurrent_or_cp(recurrent: Callable, cp_chunk: Callable) -> Callable:
    """fla's GLA layer picks the recurrent op for short sequences: inside a CP layer use the chunk op."""

    @functools.wraps(recurrent)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (cp_chunk if _ACTIVE.get() is not None else recurrent)(*args, **kwargs)

    return call


def _inside_cp(forward: Callable, state: _State) -> Callable:
    """``forward`` with the CP state visible to the wrapped ops it calls (also when it raises)."""

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        token = _ACTIVE.set(state)
        try:
            return forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return call


LINEAR_ATTENTION_CLASSES = ("GatedLinearAttention", "GatedDeltaNet", "DeltaNet")


def linear_attention_modules(layer: nn.Module) -> list[nn.Module]:
    """The fla linear-attention modules (GLA, Gated DeltaNet) of a decoder layer."""
    return [m for m in layer.modules() if type(m).__name__ in LINEAR_ATTENTION_CLASSES]


def apply_fla_context_parallel(model: nn.Module, layers: list[nn.Module], mesh: DeviceMesh) -> None:
    """Run every GLA attention module of ``layers`` with state passing over the cp mesh."""
    from flame.config.errors import ConfigError

    install()
    state = _State(mesh=mesh, degree=mesh.size(), rank=mesh.get_local_rank())
    for layer in layers:
        found = linear_attention_modules(layer)
        if len(found) != 1:
            raise ConfigError(
                f"context parallelism: decoder layer {type(layer).__name__} has {len(found)} fla linear-attention "
                f"modules of {LINEAR_ATTENTION_CLASSES} (flame's state passing expects one)"
            )
        found[0].forward = _inside_cp(found[0].forward, state)  # type: ignore[method-assign]
        if hasattr(found[0], "_use_fused_qkv_conv"):  # each convolution through ShortConvolution (the halo)
            setattr(found[0], "_use_fused_qkv_conv", lambda *args, **kwargs: False)  # noqa: B010
    setattr(model, CONTEXT_SHARD_ATTR, (mesh.size(), mesh.get_local_rank()))
