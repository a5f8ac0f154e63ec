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

Two attention paths (``flame/parallel/cp_attention.py``); ``choose_path`` picks one per run and the
choice is logged: flame's all-gather attention (CPU or any device; varlen documents; sliding windows)
and torch's ring attention (CUDA, plain causal attention).

fla's GLA, Gated DeltaNet and DeltaNet take a third path, state passing (``flame/parallel/state_passing.py``): same
layout and sharding, no K/V exchange. The other fla families have no CP (fla 0.6.0's model layers take
no CP context) and are refused at config time.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from flame.config.errors import ConfigError

logger = logging.getLogger("flame.parallel")

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


# ---- the choice of path ---------------------------------------------------------


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
