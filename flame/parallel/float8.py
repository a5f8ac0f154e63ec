"""Float8 training through torchao: the decoder's linear layers compute their matmuls in float8.

``--float8.enable_float8_linear`` swaps every ``nn.Linear`` of the decoder layers whose two dimensions
are multiples of 16 (the float8 GEMM's requirement) for torchao's ``Float8Linear`` with dynamic
tensorwise scaling (e4m3 for inputs and weights, e5m2 for output gradients); the output projection
(``lm_head``) stays in high precision, as usual. Parameter names do not change, so checkpoints and the
Hugging Face conversion work as without float8. It runs on the meta-device model before tensor
parallelism and FSDP (``flame/parallel/parallelize.py``).

``--float8.enable_fsdp_float8_all_gather`` makes FSDP2 all-gather those weights in float8 (half the
bytes of bf16); ``--float8.precompute_float8_dynamic_scale_for_fsdp`` then computes the scales of all
of them with one all-reduce after each optimizer step instead of one per layer.

Hardware: float8 GEMMs need an NVIDIA GPU of compute capability 8.9 or newer (H100, L40S, ...).
``--float8.emulate`` runs the same conversion with torchao's emulation (the values are rounded to float8
and scaled exactly as on the GPU, the matmul runs in high precision): for tests on machines without
such a GPU, never for speed. The CPU tests run the emulation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from flame.config.errors import ConfigError

logger = logging.getLogger("flame.parallel")

# Names of output projections that stay in high precision (their logits feed the loss directly).
_SKIPPED = ("lm_head", "output")


def float8_problems(config: Any, device_type: str) -> list[str]:
    """What makes the ``[float8]`` flags impossible for ``config`` on ``device_type`` (empty if fine)."""
    f, t = config.float8, config.training
    problems = []
    if not f.enable_float8_linear:
        for flag in ("enable_fsdp_float8_all_gather", "precompute_float8_dynamic_scale_for_fsdp", "emulate"):
            if getattr(f, flag):
                problems.append(
                    f"--float8.{flag} only applies with --float8.enable_float8_linear; it would be ignored here"
                )
        return problems
    if f.precompute_float8_dynamic_scale_for_fsdp and not f.enable_fsdp_float8_all_gather:
        problems.append(
            "--float8.precompute_float8_dynamic_scale_for_fsdp only applies with --float8.enable_fsdp_float8_all_gather "
            "(it precomputes the scales of the float8 all-gather)"
        )
    for name in ("scaling_type_input", "scaling_type_weight", "scaling_type_grad_output"):
        if getattr(f, name) != "dynamic":
            problems.append(
                f"--float8.{name} {getattr(f, name)}: torchao's float8 training has dynamic scaling only (delayed "
                "scaling was removed from torchao); use dynamic"
            )
    if device_type != "cuda" and not f.emulate:
        problems.append(
            "--float8.enable_float8_linear=True: float8 training needs a CUDA GPU (compute capability 8.9+); "
            "none is visible on this machine (--float8.emulate runs torchao's emulation, for tests)"
        )
    if f.emulate and t.compile:
        problems.append("--float8.emulate does not work with --training.compile (torchao's emulation is eager only)")
    if t.tensor_parallel_degree > 1:
        problems.append(
            "--float8.enable_float8_linear with --training.tensor_parallel_degree > 1: flame's tensor-parallel plans "
            "shard plain linear layers; float8 with tensor parallelism is not supported in this version"
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        problems.append(
            "--float8.enable_float8_linear needs torchao: pip install -e '.[float8]' (or pip install torchao)"
        )
    return problems


def _convertible(module: nn.Module, fqn: str) -> bool:
    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] in _SKIPPED:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model: nn.Module, config: Any) -> int:
    """Swap the model's eligible linear layers for ``Float8Linear``; return how many were swapped."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    f = config.float8
    # (validation refused float8 without a CUDA device; a dry run plans for one without having it)
    if not f.emulate and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError(
            "--float8.enable_float8_linear: this GPU has no float8 GEMMs (compute capability 8.9+ needed)"
        )
    eligible = [name for name, m in model.named_modules() if _convertible(m, name)]
    if not eligible:
        raise ConfigError(
            "--float8.enable_float8_linear: no linear layer of this model has both dimensions divisible by 16"
        )
    ao_config = Float8LinearConfig(enable_fsdp_float8_all_gather=f.enable_fsdp_float8_all_gather, emulate=f.emulate)
    convert_to_float8_training(model, config=ao_config, module_filter_fn=_convertible)
    skipped = sum(1 for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in eligible)
    logger.info(
        "float8: %d linear layers in float8 (dynamic tensorwise scaling%s%s), %d kept in high precision",
        len(eligible),
        ", float8 FSDP all-gather" if f.enable_fsdp_float8_all_gather else "",
        ", emulated" if f.emulate else "",
        skipped,
    )
    return len(eligible)


def precompute_scales(model_parts: list[nn.Module]) -> None:
    """One all-reduce for the float8 scales of every FSDP-sharded float8 weight (after the optimizer step)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in model_parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
