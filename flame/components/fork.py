"""Runs laid out for a longer schedule, forks of another run's checkpoint, and rung checkpoints.

These are what a trial scheduler (``flame/experiments/schedulers``) builds on, and each is a plain flag:

* ``--lr_scheduler.schedule_steps S``: the schedule (warmup, stable phase, decay) is laid out over ``S``
  steps while the run stops at ``training.steps``. A *trunk* paused at step ``N < S`` and resumed later
  with a larger ``training.steps`` continues exactly as the straight run would: torchtitan's schedule
  state is only the step count, the factor is recomputed from the config on resume.
* ``--checkpoint.fork_from <run>/checkpoint/step-N``: a new run folder starts from another run's full
  checkpoint (model, optimizer, lr-schedule step, every rank's data position, RNG, step ``N``). The
  source run's ``config.toml`` must agree on the model and on everything that decides the data stream,
  and its checkpoint on the data-parallel world size; a mismatch is a ``ConfigError`` before any work.
* ``--checkpoint.keep_steps 3,9,27``: checkpoints at these steps whatever the interval, kept whatever
  ``keep_latest_k`` says (a scheduler releases them with ``release_kept_steps`` when a trial ends).
* A **cool-down fork** (``cooldown_overrides``): a fork from step ``N`` that decays the learning rate over
  ``D`` more steps with the run's own decay type (WSD's decay) and validates at its end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tomllib
from typing import Any

from flame.config.schema import JobConfig

# What decides the data stream a checkpoint's loader position belongs to: a fork must keep these.
DATA_KEYS = (
    "dataset",
    "dataset_name",
    "dataset_split",
    "data_dir",
    "data_files",
    "data_probs",
    "text_column",
    "streaming",
    "shuffle_buffer_size",
    "sequence_shuffle_buffer",  # with the next two, the sequence shuffle's windows (flame.data.sequence_shuffle)
    "gradient_accumulation_steps",
    "seq_len",
    "context_len",
    "varlen",
    "batch_size",
    "num_workers",
    "seed",
)


def fork_source(path: str) -> tuple[str, int | None]:
    """``(<run folder>, N)`` of ``<run folder>/<checkpoint folder>/step-N``; N is None for another name."""
    path = os.path.normpath(path)
    name = os.path.basename(path)
    step = int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None
    return os.path.dirname(os.path.dirname(path)), step


def _model_config(path: str) -> Any:
    """The model config's JSON content (a file, or a folder's config.json); None when unreadable."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _same_paths(value: Any) -> Any:
    """``value`` with entries that name existing files or folders made absolute (a relative and an absolute
    spelling of one data file are the same data)."""
    if isinstance(value, list):
        return [_same_paths(v) for v in value]
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


