"""Model-family adapters: the few facts about a family that parallelisation needs, and their registry.

The trainer never asks ``hasattr`` questions of a model; it asks the adapter of the model's
family. The generic adapter covers Hugging Face decoders laid out as ``<base>.layers`` (Llama,
Qwen, Mistral, GPT-NeoX-style and fla models). The families flame knows more about register their
adapter from one module each in ``flame/models/families/`` (importing that package registers them
all); a custom model's package may call ``register_adapter`` too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flame.config.errors import ConfigError
from flame.data.varlen import block_causal_mask, cu_seqlens_from_position_ids

logger = logging.getLogger("flame.models")
_LOGGED_ROUTES: set[str] = set()  # varlen routes already announced in this process


@dataclass(frozen=True)
class ModelAdapter:
    """How one model family is laid out, and what flame's generic machinery needs to know about it."""

    family: str
    layers_attr: str = "layers"
    # Tensor-parallel plan of one decoder layer: submodule name -> style (flame/parallel/tensor_parallel.py;
    # None: no TP).
    tp_plan: dict[str, str] | None = None
    # The sizes tensor parallelism splits, by config field name (None: the generic fields of the config).
    tp_dims: Callable[[Any], dict[str, int | None]] | None = None
    # Forward of one pipeline stage: (stage model, tokens or hidden states, is_first, is_last) -> output
    # (None: the family cannot be pipelined).
    stage_forward: Callable[[nn.Module, torch.Tensor, bool, bool], torch.Tensor] | None = None
    # Module whose import registers the family's classes with the Auto classes; flame imports it before
    # AutoConfig reads a config of this family ("" : transformers knows the family itself).
    registered_by: str = ""
    # Called once that module is imported: installs the family's CPU paths and context-parallel wrappers.
    on_import: Callable[[], None] | None = None
    # Device types the family's kernels run on: a clear error elsewhere instead of a kernel crash.
    device_types: tuple[str, ...] = ("cpu", "cuda")
    # The built model's attention implementation (config._attn_implementation): picks the varlen route.
    attn_implementation: str = ""
    # "fla" when the family's layers take packed documents as fla's ``cu_seqlens`` ("": from the attention
    # implementation, see ``varlen_route``).
    varlen: str = ""
    # Whether the family's kernels take plain tensors only (fla's Triton norms and convolutions): under
    # tensor parallelism its norms and convolutions then run on local shards, not on DTensors.
    tp_local_kernels: bool = False
    # Run on each decoder layer before tensor or state-passing context parallelism (fla: one convolution
    # per projection instead of the fused three-way kernel).
    prepare_layer: Callable[[nn.Module], None] | None = None
    # Whether the family has context parallelism: through transformers' AttentionInterface, whose attention
    # function CP swaps (flame/parallel/context_parallel.py), or by state passing (below).
    context_parallel: bool = False
    # Class names of the layers' linear-attention modules that context parallelism runs with state passing
    # between sequence chunks (flame/parallel/state_passing.py); empty: attention CP, if any.
    state_passing_modules: tuple[str, ...] = ()
    # Why the family has no context parallelism, for the refusal (empty: the generic reason).
    no_context_parallel: str = ""
    # How many layers use softmax attention, for FLOP counting (None: every layer; flame/models/flops.py).
    softmax_attention_layers: Callable[[Any], int] | None = None

    @property
    def cp_state_passing(self) -> bool:
        """Context parallelism by passing linear-attention states between sequence chunks."""
        return bool(self.state_passing_modules)

    def with_model(self, model: nn.Module) -> ModelAdapter:
        """This adapter, knowing the attention implementation of the built ``model``."""
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
        return dataclasses.replace(self, attn_implementation=str(impl))

    def varlen_route(self) -> str:
        """How packed documents are kept apart in attention: "fla" (fla layers' ``cu_seqlens``),
        "flash" (flash-attention varlen kwargs), "sdpa" (boolean block mask) or "eager" (additive mask)."""
        impl = self.attn_implementation
        if self.varlen:
            return self.varlen
        if "flash" in impl:  # flash_attention_2/3 and kernels-hub flash-attn builds
            return "flash"
        if impl in ("sdpa", "eager", ""):
            return impl or "sdpa"
        raise ConfigError(
            f"--training.varlen: attention implementation {impl!r} of model family {self.family!r} has no "
            "route that keeps packed documents apart; use sdpa or eager (CPU/GPU) or flash_attention_2 (GPU)"
        )

    def decoder(self, model: nn.Module) -> nn.Module:
        """The backbone that holds the decoder layers (``model.model`` for HF causal LMs)."""
        prefix = getattr(model, "base_model_prefix", "model")
        base = getattr(model, prefix, None)
        # A ModuleDict once pipeline parallelism kept only a stage's layers (under their original indices).
        if base is None or not isinstance(getattr(base, self.layers_attr, None), (nn.ModuleList, nn.ModuleDict)):
            raise ConfigError(
                f"model family {self.family!r} ({type(model).__name__}) has no `{prefix}.{self.layers_attr}` "
                "list of decoder layers; register a ModelAdapter for it (a module in flame/models/families/)"
            )
        return base

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers (iterate with ``.children()``): the units of sharding, checkpointing and compilation."""
        return getattr(self.decoder(model), self.layers_attr)

    def model_inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """The forward() keyword arguments for one batch from the data loader (all but ``labels``).

        A varlen batch (it has ``position_ids``, see ``flame.data.varlen``) gets the document
        boundaries in the form this family's attention takes them (``varlen_route``):

        * sdpa/eager: a 4-D ``[batch, 1, L, L]`` block-diagonal causal mask (boolean for sdpa,
          additive float for eager) plus per-document ``position_ids``; ``position_ids`` alone do
          not stop sdpa attending across documents;
        * flash: the batch flattened to one row with ``cu_seq_lens_q/k``, ``max_length_q/k`` and
          ``position_ids`` (flash_attn_varlen);
        * fla: the batch flattened to one row with fla's ``cu_seqlens``.

        Flattened routes return logits of shape ``[1, batch * L, vocab]``; ``labels.flatten()``
        lines up with them as with ``[batch, L, vocab]``.
        """
        if "position_ids" not in batch:
            return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
        route = self.varlen_route()
        if route not in _LOGGED_ROUTES:
            _LOGGED_ROUTES.add(route)
            logger.info("varlen attention route: %s (model family %s)", _ROUTE_TEXT[route], self.family)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        if route in ("sdpa", "eager"):
            mask = block_causal_mask(position_ids)
            if route == "eager":  # eager attention adds the mask to the scores
                mask = torch.zeros(mask.shape, device=device).masked_fill_(~mask, torch.finfo(torch.float32).min)
            return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
        cu = batch.get("cu_seqlens")
        cu = cu_seqlens_from_position_ids(position_ids) if cu is None else cu.to(device, non_blocking=True)
        flat = {"input_ids": input_ids.reshape(1, -1)}
        if route == "fla":
            return {**flat, "cu_seqlens": cu.long()}
        max_length = int((cu[1:] - cu[:-1]).max())
        return {
            **flat,
            "position_ids": position_ids.reshape(1, -1),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_length,
            "max_length_k": max_length,
        }

    def layer_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of the decoder layers, in order."""
        prefix = getattr(model, "base_model_prefix", "model")
        return [f"{prefix}.{self.layers_attr}.{name}" for name, _ in self.layers(model).named_children()]


