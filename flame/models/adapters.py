"""Model-family adapters: the few facts about a family that parallelisation needs.

The trainer never asks ``hasattr`` questions of a model; it asks the adapter of the model's
family. The generic adapter covers Hugging Face decoders laid out as ``<base>.layers`` (Llama,
Qwen, Mistral, GPT-NeoX-style and fla models); families that differ register their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flame.config.errors import ConfigError


@dataclass(frozen=True)
class ModelAdapter:
    """How one model family is laid out."""

    family: str
    layers_attr: str = "layers"
    # Tensor-parallel plan of one decoder layer: submodule name -> "colwise" | "rowwise" (None: no TP).
    tp_plan: dict[str, str] | None = None

    def decoder(self, model: nn.Module) -> nn.Module:
        """The backbone that holds the decoder layers (``model.model`` for HF causal LMs)."""
        prefix = getattr(model, "base_model_prefix", "model")
        base = getattr(model, prefix, None)
        if base is None or not isinstance(getattr(base, self.layers_attr, None), nn.ModuleList):
            raise ConfigError(
                f"model family {self.family!r} ({type(model).__name__}) has no `{prefix}.{self.layers_attr}` "
                "list of decoder layers; register a ModelAdapter for it in flame/models/adapters.py"
            )
        return base

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers: the units of sharding, checkpointing and compilation."""
        return getattr(self.decoder(model), self.layers_attr)

    def model_inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The forward() keyword arguments for one batch from the data loader (all but ``labels``)."""
        return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}

    def layer_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of the decoder layers, in order."""
        prefix = getattr(model, "base_model_prefix", "model")
        return [f"{prefix}.{self.layers_attr}.{name}" for name, _ in self.layers(model).named_children()]


_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(model_type: str, adapter: ModelAdapter) -> None:
    """Use ``adapter`` for configs whose ``model_type`` is ``model_type``."""
    _ADAPTERS[model_type] = adapter


def _register_builtin() -> None:
    from flame.models.tensor_parallel import LLAMA_LAYER_PLAN

    for model_type in ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite"):
        register_adapter(model_type, ModelAdapter(family=model_type, tp_plan=LLAMA_LAYER_PLAN))


_register_builtin()


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter registered for ``model_type``, else the generic one."""
    return _ADAPTERS.get(model_type, ModelAdapter(family=model_type))
