"""Context parallelism (CP): every sequence is split over the ``cp`` mesh axis.

Layout (load balancing): a sequence of ``L`` tokens is cut into ``2 * cp`` chunks of ``L / (2 cp)``
tokens; CP rank ``i`` holds chunks ``i`` and ``2 cp - 1 - i`` (torch's "head-tail" layout), so every
rank has the same share of the causal attention work. The trainer shards each batch with
``ContextParallel.shard`` before the forward: token ids, labels and positions. The positions are the
*global* ones (so rotary embeddings are those of the unsharded sequence; with ``--training.varlen``
the per-document positions). The data loader gives every CP rank of a data-parallel replica the
same full batch, so a rank also knows the document boundaries of the whole row without any
communication. Everything outside attention is per token and runs on the shard as it is; the loss is
summed over the shard and reduced over the dp x cp ranks like a data-parallel loss. Parameters are
replicated over CP: FSDP2 shards them and reduces their gradients over the flattened
``dp_shard x cp`` axis ("fsdp" in torchtitan's ParallelDims).

Two attention paths; ``choose_path`` picks one per run and the choice is logged:

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

fla's GLA, Gated DeltaNet and DeltaNet take a third path, state passing (``flame/models/fla_context_parallel.py``): same
layout and sharding, no K/V exchange. The other fla families have no CP (fla 0.6.0's model layers take
no CP context) and are refused at config time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from flame.config.errors import ConfigError

logger = logging.getLogger("flame.models")

ALLGATHER_ATTENTION = "flame_cp"
RING_ATTENTION = "flame_cp_ring"
_STATE_ATTR = "_flame_context_parallel"
# Set on a model under CP: (cp degree, cp rank), for code that computes positions itself (pipeline stages).
CONTEXT_SHARD_ATTR = "_flame_context_shard"


# ---- layout ----------------------------------------------------------------------------------------


def shard_indices(seq_len: int, cp_degree: int, cp_rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global token indices held by ``cp_rank``: chunks ``cp_rank`` and ``2 cp - 1 - cp_rank`` of ``2 cp``."""
    chunk = seq_len // (2 * cp_degree)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (2 * cp_degree - 1 - cp_rank) * chunk
    return torch.cat([head, torch.arange(tail_start, tail_start + chunk, device=device)])


