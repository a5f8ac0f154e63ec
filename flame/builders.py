"""The parts of a run, one builder each: what ``Trainer.__init__`` calls, in its order.

Each builder takes the config and what earlier builders made, and returns its part; none reads the
trainer, so each can be called (and tested) alone: the layout of the ranks, the tokenizer, the model
(meta build, pipeline split, parallelisation, materialisation, layout-independent init), its
micro-batch loss, validation, optimizer and schedule, checkpointing with fault handling, metrics.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel

import flame.models.families  # noqa: F401  (registers the model families)
from flame.components.checkpoint import Checkpointer, TrainState
from flame.components.fault import FaultHandler
from flame.components.loss import MicroBatchLoss, token_loss_sum
from flame.components.metrics import MetricsLogger
from flame.components.optimizer import Optimizers, build_lr_schedulers, build_optimizers
from flame.components.validation import Validator
from flame.config.loader import save_toml, to_dict
from flame.config.schema import JobConfig
from flame.models.adapters import ModelAdapter, adapter_for
from flame.models.build import build_meta_model, import_custom_models, init_weights, load_model_config, load_tokenizer
from flame.models.flops import flops_per_token
from flame.parallel.context_parallel import ContextParallel
from flame.parallel.parallelize import context_parallel_path, parallelize
from flame.parallel.pipeline import Pipeline


@dataclass(frozen=True)
class DataParallelLayout:
    """This rank's place among the data-parallel ranks, read from the parallel dims."""

    dp_rank: int  # which share of every global batch this rank's loader reads
    dp_world_size: int
    batch_mesh: DeviceMesh | None  # the ranks that read different data (dp_replicate x dp_shard)
    loss_mesh: DeviceMesh | None  # the ranks whose losses and gradients are averaged (dp x cp)

    @property
    def num_gradient_ranks(self) -> int:
        """Ranks whose gradients FSDP/DDP average: dp_replicate x dp_shard x cp (the "loss" mesh)."""
        return self.loss_mesh.size() if self.loss_mesh is not None else 1


def data_parallel_layout(parallel_dims: Any) -> DataParallelLayout:
    batch_mesh = parallel_dims.get_optional_mesh("batch")
    return DataParallelLayout(
        dp_rank=batch_mesh.get_local_rank() if batch_mesh is not None else 0,
        dp_world_size=batch_mesh.size() if batch_mesh is not None else 1,
        batch_mesh=batch_mesh,
        loss_mesh=parallel_dims.get_optional_mesh("loss"),
    )


def build_tokenizer(config: JobConfig) -> Any:
    """The tokenizer, after importing ``--experimental.custom_model_path`` (which may register classes)."""
    import_custom_models(config.experimental.custom_model_path)
    return load_tokenizer(config.model.tokenizer_path)


