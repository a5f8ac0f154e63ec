"""Parallelisation, applied in one place and in a fixed order.

Order (each step only if enabled): pipeline split (``flame.parallel.pipeline.Pipeline``, before this:
each stage is parallelised on its own) -> float8 linear layers -> tensor parallel (async TP) -> context
parallel -> activation checkpointing -> compile -> FSDP2/HSDP -> (weights are initialised after this,
by ``flame.models.build.init_weights``). Later steps wrap what earlier ones produced: FSDP must see
the checkpointed/compiled layers so that it all-gathers inside the recomputation.

The machinery is generic; what differs per model family comes from its adapter
(``flame/models/families/``): the TP plan, whether its norms run on local kernels, its CP path.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

import flame.distributed.titan  # noqa: F401  (before any torchtitan import)
from flame.config.errors import ConfigError
from flame.config.schema import JobConfig
from flame.models.adapters import ModelAdapter, tensor_parallel_families
from flame.parallel.context_parallel import choose_path, uses_sliding_window
from flame.parallel.cp_attention import apply_context_parallel
from flame.parallel.float8 import apply_float8
from flame.parallel.state_passing import apply_state_passing
from flame.parallel.tensor_parallel import apply_tensor_parallel

logger = logging.getLogger("flame.parallel")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_activation_checkpointing(decoder: nn.Module, mode: str, option: str) -> None:
    """Checkpoint decoder layers: all of them (full), every Nth (selective N), or per op (selective op)."""
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    if mode == "full":
        FullAC(FullAC.Config()).apply(decoder)
    elif option == "op":
        SelectiveAC(SelectiveAC.Config(force_recompute_mm_shapes_by_fqns=[])).apply(decoder)
    else:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        every = int(option)
        layers = decoder.get_submodule("layers")
        for index, (name, layer) in enumerate(list(layers.named_children())):
            if index % every == 0:
                layers.register_module(name, checkpoint_wrapper(layer, preserve_rng_state=True))
    logger.info("activation checkpointing: %s%s", mode, f" ({option})" if mode == "selective" else "")


def apply_compile(decoder: nn.Module) -> None:
    """torch.compile each decoder layer (the repeated structure compiles once)."""
    torch._dynamo.config.capture_scalar_outputs = True
    for layer in decoder.get_submodule("layers").children():
        layer.compile(fullgraph=True)
    logger.info("compile: each decoder layer with torch.compile(fullgraph=True)")


def apply_fsdp(
    model: nn.Module, adapter: ModelAdapter, mesh, param_dtype: str, reduce_dtype: str, cpu_offload: bool = False
) -> None:
    """FSDP2 ``fully_shard`` on each decoder layer and the root; a 2-D mesh gives HSDP.

    ``cpu_offload`` keeps parameters, gradients and optimizer state in host memory (GPU runs)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    layers = list(adapter.layers(model).children())
    for index, layer in enumerate(layers):
        # The last layer's parameters are needed right away by backward: don't free them after forward.
        fully_shard(
            layer, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=index < len(layers) - 1
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    logger.info(
        "data parallel: FSDP2 over mesh axes %s (shape %s), params %s, reduce %s%s",
        mesh.mesh_dim_names,
        tuple(mesh.shape),
        param_dtype,
        reduce_dtype,
        ", CPU offload" if cpu_offload else "",
    )


def enable_async_tensor_parallel(tp_mesh) -> None:
    """Let inductor overlap the TP collectives with the matmuls of the compiled layers (micro-pipelined
    TP over symmetric memory; CUDA, with --training.compile, checked by validation)."""
    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
    logger.info("async tensor parallel: inductor micro-pipelines the TP collectives (symmetric memory)")


def context_parallel_path(
    model: nn.Module, adapter: ModelAdapter, config: JobConfig, device_type: str
) -> tuple[str, str]:
    """The context-parallel attention path for this model and run, and why (see ``choose_path``)."""
    if adapter.cp_state_passing:
        return "state_passing", (
            "linear-attention state passing between the sequence chunks (fla kernels on CUDA, flame's PyTorch "
            "path on CPU; flame/parallel/state_passing.py)"
        )
    return choose_path(
        device_type,
        config.training.varlen,
        uses_sliding_window(model.config),
        config.experimental.context_parallel_rotate_method,
    )


def parallelize(
    model: nn.Module, adapter: ModelAdapter, parallel_dims, config: JobConfig, device_type: str = "cpu"
) -> None:
    """Apply every enabled parallelism to ``model`` (on the meta device) in the documented order.

    ``device_type`` is where the model will run ("cuda" or "cpu"): it picks the context-parallel path."""
    layers = list(adapter.layers(model).children())
    # 1. float8: swap the linear layers before TP and FSDP see them.
    if config.float8.enable_float8_linear:
        apply_float8(model, config)
    # The family's own preparation of its layers for TP and state passing (fla: unfused convolutions).
    if adapter.prepare_layer is not None and (parallel_dims.tp_enabled or parallel_dims.cp_enabled):
        for layer in layers:
            adapter.prepare_layer(layer)
    # 2. tensor parallel (+ sequence and loss parallel), async TP.
    if parallel_dims.tp_enabled:
        if adapter.tp_plan is None:
            raise ConfigError(
                f"--training.tensor_parallel_degree: model family {adapter.family!r} has no tensor-parallel plan; "
                f"families with one: {', '.join(tensor_parallel_families())}"
            )
        apply_tensor_parallel(
            model,  # type: ignore[arg-type]
            layers,
            adapter.tp_plan,
            parallel_dims.get_mesh("tp"),
            loss_parallel=not config.training.disable_loss_parallel,
            local_kernels=adapter.tp_local_kernels,
        )
        if config.experimental.enable_async_tensor_parallel:
            enable_async_tensor_parallel(parallel_dims.get_mesh("tp"))
    # 3. context parallel: the attention function, or state passing, over the cp axis.
    if parallel_dims.cp_enabled:
        if not adapter.context_parallel:
            raise ConfigError(
                f"--experimental.context_parallel_degree: model family {adapter.family!r} has no context-parallel "
                "attention (see flame/parallel/context_parallel.py)"
            )
        path, why = context_parallel_path(model, adapter, config, device_type)
        mesh = parallel_dims.get_mesh("cp")
        if adapter.cp_state_passing:
            if adapter.on_import is not None:  # installs the op wrappers (idempotent; done when the family loaded)
                adapter.on_import()
            apply_state_passing(model, layers, mesh, adapter.state_passing_modules)
        else:
            apply_context_parallel(model, layers, mesh, path, config.experimental.context_parallel_rotate_method)
        logger.info(
            "context parallel: degree %d over mesh axis %s, load-balanced shards of seq_len/%d tokens; attention "
            "path %s: %s",
            mesh.size(),
            mesh.mesh_dim_names,
            mesh.size(),
            path,
            why,
        )
    # 4. activation checkpointing, 5. compile: per decoder layer, inside what FSDP wraps.
    ac = config.activation_checkpoint
    if ac.mode != "none":
        apply_activation_checkpointing(adapter.decoder(model), ac.mode, ac.selective_ac_option)
    if config.training.compile:
        apply_compile(adapter.decoder(model))
    # 6. FSDP2/HSDP. Parameters are replicated over CP: FSDP shards them and reduces gradients over
    # "fsdp" = dp_shard x cp.
    if parallel_dims.fsdp_enabled or parallel_dims.dp_replicate_enabled:
        axes = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        mesh = parallel_dims.get_mesh(axes)
        t = config.training
        apply_fsdp(model, adapter, mesh, t.mixed_precision_param, t.mixed_precision_reduce, t.enable_cpu_offload)
