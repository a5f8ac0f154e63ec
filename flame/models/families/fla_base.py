"""flash-linear-attention (fla) families: every model type fla registers, and what its families share.

fla's kernels are Triton kernels, so by default an fla family trains on CUDA only, with neither tensor
nor context parallelism (fla 0.6.0's model layers take no CP context). The families flame has more for
(a CPU path, a TP plan, state-passing CP) replace their entry from their own module (``fla_gla``,
``fla_delta``), built with ``cpu_path_adapter`` and the pieces below that they share: fla's GatedMLP
plan, its MLP width formula, the common CPU-path installs (norms, short convolution, SwiGLU) and the
short convolution's context-parallel halo.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from flame.models import fla_reference as ref
from flame.models.adapters import ModelAdapter, register_adapter
from flame.parallel.state_passing import WRAPPED_ATTR, conv_with_halo
from flame.parallel.tensor_parallel import tp_dims

# Model types that flash-linear-attention 0.6.0 registers on `import fla` (a test keeps this list equal to
# fla's). Their layers run fla's Triton kernels (some also need the flash-attn package): CUDA only. Note that
# fla registers "mamba", "mamba2" and "bitnet" over transformers' own classes of those names: in flame those
# model types always mean fla's implementations, whatever else was imported.
FLA_MODEL_TYPES = (
    "abc", "bitnet", "cat", "comba", "cyclic_flow_attention", "delta_net", "deltaformer",
    "forgetting_transformer", "gated_deltanet", "gated_deltaproduct", "gla", "gsa", "hgrn", "hgrn2", "kda",
    "lightnet", "linear_attn", "log_linear_mamba2", "mamba", "mamba2", "mamba3", "mesa_net", "mla", "moba",
    "mom", "nsa", "parallax", "path_attn", "precond_gated_deltanet", "precond_kda", "raven", "retnet",
    "rodimus", "rwkv6", "rwkv7", "samba", "stickbreaking_attn", "transformer", "wall_transformer", "yoco",
)  # fmt: skip

# fla families whose token mixers are linear attention / recurrent / state-space (no L x L scores).
LINEAR_ATTENTION_TYPES = {
    "gla", "delta_net", "gated_deltanet", "mamba", "mamba2", "hgrn", "hgrn2", "gsa", "rwkv6", "rwkv7",
    "retnet", "abc", "linear_attn", "lightnet", "mesa_net", "comba",
}  # fmt: skip

# fla's GatedMLP: as the Llama MLP, its fused SwiGLU + down projection ("swiglu_linear") on this rank's columns.
FLA_MLP_PLAN = {
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
    "mlp.swiglu_linear": "swiglu_linear",
}


def softmax_attention_layers(config: Any) -> int:
    """Softmax-attention layers of an fla config: the ``attn`` layers of hybrids, half of Samba's (Mamba
    blocks alternate with sliding-window attention), none for linear attention, else all."""
    num_layers = int(getattr(config, "num_hidden_layers", 0))
    attn = getattr(config, "attn", None)
    if isinstance(attn, dict) and "layers" in attn:
        return len(attn["layers"])
    if config.model_type == "samba":
        return num_layers // 2
    if config.model_type in LINEAR_ATTENTION_TYPES:
        return 0
    return num_layers


def fla_tp_dims(model_config: Any) -> dict[str, int | None]:
    """The split sizes of an fla config: its MLP width follows ``fla.modules.GatedMLP``'s formula when the
    config leaves ``intermediate_size`` unset."""
    dims = tp_dims(model_config)
    hidden, ratio = getattr(model_config, "hidden_size", None), getattr(model_config, "hidden_ratio", None)
    if dims["intermediate_size"] is None and hidden is not None:
        width = int(hidden * (ratio or 4) * 2 / 3)
        dims["intermediate_size"] = 256 * ((width + 255) // 256)
    return dims


def unfuse_qkv_conv(layer: nn.Module) -> None:
    """One short convolution per projection instead of fla's fused three-way kernel on concatenated q/k/v
    weights: under TP each convolution runs on its own channels, under CP each gets its halo."""
    for module in layer.modules():
        if hasattr(module, "_use_fused_qkv_conv"):
            setattr(module, "_use_fused_qkv_conv", lambda *args, **kwargs: False)  # noqa: B010


@functools.cache
def install_common() -> None:
    """CPU paths of the fla modules all these families use (RMSNorm, gated RMSNorm, short convolution,
    SwiGLU), and the short convolution's context-parallel halo around its dispatch (once)."""
    modules: Any = importlib.import_module("fla.modules")
    mlp = importlib.import_module("fla.modules.mlp")
    ref.patch(modules.RMSNorm, "forward", ref.rms_norm_forward, ref.method_input)
    ref.patch(modules.FusedRMSNormGated, "forward", ref.rms_norm_gated_forward, ref.method_input)
    ref.patch(modules.ShortConvolution, "forward", ref.short_convolution_forward, ref.method_input)
    ref.patch(mlp, "swiglu", ref.swiglu_reference, ref.first_input)
    ref.patch(mlp, "swiglu_linear", ref.swiglu_linear_reference, ref.first_input)
    if not getattr(modules.ShortConvolution.forward, WRAPPED_ATTR, False):
        modules.ShortConvolution.forward = conv_with_halo(modules.ShortConvolution.forward)


# Every fla family: registered by `import fla`, CUDA-only kernels, packed documents as cu_seqlens, no CP.
FLA_ADAPTER = ModelAdapter(
    family="fla",
    registered_by="fla",
    device_types=("cuda",),
    varlen="fla",
    tp_dims=fla_tp_dims,
    no_context_parallel="fla 0.6.0's model layers take no CP context",
    softmax_attention_layers=softmax_attention_layers,
)


def cpu_path_adapter(
    model_type: str, plan: dict[str, str], attention_classes: tuple[str, ...], install: Callable[[], None]
) -> ModelAdapter:
    """The adapter of an fla family with a CPU path, a TP plan (``plan``: its layer's, with ``FLA_MLP_PLAN``
    for fla's GatedMLP) and state-passing CP of its ``attention_classes``; ``install`` patches its own ops
    (after the common ones)."""

    def on_import() -> None:
        install_common()
        install()

    return dataclasses.replace(
        FLA_ADAPTER,
        family=model_type,
        on_import=on_import,
        device_types=("cpu", "cuda"),
        tp_plan=plan,
        tp_local_kernels=True,
        prepare_layer=unfuse_qkv_conv,
        context_parallel=True,
        state_passing_modules=attention_classes,
        no_context_parallel="",
    )


for _model_type in FLA_MODEL_TYPES:
    register_adapter(_model_type, dataclasses.replace(FLA_ADAPTER, family=_model_type))