@dataclass
class BuiltModel:
    """The parallelised, initialised model of this rank and what the loop needs to know about it."""

    parts: list[nn.Module]  # the model, or this rank's pipeline stages
    adapter: ModelAdapter  # its family's, knowing the attention implementation
    pipeline: Pipeline | None
    context_parallel: ContextParallel | None  # shards every batch over the cp axis
    name: str  # the model class
    num_params: int  # of the whole model
    flops_per_token: int  # training FLOPs per token at seq_len

    def shard_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a loader batch: its context-parallel shard, or the whole batch without CP."""
        return self.context_parallel.shard(batch) if self.context_parallel is not None else batch


def build_model(config: JobConfig, tokenizer: Any, parallel_dims: Any, device: torch.device) -> BuiltModel:
    """Meta build -> pipeline split -> parallelise each part -> materialise -> layout-independent init."""
    t = config.training
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    model_config = load_model_config(config.model.config, tokenizer, config.model.norm_type)
    model = build_meta_model(model_config)
    adapter = adapter_for(model_config.model_type).with_model(model)  # knows the attention kind
    reference = copy.deepcopy(model)  # an untouched meta copy: init_weights initialises each unit in full
    layer_names = set(adapter.layer_names(model))
    pipeline = Pipeline(model, adapter, parallel_dims, config, device) if parallel_dims.pp_enabled else None
    parts = pipeline.model_parts if pipeline else [model]
    for part in parts:
        parallelize(part, adapter, parallel_dims, config, device.type)
        part.to_empty(device=device)
        init_weights(part, reference, layer_names, t.seed, device)
        part.train()
    context_parallel = None
    if parallel_dims.cp_enabled:
        path, _ = context_parallel_path(parts[0], adapter, config, device.type)
        context_parallel = ContextParallel(parallel_dims.get_mesh("cp"), path, device)
    if pipeline is not None:
        pipeline.build_schedule(token_loss_sum)
    return BuiltModel(
        parts=parts,
        adapter=adapter,
        pipeline=pipeline,
        context_parallel=context_parallel,
        name=type(model).__name__,
        num_params=sum(p.numel() for p in reference.parameters()),
        flops_per_token=flops_per_token(reference, model_config, t.seq_len),
    )


def build_loss(config: JobConfig, model: BuiltModel, parallel_dims: Any, device: torch.device) -> MicroBatchLoss:
    """The micro-batch loss of ``model``'s first part: inputs through the CP shard or the family adapter,
    autocast on one process (FSDP's mixed precision otherwise), loss parallelism under TP."""
    t = config.training
    cp = model.context_parallel
    return MicroBatchLoss(
        model.parts[0],
        cp.model_inputs if cp is not None else model.adapter.model_inputs,
        device,
        autocast_dtype=torch.bfloat16
        if t.mixed_precision_param == "bfloat16" and not parallel_dims.dp_cp_enabled
        else None,
        # the cross entropy on vocabulary-sharded logits (tensor parallel only)
        context=loss_parallel if parallel_dims.tp_enabled and not t.disable_loss_parallel else contextlib.nullcontext,
        compiled=t.compile,
    )


def build_distillation(
    config: JobConfig, loss: MicroBatchLoss, tokenizer: Any, parallel_dims: Any, model: BuiltModel, layout: Any
) -> MicroBatchLoss:
    """With ``[distill]`` set, the distilling loss around ``loss`` (the teacher built on the student's mesh,
    or the offline cache); without, ``loss`` itself."""
    from flame.distill.checks import enabled

    if not enabled(config.distill):
        return loss
    from flame.distill.mode import build_distill_loss

    return build_distill_loss(config, loss, tokenizer, parallel_dims, model, layout)


@dataclass(frozen=True)
class StepOptions:
    """How the optimizer step runs beyond the loss: the backward's context and float8's scale precompute."""

    backward_context: Callable[[], contextlib.AbstractContextManager]
    precompute_float8_scales: bool


def step_options(config: JobConfig) -> StepOptions:
    backward: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if config.experimental.enable_compiled_autograd:  # the backward graph traced and compiled by inductor
        from torch._dynamo.utils import maybe_enable_compiled_autograd

        backward = functools.partial(maybe_enable_compiled_autograd, True)
    f8 = config.float8
    return StepOptions(
        backward_context=backward,
        precompute_float8_scales=(
            f8.enable_float8_linear and f8.enable_fsdp_float8_all_gather and f8.precompute_float8_dynamic_scale_for_fsdp
        ),
    )


def build_validator(
    config: JobConfig,
    tokenizer: Any,
    layout: DataParallelLayout,
    device: torch.device,
    shard_batch: Callable[[dict], dict],
) -> Validator | None:
    """The validation loss on fixed batches, when ``[validation] enable``."""
    if not config.validation.enable:
        return None
    return Validator(
        config,
        tokenizer,
        dp_rank=layout.dp_rank,
        dp_world_size=layout.dp_world_size,
        loss_mesh=layout.loss_mesh,
        device=device,
        shard_batch=shard_batch,
    )


def build_optimizer(model_parts: list[nn.Module], config: JobConfig) -> tuple[Optimizers, Any]:
    """The optimizers (one per model part) and their learning-rate schedules."""
    optimizers = build_optimizers(model_parts, config)
    return optimizers, build_lr_schedulers(optimizers, config)


def build_checkpointing(
    config: JobConfig,
    model_parts: list[nn.Module],
    optimizers: Optimizers,
    lr_schedulers: Any,
    dataloader: Any,
    device: torch.device,
    loss: MicroBatchLoss | None = None,
) -> tuple[TrainState, Checkpointer, FaultHandler]:
    """The train state, the checkpointer that saves and resumes it with everything else, and the fault
    handler (preemption signals, the divergence stop). A distilling ``loss`` gives the record every
    checkpoint keeps (teacher and loss settings); any run refuses a checkpoint whose record differs."""
    from flame.distill.mode import record_problems

    record = loss.record() if loss is not None and hasattr(loss, "record") else None
    state = TrainState()
    checkpointer = Checkpointer(
        config,
        model=model_parts,
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        dataloader=dataloader,
        train_state=state,
        device=device,
        record=record,
        record_problems=lambda stored, path: record_problems(stored, record, path),
    )
    fault = FaultHandler(config, rank=dist.get_rank(), world_size=dist.get_world_size())
    return state, checkpointer, fault


def build_metrics(config: JobConfig, rank: int, resume_step: int) -> MetricsLogger:
    """The metrics sinks (console, metrics.jsonl, TensorBoard, W&B), after rank 0 wrote the resolved
    ``config.toml`` into the dump folder."""
    if rank == 0:
        os.makedirs(config.job.dump_folder, exist_ok=True)
        save_toml(config, os.path.join(config.job.dump_folder, "config.toml"))
    return MetricsLogger(config, rank=rank, resume_step=resume_step, run_config=to_dict(config))
