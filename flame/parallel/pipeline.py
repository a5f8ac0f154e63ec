"""Pipeline parallelism for Hugging Face decoders with ``torch.distributed.pipelining``.

Each stage is the causal LM itself with the parts other stages own removed: the decoder layers
not in the stage are dropped (the rest are kept in a ModuleDict under their original indices), the
embedding stays on the first stage, the final norm and the output head on the last. Parameter
names are therefore the Hugging Face names, and pipeline checkpoints load without pipelining and
the other way round. The stage's forward is the family adapter's (``stage_forward``, in ``flame/models/families/``).
"""

from __future__ import annotations

import copy
import logging
import re
import types
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from flame.config.errors import ConfigError

logger = logging.getLogger("flame.parallel")

# Schedules and how their stages are placed: "loop" puts stage s on rank s % pp, "v" folds the
# second half back (rank r holds r and 2 pp - 1 - r).
SCHEDULES = {
    "GPipe": ("single", 1),
    "1F1B": ("single", 1),
    "Interleaved1F1B": ("loop", 2),
    "LoopedBFS": ("loop", 2),
    "InterleavedZeroBubble": ("loop", 2),
    "ZBVZeroBubble": ("v", 2),
}


def schedule_names() -> str:
    return ", ".join(SCHEDULES)


def parse_split_points(points: list[str], num_layers: int) -> list[int]:
    """Layer indices where stages begin, from names like ``layers.4`` or ``model.layers.4``."""
    indices = []
    for point in points:
        match = re.fullmatch(r"(?:.*\.)?layers\.(\d+)", point.strip())
        if not match:
            raise ConfigError(
                f"--experimental.pipeline_parallel_split_points: {point!r} is not a layer name; "
                f"use layers.N with 1 <= N < {num_layers}"
            )
        indices.append(int(match.group(1)))
    if any(not 0 < i < num_layers for i in indices) or indices != sorted(set(indices)):
        raise ConfigError(
            f"--experimental.pipeline_parallel_split_points {points}: the model has layers.0 .. "
            f"layers.{num_layers - 1}; split points must be distinct, increasing and between layers.1 and "
            f"layers.{num_layers - 1}"
        )
    return indices


def stage_layers(num_layers: int, num_stages: int, split_points: list[str]) -> list[list[int]]:
    """The decoder layer indices of every stage: at the split points, or as even as possible."""
    if split_points:
        starts = parse_split_points(split_points, num_layers)
        if len(starts) != num_stages - 1:
            raise ConfigError(
                f"--experimental.pipeline_parallel_split_points: {len(starts)} split points make "
                f"{len(starts) + 1} stages, but the schedule needs {num_stages}"
            )
    else:
        if num_layers < num_stages:
            raise ConfigError(f"pipeline parallelism: {num_stages} stages need at least as many layers ({num_layers})")
        starts = [round(i * num_layers / num_stages) for i in range(1, num_stages)]
    bounds = [0, *starts, num_layers]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_stages)]


