"""Validation of the ``[distill]`` section, run by ``flame.config.validate`` before any work.

Every problem names the flag and what is allowed: a missing teacher, a teacher step that is not a
complete checkpoint, a teacher with another tokenizer (naming both tokenizers and sizes), α, T, β or
``top_k`` out of range, schedule flags without their schedule, a teacher cache made for another
config, and layouts distillation does not run under.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flame.config.errors import ConfigError


def enabled(distill: Any) -> bool:
    """Whether the run distils: a teacher in memory or a teacher cache."""
    return bool(distill.teacher or distill.teacher_cache)


def _defaults() -> Any:
    from flame.config.schema import Distill

    return Distill()


# flags that only apply with one alpha schedule: flag -> the schedules that read it
_SCHEDULE_FLAGS = {
    "alpha_start": ("linear", "wsd"),
    "alpha_end": ("wsd",),
    "alpha_warmup_steps": ("wsd",),
    "alpha_decay_ratio": ("wsd",),
}


def distill_problems(config: Any, world_size: int, device_type: str = "cpu") -> list[str]:
    """Every problem of ``config.distill`` (in the context of the whole config), as messages."""
    d, defaults = config.distill, _defaults()
    problems: list[str] = []
    if not enabled(d):
        changed = [f.name for f in dataclasses.fields(d) if getattr(d, f.name) != getattr(defaults, f.name)]
        return [
            f"--distill.{name} only applies with --distill.teacher or --distill.teacher_cache; it would be ignored"
            for name in changed
        ]
    for name in ("alpha", "alpha_start", "alpha_end"):
        value = getattr(d, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"--distill.{name} must be in [0, 1] (loss = (1 - alpha)*CE + alpha*KD), got {value}")
    if not d.temperature > 0:
        problems.append(
            f"--distill.temperature must be > 0 (the distributions are softmax(logits / T)), got {d.temperature}"
        )
    if not 0.0 <= d.beta <= 1.0:
        problems.append(f"--distill.beta must be in [0, 1] (0: forward_kl, 1: reverse_kl), got {d.beta}")
    elif d.beta != defaults.beta and d.loss != "jsd":
        problems.append(f"--distill.beta only applies with --distill.loss jsd (not {d.loss}); it would be ignored")
    if d.chunk_size < 0:
        problems.append(f"--distill.chunk_size must be >= 0 tokens (0: all at once), got {d.chunk_size}")
    if d.alpha_warmup_steps < 0:
        problems.append(f"--distill.alpha_warmup_steps must be >= 0, got {d.alpha_warmup_steps}")
    if not 0.0 <= d.alpha_decay_ratio <= 1.0:
        problems.append(f"--distill.alpha_decay_ratio must be in [0, 1], got {d.alpha_decay_ratio}")
    for name, schedules in _SCHEDULE_FLAGS.items():
        if getattr(d, name) != getattr(defaults, name) and d.alpha_schedule not in schedules:
            problems.append(
                f"--distill.{name} only applies with --distill.alpha_schedule {' or '.join(schedules)} "
                f"(not {d.alpha_schedule}); it would be ignored"
            )
    if (
        d.alpha_schedule == "wsd"
        and d.alpha_warmup_steps + d.alpha_decay_ratio * config.training.steps > config.training.steps
    ):
        problems.append(
            f"--distill.alpha_warmup_steps {d.alpha_warmup_steps} and --distill.alpha_decay_ratio {d.alpha_decay_ratio} "
            f"overlap: together they exceed --training.steps {config.training.steps}"
        )
    if d.teacher_dtype != defaults.teacher_dtype and not d.teacher:
        problems.append("--distill.teacher_dtype only applies with --distill.teacher (a cache holds log-probs)")
    if config.experimental.pipeline_parallel_degree > 1:
        problems.append(
            "--distill with --experimental.pipeline_parallel_degree > 1 is not supported: the KD term needs the "
            "teacher's logits of each micro-batch on the student's last stage, which flame's pipeline schedule "
            "does not pass; distil with FSDP, TP or CP instead (they combine with each other)"
        )
    problems += _vocabulary_problems(config, world_size)
    return problems


def _vocabulary_problems(config: Any, world_size: int) -> list[str]:
    """The teacher (or cache) against the student's tokenizer, and ``top_k`` against its vocabulary."""
    d = config.distill
    tokenizer_path = config.model.tokenizer_path
    if d.top_k is not None and d.top_k < 1:
        return [f"--distill.top_k must be >= 1 (unset: the whole vocabulary), got {d.top_k}"]
    if not tokenizer_path or not os.path.exists(tokenizer_path):
        return []  # reported by the file checks
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError):
        return []  # reported when the trainer loads it
    problems = []
    size = len(tokenizer)
    if d.top_k is not None and d.top_k > size:
        problems.append(
            f"--distill.top_k {d.top_k} is larger than the vocabulary of --model.tokenizer_path ({size:,} tokens)"
        )
    if d.teacher:
        from flame.distill.source import resolve_teacher, tokenizer_problem

        try:
            source = resolve_teacher(d.teacher, d.teacher_step)
        except ConfigError as e:
            return problems + e.problems
        problem = tokenizer_problem(tokenizer_path, source, tokenizer)
        if problem:
            problems.append(problem)
    elif d.teacher_step != -1:
        problems.append("--distill.teacher_step only applies with --distill.teacher (a flame run folder)")
    if d.teacher_cache:
        from flame.distill.cache_io import cache_problems

        problems += cache_problems(config, world_size, tokenizer)
    return problems
