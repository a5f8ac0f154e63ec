"""Trials of a scheduled stage as run folders: trunks laid out for the maximum, cool-down forks, checks.

A trial's **trunk** is its own folder, trained with ``lr_scheduler.schedule_steps`` = the maximum
resource's steps and ``checkpoint.keep_steps`` = its bracket's rung steps, stopping at each rung
(``training.steps`` = the rung); a promotion writes the next rung's ``training.steps`` and runs it again:
it resumes from the rung checkpoint exactly as the straight run goes on. A **cool-down fork**
(``rung_metric = "cooldown"``) is a run in ``<stage>/cooldowns/<trial>-s<steps>`` forked from the rung
checkpoint, decaying the learning rate over ``cooldown_ratio`` of the rung's steps and validating.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from flame.components.fork import cooldown_overrides, cooldown_steps
from flame.config.errors import ConfigError
from flame.experiments.schedulers.rules import Settings
from flame.experiments.trial import Trial


def tokens_per_step(trial: Trial) -> int:
    """Global tokens of one optimizer step: batch x seq_len x accumulation x data-parallel ranks."""
    c = trial.config
    assert c is not None
    split = c.training.tensor_parallel_degree * c.experimental.pipeline_parallel_degree
    split *= c.experimental.context_parallel_degree
    dp = max(trial.ngpu * trial.nnode // max(split, 1), 1)
    return c.training.batch_size * c.training.seq_len * c.training.gradient_accumulation_steps * dp


def to_steps(settings: Settings, resource: float, per_step: int) -> int:
    return round(resource) if settings.resource == "steps" else int(resource // per_step)


def check_trial(trial: Trial, settings: Settings, rungs: list[int], max_steps: int, metric: str, where: str) -> None:
    """Why this trial cannot be a trunk: a rung below one step, validation missing for the rung metric,
    a schedule that is not constant at the rung steps. One ConfigError naming the setting to change."""
    c = trial.config
    if c is None:
        raise ConfigError(f"{where} scheduler: stage kind {trial.kind!r} does not train; a scheduler needs trunks")
    problems = []
    per = tokens_per_step(trial)
    if settings.resource == "tokens" and settings.min < per:
        problems.append(
            f"min = {settings.min:g} tokens is below one step's {per} tokens (batch x seq_len x accumulation x "
            "data-parallel ranks); raise min"
        )
    elif min(rungs) < 1:
        problems.append(f"the lowest rung is {min(rungs)} steps; every rung needs at least one step (raise min)")
    if settings.rung_metric == "cooldown" and not c.validation.enable:
        problems.append(
            "rung_metric = 'cooldown' validates at the end of each cool-down fork, and validation is off: set "
            "validation.enable = true (a [validation] section) or use rung_metric = 'stable'"
        )
    elif metric.startswith("validation") and not c.validation.enable:
        problems.append(f"the metric {metric!r} needs validation at the rung steps: set validation.enable = true")
    s = c.lr_scheduler
    low, below_max = min(rungs), [r for r in rungs if r < max_steps]
    if s.warmup_steps > low:
        problems.append(
            f"lr_scheduler.warmup_steps = {s.warmup_steps} is past the first rung at step {low}: the learning rate "
            f"is not constant at the rung steps; set lr_scheduler.warmup_steps <= {low} (or raise min)"
        )
    if below_max:
        last = max(below_max)
        allowed = (max_steps - last) / max_steps
        if s.decay_ratio is None:
            problems.append(
                "lr_scheduler.decay_ratio is unset: the learning rate decays right after warmup and is not "
                f"constant at the rung steps; set lr_scheduler.decay_ratio (warmup-stable-decay) <= {allowed:.3g}"
            )
        elif max_steps - round(max_steps * s.decay_ratio) < last:
            problems.append(
                f"lr_scheduler.decay_ratio = {s.decay_ratio} starts the decay before the rung at step {last} (of "
                f"{max_steps}): the learning rate is not constant there; set lr_scheduler.decay_ratio <= {allowed:.3g}"
            )
    if problems:
        raise ConfigError([f"{where} scheduler: trial {trial.id}: {p}" for p in problems])


def _with(trial: Trial, values: dict, folder: str | None = None, **changes) -> Trial:
    from flame.config.loader import apply_overrides

    if folder is not None:
        values = {**values, "job.dump_folder": folder}
    assert trial.config is not None
    config = apply_overrides(trial.config, values, where=f"trial {trial.id}")
    return dataclasses.replace(trial, config=config, folder=folder or trial.folder, **changes)


def trunk(trial: Trial, steps: int, max_steps: int, keep: list[int]) -> Trial:
    """The trial's trunk trained up to ``steps`` on the schedule of ``max_steps``."""
    values = {
        "training.steps": steps,
        "lr_scheduler.schedule_steps": max_steps,
        "checkpoint.enable_checkpoint": True,
        "checkpoint.keep_steps": sorted(k for k in keep if k < max_steps),
    }
    return _with(trial, values, steps=steps)


def cooldown_folder(trial: Trial, steps: int) -> str:
    return os.path.join(os.path.dirname(trial.folder), "cooldowns", f"{trial.id}-s{steps}")


def cooldown(trunk_trial: Trial, ratio: float) -> Trial:
    """The cool-down fork of a trunk at its rung (``trunk_trial.steps``)."""
    step = trunk_trial.steps
    assert trunk_trial.config is not None
    checkpoint = os.path.join(trunk_trial.folder, trunk_trial.config.checkpoint.folder, f"step-{step}")
    folder = cooldown_folder(trunk_trial, step)
    extra = cooldown_steps(step, ratio)
    values = cooldown_overrides(checkpoint, step, ratio)
    return _with(trunk_trial, values, folder, id=f"{trunk_trial.id}@s{step}-cooldown", steps=step + extra)


def metric_at(folder: str, metric: str, step: int) -> float | None:
    """The value of ``metric`` logged at ``step`` in the run's metrics.jsonl (the last such record)."""
    found = None
    try:
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("step") == step and isinstance(record.get(metric), (int, float)):
                    found = float(record[metric])
    except OSError:
        return None
    return found


def finite_or_nan(value: float | None) -> float | None:
    """A metric as a rung result: None stays None (failed); NaN and inf stay (they rank last)."""
    return value if value is None or math.isfinite(value) else float("nan")