def stages_of_rank(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stage indices this pipeline rank runs, for ``schedule``."""
    style, per_rank = SCHEDULES[schedule]
    if style == "single":
        return [pp_rank]
    if style == "loop":
        return [pp_rank + i * pp for i in range(per_rank)]
    return [pp_rank, 2 * pp - 1 - pp_rank]


def build_stage_model(model: nn.Module, adapter: Any, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """A copy of the (meta) ``model`` holding only what one stage owns, with the stage forward."""
    stage: Any = copy.deepcopy(model)
    decoder = adapter.decoder(stage)
    layers = adapter.layers(stage)
    setattr(decoder, adapter.layers_attr, nn.ModuleDict({str(i): layers[i] for i in layer_ids}))
    if not first:
        decoder.embed_tokens = None
    if not last:
        decoder.norm = None
        stage.lm_head = None
    stage.forward = types.MethodType(lambda self, x: adapter.stage_forward(self, x, first, last), stage)
    return stage


def build_schedule(name: str, stages: list, num_microbatches: int, loss_fn) -> Any:
    """The torch.distributed.pipelining schedule ``name`` over this rank's stages."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    cls = get_schedule_class(name)
    # scale_grads=False: the loss function already divides by the global token count; the default
    # would also divide by the number of micro-batches.
    if issubclass(cls, PipelineScheduleSingle):
        return cls(stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False)


class Pipeline:
    """This rank's stages of the model and the schedule that runs them.

    ``forward_backward`` runs one batch through the schedule (split into micro-batches) and returns
    the summed token loss on every pipeline rank; ``loss_sum`` does the same without gradients (for
    validation). The loss function is the trainer's, scaled by ``scale`` (see ``set_scale``).
    """

    def __init__(self, model: nn.Module, adapter: Any, parallel_dims, config, device: torch.device) -> None:
        from torch.distributed.pipelining import PipelineStage

        e, t = config.experimental, config.training
        if adapter.stage_forward is None:
            raise ConfigError(
                f"--experimental.pipeline_parallel_degree: model family {adapter.family!r} cannot be split into "
                "pipeline stages yet (its adapter has no stage forward)"
            )
        if getattr(model.config, "tie_word_embeddings", False):
            raise ConfigError(
                "--experimental.pipeline_parallel_degree: the model ties its input and output embeddings "
                "(tie_word_embeddings=true), which would live on different stages; untie them in the model config"
            )
        self.pp_mesh = parallel_dims.get_mesh("pp")
        pp, pp_rank = self.pp_mesh.size(), self.pp_mesh.get_local_rank()
        per_rank = SCHEDULES[e.pipeline_parallel_schedule][1]
        num_stages = pp * per_rank
        layer_ids = stage_layers(
            len(list(adapter.layers(model).children())), num_stages, e.pipeline_parallel_split_points
        )
        self.stage_ids = stages_of_rank(pp_rank, pp, e.pipeline_parallel_schedule)
        self.model_parts = [
            build_stage_model(model, adapter, layer_ids[s], first=s == 0, last=s == num_stages - 1)
            for s in self.stage_ids
        ]
        self.has_first = 0 in self.stage_ids
        self.has_last = num_stages - 1 in self.stage_ids
        self.num_microbatches = e.pipeline_parallel_microbatches or num_stages
        if t.batch_size % self.num_microbatches:
            raise ConfigError(
                f"--training.batch_size {t.batch_size} is not divisible by the {self.num_microbatches} pipeline "
                "micro-batches (--experimental.pipeline_parallel_microbatches, default: the number of stages)"
            )
        self._make_stage = lambda part, s: PipelineStage(part, s, num_stages, device, group=self.pp_mesh.get_group())
        self._config = (e.pipeline_parallel_schedule, self.num_microbatches)
        self.scale = 1.0
        self.device = device
        logger.info(
            "pipeline parallel: %d stages (%s), this rank runs stages %s with layers %s",
            num_stages,
            e.pipeline_parallel_schedule,
            self.stage_ids,
            [layer_ids[s] for s in self.stage_ids],
        )

    def build_schedule(self, loss_fn) -> None:
        """Create stages and schedule (after the parts were parallelised and materialised)."""
        stages = [self._make_stage(part, s) for part, s in zip(self.model_parts, self.stage_ids, strict=True)]
        name, microbatches = self._config
        self.schedule = build_schedule(
            name, stages, microbatches, lambda out, target: loss_fn(out, target) * self.scale
        )

    def _run(self, batch: dict[str, torch.Tensor], train: bool) -> torch.Tensor:
        inputs = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=labels if self.has_last else None, losses=losses if self.has_last else None)
        total = torch.zeros((), device=self.device)
        if self.has_last:
            # Under loss parallelism the losses are replicated DTensors.
            local = [loss.full_tensor() if isinstance(loss, DTensor) else loss for loss in losses]
            total = torch.stack([loss.detach() for loss in local]).sum() / self.scale
        torch.distributed.all_reduce(total, group=self.pp_mesh.get_group())  # every rank reports the loss
        return total

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float | torch.Tensor) -> torch.Tensor:
        self.scale = scale  # type: ignore[assignment]
        return self._run(batch, train=True)

    @torch.no_grad()
    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.scale = 1.0
        return self._run(batch, train=False)
