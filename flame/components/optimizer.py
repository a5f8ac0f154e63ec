"""Optimizer and learning-rate schedule, through torchtitan's containers.

torchtitan's OptimizersContainer knows only Adam/AdamW by name; flame's CLI accepts any
``torch.optim`` class, so the subclass below resolves names there and passes each optimizer only
the hyper-parameters its constructor takes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

import flame.distributed.titan  # noqa: F401  (before any torchtitan import)
from flame.config.schema import JobConfig

from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig


class Optimizers(OptimizersContainer):
    """OptimizersContainer for any optimizer class in ``torch.optim``."""

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        return getattr(torch.optim, name)


def optimizer_kwargs(config: JobConfig) -> dict[str, Any]:
    """The hyper-parameters of ``optimizer.name`` that its constructor accepts."""
    o = config.optimizer
    betas = tuple(o.betas) if o.betas else (o.beta1, o.beta2)
    wanted = {"lr": o.lr, "weight_decay": o.weight_decay, "betas": betas, "eps": o.eps}
    accepted = inspect.signature(getattr(torch.optim, o.name).__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def build_optimizers(model_parts: list[nn.Module] | nn.Module, config: JobConfig) -> Optimizers:
    """One optimizer per model part (pipeline stage) over its trainable parameters, keyed by FQN."""
    o = config.optimizer
    accepted = inspect.signature(getattr(torch.optim, o.name).__init__).parameters
    implementation = o.implementation
    if implementation != "for-loop" and implementation not in accepted:
        implementation = "for-loop"  # e.g. LBFGS has neither a foreach nor a fused kernel
    cfg = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=r".*", optimizer_name=o.name, optimizer_kwargs=optimizer_kwargs(config))
        ],
        implementation=implementation,
    )
    return Optimizers(cfg, model_parts=model_parts if isinstance(model_parts, list) else [model_parts])


def build_lr_schedulers(optimizers: Optimizers, config: JobConfig) -> LRSchedulersContainer:
    """Linear warmup, then (warmup-stable-)decay: linear, sqrt or cosine down to ``lr_min`` x lr."""
    s = config.lr_scheduler
    cfg = LRSchedulersContainer.Config(
        warmup_steps=s.warmup_steps,
        decay_ratio=s.decay_ratio,
        decay_type=s.decay_type,  # type: ignore[arg-type]
        min_lr_factor=s.lr_min,
    )
    return cfg.build(optimizers=optimizers, training_steps=config.training.steps)
