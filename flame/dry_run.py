"""``--job.dry_run``: check a cluster-sized config on a laptop, in one CPU process.

torch's ``fake`` process group stands in for ``world_size`` ranks: the whole parallel plan (meshes,
tensor/pipeline split, FSDP sharding) is built for this process's rank on the meta device, so no
memory is allocated and no collective runs. It reports the mesh, parameters per rank, FLOPs per
token and an estimate of per-device memory, after the same validation as training (for a CUDA
target: GPU-only features are allowed).
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import torch.distributed as dist

import flame.distributed.titan
import flame.models.families  # noqa: F401  (registers the model families)
from flame.config.errors import ConfigError
from flame.config.schema import JobConfig
from flame.config.validate import validate
from flame.distributed.parallel_dims import build_parallel_dims, dry_run_world_size
from flame.models.adapters import adapter_for
from flame.models.build import build_meta_model, import_custom_models, load_model_config, load_tokenizer
from flame.models.flops import flops_per_token
from flame.parallel.parallelize import parallelize
from flame.parallel.pipeline import SCHEDULES, Pipeline, stage_layers

logger = logging.getLogger("flame")

_BYTES = {"float32": 4, "bfloat16": 2}


def local_numel(model: torch.nn.Module) -> int:
    """Elements this rank stores (DTensor shards count their local part)."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())


def memory_estimate_gib(
    config: JobConfig, local_params: int, model_config, layers_local: int, tp: int, cp: int = 1
) -> dict:
    """A first-order per-device estimate: fp32 weights, gradients and Adam moments (16 bytes per local
    parameter), plus activations saved for backward (~34 x hidden bytes per token and layer at 16-bit,
    divided by TP; full checkpointing keeps only each layer's input) for the seq_len / cp tokens of a
    context-parallel shard."""
    t = config.training
    hidden = int(getattr(model_config, "hidden_size", 0))
    tokens = t.batch_size * t.seq_len // cp
    per_token_layer = hidden * 34 * _BYTES[t.mixed_precision_param] / 2 / tp
    if config.activation_checkpoint.mode == "full":
        per_token_layer = hidden * _BYTES[t.mixed_precision_param]
    activations = tokens * layers_local * per_token_layer
    states = 16 * local_params
    return {"states_gib": states / 2**30, "activations_gib": activations / 2**30}


def dry_run(config: JobConfig, world_size: int) -> dict:
    """Build the plan for ``world_size`` ranks and return (and log) what it found."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    validate(config, world_size, device_type="cuda")
    import_custom_models(config.experimental.custom_model_path)
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    model_config = load_model_config(config.model.config, tokenizer, config.model.norm_type)
    t, e = config.training, config.experimental
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        dims = build_parallel_dims(config, world_size)
        model = build_meta_model(model_config)
        adapter = adapter_for(model_config.model_type)
        total = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, model_config, t.seq_len)
        num_layers = len(list(adapter.layers(model).children()))
        layers_per_rank = [num_layers]
        if dims.pp_enabled:
            pipeline = Pipeline(model, adapter, dims, config, torch.device("cpu"))
            parts = pipeline.model_parts
            per_rank = SCHEDULES[e.pipeline_parallel_schedule][1]
            stages = stage_layers(num_layers, dims.pp * per_rank, e.pipeline_parallel_split_points)
            layers_per_rank = [len(s) for s in stages]
        else:
            parts = [model]
        for part in parts:
            parallelize(part, adapter, dims, config, device_type="cuda")
        local = sum(local_numel(p) for p in parts)
        memory = memory_estimate_gib(config, local, model_config, max(layers_per_rank), dims.tp, dims.cp)
    finally:
        dist.destroy_process_group()
    report = {
        "world_size": world_size,
        "mesh": {
            "pp": dims.pp,
            "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard,
            "cp": dims.cp,
            "tp": dims.tp,
        },
        "parameters": total,
        "parameters_on_rank_0": local,
        "layers_per_stage": layers_per_rank,
        "flops_per_token": flops,
        "global_batch_tokens": t.batch_size
        * t.seq_len
        * t.gradient_accumulation_steps
        * dims.dp_replicate
        * dims.dp_shard,
        **memory,
        "seconds": time.perf_counter() - start,
    }
    logger.info(
        "dry run for %d ranks: mesh %s; %.1fM parameters, %.1fM on rank 0; layers per pipeline stage %s",
        world_size,
        report["mesh"],
        total / 1e6,
        local / 1e6,
        layers_per_rank,
    )
    logger.info(
        "%.2f GFLOPs per token; global batch %s tokens; per-device memory estimate: %.1f GiB model+optimizer state "
        "+ %.1f GiB activations; built in %.1f s",
        flops / 1e9,
        f"{report['global_batch_tokens']:,}",
        memory["states_gib"],
        memory["activations_gib"],
        report["seconds"],
    )
    return report


def main(argv: list[str] | None = None) -> int:
    from flame.config.loader import parse_args
    from flame.utils.console import fail, setup_logging

    try:
        config = parse_args(argv)
    except ConfigError as e:
        return fail(e.format())
    setup_logging()
    world_size = dry_run_world_size()
    try:
        dry_run(config, world_size)
    except ConfigError as e:
        return fail(e.format("invalid config"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
