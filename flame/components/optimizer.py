"""Optimizer and learning-rate schedule, through torchtitan's containers.

torchtitan's OptimizersContainer knows only Adam/AdamW by name; flame's CLI accepts any
``torch.optim`` class, so the subclass below resolves names there and passes each optimizer only
the hyper-parameters its constructor takes.

Checkpoint format: torchtitan's flat, FQN-keyed optimizer state (it reshards across parallel
layouts) repeats every hyper-parameter of the group for every parameter
(``param_groups.<fqn>.lr``, ``.betas``, ... eleven entries per tensor for AdamW), and DCP pays a fixed
cost per entry. flame's parameters all share one set of hyper-parameters, so it stores that set once
(``param_groups.all``) and expands it for the loading rank's parameters on load; the per-tensor
optimizer state stays FQN-keyed. Should parameters ever carry different hyper-parameters, the
per-parameter entries are kept.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch
from torch import nn

import flame.distributed.titan  # noqa: F401  (before any torchtitan import)
from flame.config.schema import JobConfig

from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

_GROUP_PREFIX = "param_groups."
SHARED_GROUP_KEY = "param_groups.all"  # the hyper-parameters every parameter shares, as JSON


def _split_group_key(key: str) -> tuple[str, str]:
    """``param_groups.<fqn>.<name>`` -> ``(fqn, name)``."""
    fqn, name = key[len(_GROUP_PREFIX) :].rsplit(".", 1)
    return fqn, name


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # betas and other tuples


class Optimizers(OptimizersContainer):
    """OptimizersContainer for any optimizer class in ``torch.optim``, with a compact checkpoint format
    for the hyper-parameters (see the module docstring)."""

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        return getattr(torch.optim, name)

    def state_dict(self) -> dict[str, Any]:
        flat = super().state_dict()
        per_param: dict[str, dict[str, Any]] = {}
        for key in [k for k in flat if k.startswith(_GROUP_PREFIX)]:
            fqn, name = _split_group_key(key)
            per_param.setdefault(fqn, {})[name] = flat[key]
        shared = {json.dumps(h, sort_keys=True) for h in per_param.values()}
        if len(shared) != 1:
            return flat  # parameters with different hyper-parameters: torchtitan's per-parameter entries
        for key in [k for k in flat if k.startswith(_GROUP_PREFIX)]:
            del flat[key]
        flat[SHARED_GROUP_KEY] = shared.pop()
        return flat

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if SHARED_GROUP_KEY not in state_dict:
            super().load_state_dict(state_dict)
            return
        shared = {name: _from_json(v) for name, v in json.loads(state_dict[SHARED_GROUP_KEY]).items()}
        full = {k: v for k, v in state_dict.items() if k != SHARED_GROUP_KEY}
        for key in super().state_dict():  # this rank's parameters
            if key.startswith(_GROUP_PREFIX):
                full[key] = shared[_split_group_key(key)[1]]
        super().load_state_dict(full)


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
    """Linear warmup, then (warmup-stable-)decay: linear, sqrt or cosine down to ``lr_min`` x lr, laid out
    over ``lr_scheduler.schedule_steps`` (torchtitan's ``total_steps``; unset: ``training.steps``). The
    schedule's state in a checkpoint is its step count only, so a run resumed with other settings (a
    larger ``training.steps``) follows the schedule its config gives now."""
    s = config.lr_scheduler
    cfg = LRSchedulersContainer.Config(
        warmup_steps=s.warmup_steps,
        total_steps=s.schedule_steps,
        decay_ratio=s.decay_ratio,
        decay_type=s.decay_type,  # type: ignore[arg-type]
        min_lr_factor=s.lr_min,
    )
    return cfg.build(optimizers=optimizers, training_steps=config.training.steps)