def gathered_order(seq_len: int, cp_degree: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global index of each position of a rank-major all-gather of the shards."""
    return torch.cat([shard_indices(seq_len, cp_degree, r, device) for r in range(cp_degree)])


# ---- config-time checks and the choice of path ---------------------------------------------------------


def uses_sliding_window(model_config: Any) -> bool:
    """Whether any attention layer of this config has a sliding window."""
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types
    return getattr(model_config, "sliding_window", None) is not None and getattr(
        model_config, "use_sliding_window", True
    )


def choose_path(device_type: str, varlen: bool, sliding_window: bool, rotate_method: str) -> tuple[str, str]:
    """``("ring" | "allgather", why)`` for this run; ConfigError for a rotate method the path cannot use."""
    if device_type != "cuda":
        why = "flame's all-gather attention (no CUDA device; torch's ring attention has no CPU kernels)"
    elif varlen:
        why = "flame's all-gather attention (varlen document masks; torch's ring attention is plain causal)"
    elif sliding_window:
        why = "flame's all-gather attention (sliding-window layers; torch's ring attention is plain causal)"
    else:
        return "ring", f"torch's ring attention on CUDA (K/V rotation: {rotate_method})"
    if rotate_method != "allgather":
        raise ConfigError(
            f"--experimental.context_parallel_rotate_method {rotate_method}: this run uses {why}, which "
            "all-gathers K/V; 'alltoall' (torch's ring rotation) applies to plain causal attention on CUDA only; "
            "use allgather"
        )
    return "allgather", why


def context_parallel_problems(config: Any, device_type: str) -> list[str]:
    """What makes ``--experimental.context_parallel_degree`` impossible for ``config`` (empty if fine)."""
    from flame.models.adapters import FLA_MODEL_TYPES, adapter_for, context_parallel_families
    from flame.models.build import _declared_model_type

    t, e = config.training, config.experimental
    cp, tp = e.context_parallel_degree, t.tensor_parallel_degree
    problems = []
    if t.seq_len % (2 * cp):
        problems.append(
            f"--training.seq_len {t.seq_len} is not divisible by 2 x --experimental.context_parallel_degree = "
            f"{2 * cp}: context parallelism cuts every sequence into 2 x cp chunks (rank i holds chunks i and "
            "2cp-1-i, which balances the causal attention work)"
        )
    elif tp > 1 and (t.seq_len // cp) % tp:
        problems.append(
            f"--training.seq_len {t.seq_len}: each context-parallel rank holds {t.seq_len // cp} tokens, which "
            f"sequence parallelism cannot split over --training.tensor_parallel_degree {tp}; use a seq_len "
            f"divisible by {2 * cp * tp}"
        )
    rotate = e.context_parallel_rotate_method
    if rotate == "alltoall" and device_type != "cuda":
        problems.append(
            "--experimental.context_parallel_rotate_method alltoall is torch's ring attention, which passes K/V "
            "shards rank to rank on CUDA; on this machine (no CUDA device) context parallelism runs flame's "
            "all-gather attention: use allgather"
        )
    elif rotate == "alltoall" and t.varlen:
        problems.append(
            "--experimental.context_parallel_rotate_method alltoall does not apply with --training.varlen: "
            "document masks need flame's all-gather attention (torch's ring attention is plain causal); use allgather"
        )
    model_type = _declared_model_type(config.model.config) if config.model.config else ""
    if model_type and adapter_for(model_type).cp_state_passing:
        problems.extend(_state_passing_problems(config, cp))
    elif model_type and not adapter_for(model_type).context_parallel:
        if model_type in FLA_MODEL_TYPES:
            problems.append(
                f"--experimental.context_parallel_degree {cp}: fla model family {model_type!r} has no context-"
                "parallel path (fla 0.6.0's model layers take no CP context); fla families with flame's "
                f"state-passing CP: {', '.join(n for n in context_parallel_families() if n in FLA_MODEL_TYPES)}"
            )
        else:
            problems.append(
                f"--experimental.context_parallel_degree {cp}: model family {model_type!r} is not known to route "
                "its attention through transformers' AttentionInterface, which context parallelism replaces; "
                f"families with context parallelism: {', '.join(context_parallel_families())}"
            )
    return problems


def _state_passing_problems(config: Any, cp: int) -> list[str]:
    """What fla's state-passing CP (flame/models/fla_context_parallel.py) cannot do."""

    t, e = config.training, config.experimental
    problems = []
    if t.varlen:
        problems.append(
            f"--training.varlen with --experimental.context_parallel_degree {cp}: flame's context parallelism for "
            "fla models passes one recurrent state per row between the chunks and has no document boundaries; "
            "train fla models with varlen without CP, or CP without varlen"
        )
    if e.context_parallel_rotate_method != "allgather":
        problems.append(
            f"--experimental.context_parallel_rotate_method {e.context_parallel_rotate_method}: fla models pass "
            "recurrent states between the chunks (no K/V rotation); leave it at allgather"
        )
    from transformers import AutoConfig

    from flame.models.build import _declared_model_type, import_family

    try:
        import_family(_declared_model_type(config.model.config))
        model = AutoConfig.from_pretrained(config.model.config).to_dict()
    except (OSError, ValueError, ConfigError):
        return problems  # reported with its reason when the model is built
    chunk = t.seq_len // (2 * cp)
    width = int(model.get("conv_size", 4))
    if model.get("use_short_conv") and chunk < width - 1:
        problems.append(
            f"--training.seq_len {t.seq_len}: chunks of {chunk} tokens are shorter than the model's short "
            f"convolution needs from the chunk before ({width - 1}); use seq_len >= {2 * cp * (width - 1)}"
        )
    return problems


# ---- attention --------------------------------------------------------------------------------------


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
    """torch's ring attention (CUDA) for this rank's shard: plain causal attention, no mask."""
    from torch.distributed.tensor import DTensor, Shard

    _unsupported(kwargs)
    if attention_mask is not None or sliding_window is not None:
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


# ---- batches ----------------------------------------------------------------------------------------


class ContextParallel:
    """Shards the data loader's batches over the cp axis and turns a shard into model inputs."""

    def __init__(self, mesh: DeviceMesh, path: str, device: torch.device) -> None:
        self.mesh, self.path, self.device = mesh, path, device
        self.degree, self.rank = mesh.size(), mesh.get_local_rank()

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a full ``[batch, L]`` batch: ``input_ids``, ``labels``, global
        ``position_ids`` and, for varlen rows, the segment (document piece) ids of the local tokens
        and of the whole row, from which ``model_inputs`` builds the document mask."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        rows, seq_len = input_ids.shape
        varlen = "position_ids" in batch
        positions = batch["position_ids"] if varlen else torch.arange(seq_len).expand(rows, seq_len)
        if self.path == "ring":
            from torch.distributed.tensor.experimental._attention import (
                _context_parallel_shard,
                _HeadTailLoadBalancer,
            )

            # torch's own sharding also tells its ring attention that the layout is load-balanced
            buffers = [t.to(self.device) for t in (input_ids, labels, positions.contiguous())]
            balancer = _HeadTailLoadBalancer(seq_len, self.degree, self.device)
            ids, lab, pos = _context_parallel_shard(self.mesh, buffers, [1, 1, 1], balancer)
            return {"input_ids": ids, "labels": lab, "position_ids": pos}  # type: ignore[dict-item]
        index = shard_indices(seq_len, self.degree, self.rank)
        out = {"input_ids": input_ids[:, index], "labels": labels[:, index], "position_ids": positions[:, index]}
        if varlen:
            segments = torch.cumsum(batch["position_ids"] == 0, dim=1)  # a segment starts at position 0
            out["segment_ids"] = segments[:, index]
            out["key_segment_ids"] = segments
        return out

    def model_inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """forward() keyword arguments for a shard from ``shard`` (all but the labels)."""
        inputs: dict[str, Any] = {
            "input_ids": batch["input_ids"].to(device, non_blocking=True),
            "position_ids": batch["position_ids"].to(device, non_blocking=True),
        }
        if "key_segment_ids" in batch:
            query = batch["segment_ids"].to(device, non_blocking=True)
            key = batch["key_segment_ids"].to(device, non_blocking=True)
            inputs["attention_mask"] = (query[:, :, None] == key[:, None, :])[:, None]  # [batch, 1, L/cp, L]
        return inputs