def _dp_ranks(checkpoint: str) -> int:
    """Data-parallel ranks whose loader positions the checkpoint holds (``dataloader.dp_rank_<i>``)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    return sum(1 for k in keys if k.startswith("dataloader.dp_rank_"))


def fork_problems(config: JobConfig, dp_world_size: int) -> list[str]:
    """Why ``--checkpoint.fork_from`` cannot start this run (empty when it can)."""
    from flame.utils._checkpoint_io import is_model_only

    ck = config.checkpoint
    path = ck.fork_from
    flag = f"--checkpoint.fork_from {path}"
    if not path:
        return []
    if ck.initial_load_hf:
        return [f"{flag}: also --checkpoint.initial_load_hf is set; a run starts from one of them"]
    if ck.create_seed_checkpoint:
        return [f"{flag}: --checkpoint.create_seed_checkpoint writes initial weights; it cannot fork"]
    if not os.path.isfile(os.path.join(path, ".metadata")):
        what = "does not exist" if not os.path.exists(path) else "is not a complete checkpoint (no .metadata)"
        return [f"--checkpoint.fork_from: {path!r} {what}; give a step folder <run>/checkpoint/step-N of another run"]
    own = os.path.abspath(os.path.join(config.job.dump_folder, ck.folder))
    if os.path.commonpath([own, os.path.abspath(path)]) == own:
        return [f"{flag} is this run's own checkpoint; resume it with --checkpoint.load_step instead"]
    if is_model_only(path):
        return [f"{flag}: holds model weights only (no optimizer, data position or step) and cannot be forked"]
    run, step = fork_source(path)
    problems = []
    if step is not None and step >= config.training.steps:
        problems.append(
            f"{flag}: the fork starts at step {step}; --training.steps {config.training.steps} must be larger"
        )
    source_toml = os.path.join(run, "config.toml")
    try:
        with open(source_toml, "rb") as f:
            source = tomllib.load(f)
    except (OSError, ValueError):
        missing = f"{flag}: {source_toml} (the source run's config) is missing or unreadable; it is needed to check the model and data"  # fmt: skip
        return [*problems, missing]
    src_model, src_training = source.get("model", {}), source.get("training", {})
    fix = "fork from a checkpoint of a run with the same settings, or start this run without --checkpoint.fork_from"
    mine, theirs = _model_config(config.model.config), _model_config(src_model.get("config", ""))
    if mine is not None and theirs is not None:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k != "vocab_size")
        if differ:
            shown = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in differ[:4])
            problems.append(f"{flag}: another model shape than the source run's ({shown}); {fix}")
    for key in ("norm_type", "tokenizer_path"):
        if _same_paths(src_model.get(key, "")) != _same_paths(getattr(config.model, key)):
            problems.append(
                f"{flag}: --model.{key} {getattr(config.model, key)!r} differs from the source run's "
                f"{src_model.get(key, '')!r}; {fix}"
            )
    defaults = JobConfig().training
    for key in DATA_KEYS:
        ours, default = getattr(config.training, key), getattr(defaults, key)
        if _same_paths(src_training.get(key, default)) != _same_paths(ours):
            problems.append(
                f"{flag}: --training.{key} {ours!r} differs from the source run's {src_training.get(key, default)!r} "
                f"(the checkpoint's data position belongs to that data stream); {fix}"
            )
    ranks = _dp_ranks(path)
    if ranks and ranks != dp_world_size:
        problems.append(
            f"{flag}: the checkpoint holds the data positions of {ranks} data-parallel ranks, this run has "
            f"{dp_world_size}; fork with the source run's layout"
        )
    return problems


def schedule_problems(config: JobConfig) -> list[str]:
    """The schedule's length against the run's, and the rung checkpoints."""
    problems = []
    t, s, ck = config.training, config.lr_scheduler, config.checkpoint
    if s.schedule_steps is not None and s.schedule_steps < t.steps:
        problems.append(
            f"--lr_scheduler.schedule_steps {s.schedule_steps} is below --training.steps {t.steps}: a run cannot go "
            "past the end of its schedule (raise schedule_steps, or leave it unset for training.steps)"
        )
    if ck.keep_steps:
        if not ck.enable_checkpoint:
            problems.append(
                "--checkpoint.keep_steps only applies with --checkpoint.enable_checkpoint; it would be ignored"
            )
        bad = [k for k in ck.keep_steps if k < 1]
        if bad:
            problems.append(f"--checkpoint.keep_steps must be steps >= 1, got {bad}")
    return problems


def schedule_length(config: JobConfig) -> int:
    """Steps the lr schedule is laid out over."""
    s = config.lr_scheduler
    return s.schedule_steps if s.schedule_steps is not None else config.training.steps


def paused(config: JobConfig) -> bool:
    """Whether the run stops before the end of its schedule (a trunk to be continued; not exported)."""
    return config.training.steps < schedule_length(config)


def cooldown_steps(step: int, ratio: float) -> int:
    """Steps of a cool-down from ``step``: ``ratio`` of the steps trained so far, at least one."""
    return max(1, math.ceil(ratio * step - 1e-9))


def cooldown_overrides(checkpoint: str, step: int, ratio: float) -> dict[str, Any]:
    """Dotted overrides that make a run a cool-down fork of ``checkpoint`` (a step folder at ``step``).

    The fork's schedule is the trunk's up to ``step`` (same warmup, stable after it) and then decays over
    ``D = cooldown_steps(step, ratio)`` steps with the run's own ``decay_type`` and ``lr_min``: torchtitan's
    WSD with ``schedule_steps = step + D`` and ``decay_ratio = D / (step + D)`` (its rounding gives D back
    exactly). The run validates at its last step; it needs no checkpoints of its own."""
    extra = cooldown_steps(step, ratio)
    total = step + extra
    return {
        "checkpoint.fork_from": checkpoint,
        "checkpoint.enable_checkpoint": False,
        "checkpoint.keep_steps": [],
        "training.steps": total,
        "lr_scheduler.schedule_steps": total,
        "lr_scheduler.decay_ratio": extra / total,
        "validation.enable": True,
    }


def release_kept_steps(run_folder: str, checkpoint_folder: str = "checkpoint", keep_latest_k: int = 0) -> list[int]:
    """After a trial ended (finished or stopped): apply ``keep_latest_k`` to its checkpoints, rung ones
    included (0 keeps all); the newest complete one always stays. The removed steps."""
    from flame.utils._checkpoint_io import available_steps

    folder = os.path.join(run_folder, checkpoint_folder)
    complete = available_steps(folder)
    doomed = complete[: -max(keep_latest_k, 1)] if keep_latest_k > 0 else []
    for step in doomed:
        shutil.rmtree(os.path.join(folder, f"step-{step}"), ignore_errors=True)
    return doomed
