"""Learning-rate schedules: values at chosen steps (optimizer.lr = 1, 10 steps)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flame.components.optimizer import build_lr_schedulers, build_optimizers
from flame.config.schema import JobConfig


def lrs(**schedule) -> list[float]:
    config = JobConfig()
    config.training.steps = 10
    config.optimizer.lr = 1.0
    for key, value in schedule.items():
        setattr(config.lr_scheduler, key, value)
    optimizers = build_optimizers(torch.nn.Linear(2, 2), config)
    schedulers = build_lr_schedulers(optimizers, config)
    values = []
    for _ in range(10):
        values.append(optimizers.optimizers[0].param_groups[0]["lr"])
        optimizers.step()
        schedulers.step()
    return values


def test_warmup_stable_decay_linear():
    values = lrs(warmup_steps=2, decay_ratio=0.4, decay_type="linear")
    assert values == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])


def test_cosine_decay_to_lr_min():
    values = lrs(warmup_steps=2, decay_type="cosine", lr_min=0.1)
    assert values[:3] == pytest.approx([0.5, 1.0, 1.0])
    # step 3 is 1/8 into the decay, which ends at lr_min at step 10
    assert values[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)))
    assert values[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))


def test_sqrt_decay():
    values = lrs(warmup_steps=0, decay_type="sqrt")
    # torchtitan keeps one stable step before the decay so the lr never reaches 0 early
    assert values[:3] == pytest.approx([1.0, 1 - math.sqrt(1 / 10), 1 - math.sqrt(2 / 10)])


def test_any_torch_optimizer_by_name():
    config = JobConfig()
    config.optimizer.name = "SGD"
    optimizers = build_optimizers(torch.nn.Linear(2, 2), config)
    assert type(optimizers.optimizers[0]) is torch.optim.SGD
    assert "betas" not in optimizers.optimizers[0].param_groups[0]
