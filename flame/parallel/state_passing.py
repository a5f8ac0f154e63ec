"""Context parallelism for linear attention: state passing between sequence chunks.

The sequence layout is the one of ``flame.parallel.context_parallel`` (2·cp chunks, rank ``i`` holds
chunks ``i`` and ``2cp-1-i``). Linear attention needs no keys from other ranks, only the recurrent
state at the start of each chunk. A chunk's state map is affine, ``S_out = T(S_in) + S0`` (``S0``:
the chunk's end state from a zero start state; ``T``: its transition, a diagonal for GLA's gates, a
K x K matrix for the delta rules), so each layer:

1. runs the family's kernel on each local chunk from a zero state to get ``S0`` (and ``T``);
2. all-gathers ``(S0, T)`` of every chunk over the cp axis (one small differentiable collective) and
   folds them in global order into each chunk's start state (``start_states``);
3. runs the kernel again on the local chunks from those start states: the exact outputs.

The backward goes through the kernel calls, the fold and the all-gather (whose backward reduce-
scatters), so gradients equal the unsharded ones. Short convolutions before the kernel get the last
``kernel_size - 1`` inputs of the preceding chunk (``conv_with_halo``, a second small all-gather).

This module is the generic part: the active CP state (a context variable the wrapped ops read), chunk
bookkeeping, the fold, the convolution halo and ``apply_state_passing``. The op wrappers that know a
kernel's signature and state map live with their family (``flame/models/families/fla_gla.py``,
``fla_delta.py``), which install them around fla's ops; outside a CP layer every wrapper calls straight
through. Not covered: packed documents (``--training.varlen``) under CP, and decoding caches.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from flame.config.errors import ConfigError
from flame.parallel.context_parallel import CONTEXT_SHARD_ATTR

# Marks a function flame wrapped for state passing (installation is idempotent).
WRAPPED_ATTR = "__flame_context_parallel__"


@dataclass(frozen=True)
class CPState:
    """The cp mesh of the layer being run, as the wrapped ops see it."""

    mesh: DeviceMesh
    degree: int
    rank: int

    @property
    def own_chunks(self) -> tuple[int, int]:
        """Global indices of this rank's two chunks (head, tail)."""
        return self.rank, 2 * self.degree - 1 - self.rank


_ACTIVE: contextvars.ContextVar[CPState | None] = contextvars.ContextVar("flame_state_passing", default=None)


def active() -> CPState | None:
    """The CP state while a state-passing layer runs, else None (the wrapped ops then call straight through)."""
    return _ACTIVE.get()


def refuse(what: str) -> None:
    raise RuntimeError(f"state-passing context parallelism (flame/parallel/state_passing.py) does not support {what}")


def all_gather(x: torch.Tensor, state: CPState) -> torch.Tensor:
    """``x`` of every cp rank stacked on a new leading dim (rank-major), differentiable."""
    from torch.distributed import _functional_collectives as funcol

    gathered = funcol.all_gather_single_autograd(x.unsqueeze(0).contiguous(), 0, state.mesh.get_group())
    if isinstance(gathered, funcol.AsyncCollectiveTensor):
        gathered = gathered.wait()
    return gathered


def chunk_of(row: int, degree: int) -> int:
    """Global chunk index of row ``row`` of a rank-major gather of (head chunk, tail chunk) pairs."""
    rank, half = divmod(row, 2)
    return rank if half == 0 else 2 * degree - 1 - rank


