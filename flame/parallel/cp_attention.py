"""Context-parallel softmax attention: the two attention functions CP swaps into transformers' models.

The sequence layout is ``flame.parallel.context_parallel``'s (2·cp load-balanced chunks).

* ``allgather`` (flame's own; CPU or any device; varlen documents; sliding windows): the attention
  function registered with transformers as ``flame_cp`` all-gathers K and V over the cp axis (one
  differentiable collective per layer, whose backward reduce-scatters the K/V gradients), puts them
  in global order and runs sdpa for the local queries against every key, masked by the global
  query/key indices: causal, the sliding window if the layer has one, and the documents of packed
  rows. Each rank holds the full K/V of one layer at a time.
* ``ring`` (CUDA, plain causal attention): torch's context-parallel sdpa
  (``torch.distributed.tensor.experimental``), applied as torchtitan applies it: q/k/v become DTensors
  sharded on the sequence and sdpa dispatches to torch's ring attention (flash / memory-efficient /
  cuDNN kernels). ``--experimental.context_parallel_rotate_method`` picks how K/V shards move there:
  ``allgather`` gathers them once per layer, ``alltoall`` passes them round the ring rank to rank
  (overlapping communication with compute). torch's ring attention has no CPU kernels and takes no
  attention mask, so CPU runs, varlen documents and sliding-window layers use the all-gather path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from flame.config.errors import ConfigError
from flame.parallel.context_parallel import CONTEXT_SHARD_ATTR, gathered_order, shard_indices

ALLGATHER_ATTENTION = "flame_cp"
RING_ATTENTION = "flame_cp_ring"
_STATE_ATTR = "_flame_context_parallel"


@dataclass(frozen=True)
class _State:
    """What a CP attention function needs from the module it runs in."""

    mesh: DeviceMesh
    degree: int
    rank: int

    @property
    def group(self):
        return self.mesh.get_group()


def attach(module: nn.Module, mesh: DeviceMesh) -> None:
    """Give an attention module the cp mesh its CP attention function gathers over."""
    setattr(module, _STATE_ATTR, _State(mesh=mesh, degree=mesh.size(), rank=mesh.get_local_rank()))


def _state(module: nn.Module) -> _State:
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(
            f"context-parallel attention called in {type(module).__name__}, which apply_context_parallel did not set up"
        )
    return state


def _unsupported(kwargs: dict[str, Any]) -> None:
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"context-parallel attention does not implement {name!r}")


def _gather_kv(key: torch.Tensor, value: torch.Tensor, state: _State) -> tuple[torch.Tensor, torch.Tensor]:
    """Full K and V ``[batch, kv_heads, L, head_dim]`` in global order, from every rank's shard.

    One all-gather of K and V stacked, along a leading sequence dim; its autograd backward
    reduce-scatters the gradient, so each rank gets the sum of every rank's gradient for its shard."""
    from torch.distributed import _functional_collectives as funcol

    local_len = key.shape[2]
    kv = torch.stack([key, value]).movedim(3, 0).contiguous()  # [L_local, 2, batch, heads, dim]
    gathered = funcol.all_gather_single_autograd(kv, 0, state.group)
    if isinstance(gathered, funcol.AsyncCollectiveTensor):
        gathered = gathered.wait()
    restore = gathered_order(local_len * state.degree, state.degree, key.device).argsort()
    full = gathered.index_select(0, restore).movedim(0, 3)  # [2, batch, heads, L, dim]
    return full[0], full[1]


def allgather_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of this rank's queries (``[batch, heads, L/cp, head_dim]``, the shard's tokens) over the
    whole sequence; returns ``[batch, L/cp, heads, head_dim]`` as transformers' attention functions do.

    ``attention_mask``: None, or a boolean ``[batch | 1, 1, L/cp, L]`` restricting which keys (global
    order) each local query may see: the documents of packed rows. Causality and the sliding window
    come from the global indices of the shard's tokens. K/V heads fewer than query heads (GQA) are
    handled by sdpa.
    """
    _unsupported(kwargs)
    state = _state(module)
    key, value = _gather_kv(key, value, state)
    seq_len = key.shape[2]
    q_index = shard_indices(seq_len, state.degree, state.rank, query.device)
    distance = q_index[:, None] - torch.arange(seq_len, device=query.device)[None, :]
    mask = distance >= 0
    if sliding_window is not None:
        mask &= distance < sliding_window  # as transformers' sliding_window_overlay
    if attention_mask is not None:
        mask = mask & attention_mask
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _enable_ring(rotate_method: str) -> None:
    """Turn on torch's CP dispatch of sdpa on DTensors (process-wide) with ``rotate_method``."""
    from torch.distributed.tensor.experimental._attention import (
        _enable_context_parallel_dispatcher,
        set_rotate_method,
    )

    set_rotate_method(rotate_method)
    _enable_context_parallel_dispatcher()


def ring_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # fmt: skip
    """torch's ring attention (CUDA) for this rank's shard: plain causal attention, no mask (transformers'
    attention-function arguments, as ``allgather_attention``; a ``sliding_window`` keyword is refused)."""
    from torch.distributed.tensor import DTensor, Shard

    _unsupported(kwargs)
    if attention_mask is not None or kwargs.get("sliding_window") is not None:
        raise RuntimeError("torch's ring attention takes neither an attention mask nor a sliding window")
    state = _state(module)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # the ring kernels expect as many K/V heads as query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q, k, v = (DTensor.from_local(t.contiguous(), state.mesh, [Shard(2)], run_check=False) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    local = out.to_local() if isinstance(out, DTensor) else out
    return local.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register both attention functions with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ALLGATHER_ATTENTION, allgather_attention)
    AttentionInterface.register(RING_ATTENTION, ring_attention)


def attention_modules(layer: nn.Module) -> list[nn.Module]:
    """The attention modules of a Hugging Face decoder layer (they carry ``is_causal`` and the config)."""
    return [m for m in layer.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]


def apply_context_parallel(
    model: nn.Module, layers: list[nn.Module], mesh: DeviceMesh, path: str, rotate_method: str
) -> None:
    """Switch the model's attention to the CP function of ``path`` and give every attention module the
    cp mesh. (Runs on the meta-device model; the switch is the config's attention implementation.)"""
    register_attention()
    for layer in layers:
        found = attention_modules(layer)
        if len(found) != 1:
            raise ConfigError(
                f"context parallelism: decoder layer {type(layer).__name__} has {len(found)} attention modules "
                "(expected one that calls transformers' AttentionInterface)"
            )
        attach(found[0], mesh)
    model.config._attn_implementation = RING_ATTENTION if path == "ring" else ALLGATHER_ATTENTION  # type: ignore[union-attr]
    setattr(model, CONTEXT_SHARD_ATTR, (mesh.size(), mesh.get_local_rank()))
    if path == "ring":
        _enable_ring(rotate_method)