_ROUTE_TEXT = {
    "sdpa": "sdpa with a boolean block-diagonal causal mask [batch, 1, L, L] and per-document position_ids",
    "eager": "eager attention with an additive block-diagonal causal mask [batch, 1, L, L] and per-document "
    "position_ids",
    "flash": "flash-attention varlen (cu_seq_lens_q/k, max_length_q/k) on the flattened batch",
    "fla": "fla layers' cu_seqlens on the flattened batch",
}

_ADAPTERS: dict[str, ModelAdapter] = {}
_FAMILIES_REGISTERED = False  # set by flame.models.families once its modules have registered


def register_adapter(model_type: str, adapter: ModelAdapter) -> None:
    """Use ``adapter`` for configs whose ``model_type`` is ``model_type`` (a later call replaces it)."""
    _ADAPTERS[model_type] = adapter


def families_registered() -> None:
    """Called by ``flame.models.families`` when every built-in family has registered."""
    global _FAMILIES_REGISTERED
    _FAMILIES_REGISTERED = True


def _registry() -> dict[str, ModelAdapter]:
    # The generic layers never import the families (they are above them): the callers that look a family
    # up (the trainer, the dry run, validation, conversion) import flame.models.families first.
    if not _FAMILIES_REGISTERED:
        raise RuntimeError("no model families are registered: import flame.models.families before looking one up")
    return _ADAPTERS


def tensor_parallel_families() -> list[str]:
    """Model types whose adapter has a tensor-parallel plan."""
    return [name for name, adapter in _registry().items() if adapter.tp_plan is not None]


def context_parallel_families() -> list[str]:
    """Model types whose adapter allows context parallelism."""
    return [name for name, adapter in _registry().items() if adapter.context_parallel]


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter registered for ``model_type``, else the generic one."""
    return _registry().get(model_type, ModelAdapter(family=model_type))