def halves(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2C, ...]`` (this rank's two chunks side by side) -> ``[2B, C, ...]`` (chunks as batch rows)."""
    chunk = x.shape[1] // 2
    return torch.cat([x[:, :chunk], x[:, chunk:]], 0)


def unhalves(x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0] // 2
    return torch.cat([x[:batch], x[batch:]], 1)


def start_states(
    state: CPState,
    s0: torch.Tensor,
    transition: torch.Tensor,
    transition_shape: tuple[int, ...],
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The start state of this rank's two chunks (``[2B, H, K, V]``, as ``halves`` stacks them), from every
    chunk's zero-start end state ``s0`` (``[2B, H, K, V]``) and ``transition`` (``[2B, *transition_shape]``
    per chunk): chunk ``c`` starts from ``apply(T_{c-1}, start_{c-1}) + S0_{c-1}``, the first from zero."""
    batch = s0.shape[0] // 2
    heads, dk, dv = s0.shape[1:]
    packed = torch.cat([s0.float().flatten(1), transition.float().flatten(1)], 1).view(2, batch, -1)
    rows = all_gather(packed, state).flatten(0, 1)  # [cp * 2, B, H*K*V + prod(transition_shape)]
    by_chunk = {chunk_of(r, state.degree): rows[r] for r in range(rows.shape[0])}
    starts, carried = [], s0.new_zeros(batch, heads, dk, dv, dtype=torch.float32)
    for chunk in range(2 * state.degree):
        starts.append(carried)
        s0_c = by_chunk[chunk][:, : heads * dk * dv].view(batch, heads, dk, dv)
        transition_c = by_chunk[chunk][:, heads * dk * dv :].view(batch, *transition_shape)
        carried = apply(transition_c, carried) + s0_c
    head, tail = state.own_chunks
    return torch.cat([starts[head], starts[tail]], 0)


def conv_with_halo(forward: Callable) -> Callable:
    """Wrap a short causal convolution's ``forward(self, x, ...)`` (``self.kernel_size``; fla's
    ``ShortConvolution``): inside a CP layer each local chunk is extended by the last ``kernel_size - 1``
    inputs of the chunk before it (zeros for the first), gathered over the cp axis."""

    @functools.wraps(forward)
    def call(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = _ACTIVE.get()
        if state is None:
            return forward(self, x, *args, **kwargs)
        if args or kwargs.get("cache") is not None or kwargs.get("output_final_state"):
            refuse("convolution caches (decoding)")
        if kwargs.get("cu_seqlens") is not None or kwargs.get("mask") is not None:
            refuse("packed documents or padding masks in short convolutions")
        residual = kwargs.get("residual")
        halo = self.kernel_size[0] - 1
        batch = x.shape[0]
        x2 = halves(x)  # [2B, C, D]
        if halo == 0:
            y, _ = forward(self, x2)
        else:
            tails = all_gather(x2[:, -halo:].reshape(2, batch, halo, -1), state).flatten(0, 1)  # [2cp, B, halo, D]
            by_chunk = {chunk_of(r, state.degree): tails[r] for r in range(tails.shape[0])}

            def before(chunk: int) -> torch.Tensor:
                return by_chunk[chunk - 1] if chunk > 0 else torch.zeros_like(by_chunk[0])

            extended = torch.cat([torch.cat([before(c) for c in state.own_chunks], 0), x2], 1)
            y, _ = forward(self, extended)
            y = y[:, halo:]
        y = unhalves(y)
        return (y + residual if residual is not None else y), None

    setattr(call, WRAPPED_ATTR, True)
    return call


def recurrent_or_chunk(recurrent: Callable, cp_chunk: Callable) -> Callable:
    """fla's layers pick their recurrent op for short sequences: inside a CP layer use the chunk op's wrapper."""

    @functools.wraps(recurrent)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (cp_chunk if _ACTIVE.get() is not None else recurrent)(*args, **kwargs)

    return call


def wrap_ops(owner: Any, chunk_name: str, recurrent_name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.<chunk_name>`` by ``wrap(it)`` and route ``owner.<recurrent_name>`` to that wrapper
    inside CP layers (idempotent)."""
    chunk = getattr(owner, chunk_name)
    if getattr(chunk, WRAPPED_ATTR, False):
        return
    wrapped = wrap(chunk)
    setattr(wrapped, WRAPPED_ATTR, True)
    setattr(owner, chunk_name, wrapped)
    setattr(owner, recurrent_name, recurrent_or_chunk(getattr(owner, recurrent_name), wrapped))


def _inside_cp(forward: Callable, state: CPState) -> Callable:
    """``forward`` with the CP state visible to the wrapped ops it calls (also when it raises)."""

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        token = _ACTIVE.set(state)
        try:
            return forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return call


def apply_state_passing(model: nn.Module, layers: list[nn.Module], mesh: DeviceMesh, classes: tuple[str, ...]) -> None:
    """Run the linear-attention module (one of the class names ``classes``) of every decoder layer with
    state passing over the cp mesh; the family installed its op wrappers when it was imported."""
    state = CPState(mesh=mesh, degree=mesh.size(), rank=mesh.get_local_rank())
    for layer in layers:
        found = [m for m in layer.modules() if type(m).__name__ in classes]
        if len(found) != 1:
            raise ConfigError(
                f"context parallelism: decoder layer {type(layer).__name__} has {len(found)} linear-attention "
                f"modules of {classes} (flame's state passing expects one)"
            )
        found[0].forward = _inside_cp(found[0].forward, state)  # type: ignore[method-assign]
    setattr(model, CONTEXT_SHARD_ATTR, (mesh.size(), mesh.get_local_rank()))
