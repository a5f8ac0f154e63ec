"""Checks across sections, run before any work starts.

``validate`` collects every problem it finds and raises one ``ConfigError`` listing them all, each
naming the flag and what is allowed, so a user fixes a config in one round trip.

The checks come in two tiers. ``static_problems`` needs the config, the world size and the file system
only: no torch, no model code, so the command (``flame.cli``) runs it in a fraction of a second, before
its heavy imports, and a wrong number or a missing file fails at once. ``validate`` runs it again with
the checks that need torch, the model's config or the device (optimizer names, pipeline schedules,
tensor- and context-parallel shapes, GPU-only features, distillation); it is what ``Trainer`` and the
experiment planner call.
"""

from __future__ import annotations

import os
from typing import Any

from flame.config.errors import ConfigError
from flame.config.schema import JobConfig, Training
from flame.distributed.parallel_dims import resolve_dp_shard

# Features whose flags exist (the upstream CLI contract) but which this version of flame does not
# run yet: setting them is an error, never silently ignored. Maps flag -> (default, what it is).
NOT_YET: dict[str, tuple[object, str]] = {
    "optimizer.early_step_in_backward": (False, "optimizer steps in backward"),
    "memory_estimation.enabled": (False, "memory estimation"),
}

# Features that need a CUDA GPU: a clear error on a CPU-only machine.
GPU_ONLY: dict[str, tuple[object, str]] = {
    "experimental.enable_async_tensor_parallel": (False, "async tensor parallelism"),
    "profiling.enable_memory_snapshot": (False, "CUDA memory snapshots"),
    "training.enable_cpu_offload": (False, "CPU offload (on a CPU-only machine everything is on the CPU already)"),
    "checkpoint.async_mode": ("disabled", "pinned-memory async checkpointing"),
}
_GPU_ONLY_VALUES = {"checkpoint.async_mode": "async_with_pinned_mem"}

# Flags that only mean something together with another one: (flag, default, needs, condition text).
DEPENDENT: list[tuple[str, object, str, str]] = [
    ("experimental.pipeline_parallel_split_points", [], "experimental.pipeline_parallel_degree", "> 1"),
    ("experimental.pipeline_parallel_microbatches", None, "experimental.pipeline_parallel_degree", "> 1"),
    ("experimental.context_parallel_rotate_method", "allgather", "experimental.context_parallel_degree", "> 1"),
    ("training.disable_loss_parallel", False, "training.tensor_parallel_degree", "> 1"),
    ("activation_checkpoint.selective_ac_option", "2", "activation_checkpoint.mode", "= selective"),
]


def _get(config: JobConfig, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def validate(config: JobConfig, world_size: int, device_type: str = "cpu") -> None:
    """Raise one ConfigError listing every problem of ``config`` for ``world_size`` ranks."""
    problems = static_problems(config, world_size)
    problems.extend(_runtime_problems(config, world_size, device_type, valid_so_far=not problems))
    if problems:
        raise ConfigError(problems)


def check_static(config: JobConfig, world_size: int) -> None:
    """Raise one ConfigError listing the problems ``static_problems`` finds (the command's first pass)."""
    problems = static_problems(config, world_size)
    if problems:
        raise ConfigError(problems)


def static_problems(config: JobConfig, world_size: int) -> list[str]:
    """The problems found from the config's values, the world size and the file system alone.

    Imports nothing heavy (this module's imports, the data checks and the fork's schedule checks are
    plain Python); a test runs the command's first pass and asserts that torch stays unimported."""
    problems: list[str] = []
    t, o, s = config.training, config.optimizer, config.lr_scheduler

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for flag, value in (
        ("--training.steps", t.steps),
        ("--training.batch_size", t.batch_size),
        ("--training.seq_len", t.seq_len),
        ("--training.context_len", t.context_len),
        ("--training.gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("--metrics.log_freq", config.metrics.log_freq),
        ("--checkpoint.interval", config.checkpoint.interval),
        ("--comm.init_timeout_seconds", config.comm.init_timeout_seconds),
        ("--comm.train_timeout_seconds", config.comm.train_timeout_seconds),
    ):
        need(value > 0, f"{flag} must be a positive integer, got {value}")
    need(o.lr > 0, f"--optimizer.lr must be positive, got {o.lr}")
    need(o.eps > 0, f"--optimizer.eps must be positive, got {o.eps}")
    need(
        o.weight_decay >= 0,
        f"--optimizer.weight_decay must be >= 0, got {o.weight_decay}",
    )
    betas = o.betas or [o.beta1, o.beta2]
    need(
        len(betas) == 2,
        f"--optimizer.betas takes two numbers (beta1,beta2), got {o.betas}",
    )
    need(
        all(0 <= b < 1 for b in betas),
        f"optimizer betas must be in [0, 1), got {betas}",
    )
    need(
        s.warmup_steps >= 0,
        f"--lr_scheduler.warmup_steps must be >= 0, got {s.warmup_steps}",
    )
    need(
        s.decay_ratio is None or 0 < s.decay_ratio <= 1,
        f"--lr_scheduler.decay_ratio must be in (0, 1] or unset, got {s.decay_ratio}",
    )
    need(
        0 <= s.lr_min <= 1,
        f"--lr_scheduler.lr_min is a fraction of optimizer.lr in [0, 1], got {s.lr_min}",
    )
    need(
        t.max_norm >= 0,
        f"--training.max_norm must be >= 0 (0 disables clipping), got {t.max_norm}",
    )
    need(t.num_workers >= 0, f"--training.num_workers must be >= 0, got {t.num_workers}")
    need(
        t.prefetch_factor > 0,
        f"--training.prefetch_factor must be positive, got {t.prefetch_factor}",
    )
    need(
        t.gc_freq >= 0,
        f"--training.gc_freq must be >= 0 (0: automatic), got {t.gc_freq}",
    )
    _check_fault_tolerance(config, problems)
    ck = config.checkpoint
    _check_checkpoint(config, problems)
    if config.activation_checkpoint.mode == "selective":
        opt = config.activation_checkpoint.selective_ac_option
        need(
            opt == "op" or (opt.isdigit() and int(opt) > 0),
            f"--activation_checkpoint.selective_ac_option must be 'op' or a positive layer frequency, got {opt!r}",
        )

    for flag, default, needs, condition in DEPENDENT:
        other: Any = _get(config, needs)
        active = other == "selective" if condition == "= selective" else other > 1
        if _get(config, flag) != default and not active:
            problems.append(f"--{flag} only applies with --{needs} {condition}; it would be ignored here")
    if ck.create_seed_checkpoint:
        need(world_size == 1, f"--checkpoint.create_seed_checkpoint runs on one process (NGPU=1), not {world_size}")
        seed = os.path.join(config.job.dump_folder, ck.folder, "step-0")
        need(not os.path.exists(seed), f"--checkpoint.create_seed_checkpoint: {seed} exists already; remove it first")

    e = config.experimental
    if e.pipeline_parallel_microbatches is not None and e.pipeline_parallel_microbatches < 1:
        problems.append(
            f"--experimental.pipeline_parallel_microbatches must be >= 1, got {e.pipeline_parallel_microbatches}"
        )

    _check_data(config, world_size, problems)
    _check_files(config, problems)
    _check_degrees(config, world_size, problems)
    from flame.components.fork import schedule_problems  # the schedule's length, rung checkpoints

    problems.extend(schedule_problems(config))
    for flag, (default, what) in NOT_YET.items():
        if _get(config, flag) != default:
            problems.append(f"--{flag}: {what} is not supported yet in this version of flame; leave it at {default!r}")
    _check_compile_features(config, world_size, problems)
    return problems


def _runtime_problems(config: JobConfig, world_size: int, device_type: str, valid_so_far: bool) -> list[str]:
    """The checks that import torch or model code, or need the device: ``validate``'s second tier."""
    import flame.models.families  # noqa: F401  (the checks below look model families up)

    problems: list[str] = []
    _check_optimizer_name(config.optimizer.name, problems)
    e = config.experimental
    from flame.parallel.pipeline import SCHEDULES, schedule_names

    if e.pipeline_parallel_schedule not in SCHEDULES:
        problems.append(
            f"--experimental.pipeline_parallel_schedule: {e.pipeline_parallel_schedule!r} is not a supported "
            f"schedule; choose one of: {schedule_names()}"
        )
    if _degrees_valid(config):
        _check_parallel_shapes(config, problems, device_type)
    from flame.components.fork import fork_problems  # trunks and forks

    if config.checkpoint.fork_from and valid_so_far and not problems:  # the fork's checks need a valid layout
        dp = resolve_dp_shard(config, world_size) * config.training.data_parallel_replicate_degree
        problems.extend(fork_problems(config, dp))
    for flag, (default, what) in GPU_ONLY.items():
        current = _get(config, flag)
        bad = current == _GPU_ONLY_VALUES[flag] if flag in _GPU_ONLY_VALUES else current != default
        if bad and device_type != "cuda":
            problems.append(f"--{flag}={current}: {what} needs a CUDA GPU; none is visible on this machine")
    from flame.parallel.float8 import float8_problems

    problems.extend(float8_problems(config, device_type))
    from flame.distill.checks import distill_problems  # the [distill] section (flame/distill/checks.py)

    problems.extend(distill_problems(config, world_size, device_type))
    return problems


def _check_compile_features(config: JobConfig, world_size: int, problems: list[str]) -> None:
    t, e = config.training, config.experimental
    if e.enable_async_tensor_parallel and not (t.compile and t.tensor_parallel_degree > 1):
        problems.append(
            "--experimental.enable_async_tensor_parallel needs --training.compile and --training.tensor_parallel_degree "
            "> 1 (inductor overlaps the tensor-parallel collectives with the matmuls of the compiled layers)"
        )
    if e.enable_compiled_autograd and world_size > 1:
        problems.append(
            f"--experimental.enable_compiled_autograd runs on one process only (NGPU=1), not {world_size}: with torch "
            "2.13 the compiled backward skips FSDP2's gradient hooks (the gradients lose their DTensor sharding; "
            "measured on 2 ranks), and pipeline schedules run each stage's backward themselves"
        )


def _check_checkpoint(config: JobConfig, problems: list[str]) -> None:
    ck = config.checkpoint
    if ck.keep_latest_k < 0:
        problems.append(f"--checkpoint.keep_latest_k must be 0 (keep all) or a positive count, got {ck.keep_latest_k}")
    if ck.load_step < -1:
        problems.append(f"--checkpoint.load_step must be -1 (latest) or a step >= 0, got {ck.load_step}")
    elif ck.load_step != -1 and not ck.enable_checkpoint:
        problems.append("--checkpoint.load_step only applies with --checkpoint.enable_checkpoint; it would be ignored")
    if ck.export_dtype != "float32" and not ck.model_weights_only:
        problems.append(
            "--checkpoint.export_dtype only applies with --checkpoint.model_weights_only (the final export); "
            "resumable checkpoints keep the training dtype"
        )
    if not ck.folder.strip():
        problems.append("--checkpoint.folder must not be empty")
    if ck.initial_load_hf:
        folder = ck.initial_load_hf
        if not os.path.exists(folder):
            problems.append(f"--checkpoint.initial_load_hf: {folder!r} does not exist (a Hugging Face model folder)")
        elif not os.path.isdir(folder):
            problems.append(f"--checkpoint.initial_load_hf: {folder!r} is not a folder (a Hugging Face model folder)")
        elif not any(name.endswith(".safetensors") for name in os.listdir(folder)):
            problems.append(
                f"--checkpoint.initial_load_hf: {folder!r} holds no .safetensors weights; save the model with "
                "save_pretrained() (safetensors is its default) or convert it with convert_hf_to_dcp"
            )


def _check_fault_tolerance(config: JobConfig, problems: list[str]) -> None:
    t = config.training
    if t.max_consecutive_bad_steps < 0:
        problems.append(
            f"--training.max_consecutive_bad_steps must be >= 0 (0: never stop), got {t.max_consecutive_bad_steps}"
        )
    elif t.max_consecutive_bad_steps != Training.max_consecutive_bad_steps and not t.skip_nan_inf:
        problems.append(
            "--training.max_consecutive_bad_steps only applies with --training.skip_nan_inf (without it a bad "
            "step is not skipped); it would be ignored"
        )


def _check_optimizer_name(name: str, problems: list[str]) -> None:
    import torch

    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        names = sorted(
            n
            for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
        )
        problems.append(
            f"--optimizer.name: {name!r} is not an optimizer in torch.optim; choose one of: {', '.join(names)}"
        )


def _check_data(config: JobConfig, world_size: int, problems: list[str]) -> None:
    # The data checks live with the data code (build_dataloader runs them too); here they also
    # report flags that would be ignored, such as context_len without varlen.
    from flame.data.checks import data_problems, dataset_problems, shuffle_problems, source_problems
    from flame.data.flags import training_flags, validation_flags

    problems.extend(data_problems(config.training, ignored_flags=True))
    if not dataset_problems(training_flags(config.training)):  # entries well formed: check their files
        problems.extend(source_problems(training_flags(config.training)))
    dp = config.training.data_parallel_replicate_degree * resolve_dp_shard(config, world_size)
    problems.extend(shuffle_problems(config.training, max(dp, 1)))
    if config.validation.enable:
        flags = validation_flags(config.validation, config.training)
        own = [p for p in dataset_problems(flags) if p.startswith("--validation.")]  # training's are above
        problems.extend(own)
        if not own and not flags.borrowed:
            problems.extend(source_problems(flags))
    if config.training.varlen and config.experimental.pipeline_parallel_degree > 1:
        # the pipeline stages pass hidden states only: document boundaries would be lost silently
        problems.append(
            "--training.varlen does not work with --experimental.pipeline_parallel_degree > 1 yet (pipeline "
            "stages take no document boundaries); turn one of them off"
        )


def _check_files(config: JobConfig, problems: list[str]) -> None:
    m = config.model
    if not m.config:
        problems.append("--model.config is required: a JSON config file or a folder with config.json")
    elif not os.path.exists(m.config):
        problems.append(f"--model.config: {m.config!r} does not exist (a JSON file or a folder with config.json)")
    if not m.tokenizer_path:
        problems.append("--model.tokenizer_path is required: a folder (or hub name) that AutoTokenizer loads")
    elif _looks_local(m.tokenizer_path) and not os.path.exists(m.tokenizer_path):
        problems.append(f"--model.tokenizer_path: {m.tokenizer_path!r} does not exist")


def _looks_local(path: str) -> bool:
    """A path (rather than a hub name such as 'org/name'): absolute, relative with ./, or existing parent."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.isdir(os.path.dirname(path))


def _degrees(config: JobConfig) -> dict[str, int]:
    t, e = config.training, config.experimental
    return {
        "--training.data_parallel_replicate_degree": t.data_parallel_replicate_degree,
        "--training.tensor_parallel_degree": t.tensor_parallel_degree,
        "--experimental.pipeline_parallel_degree": e.pipeline_parallel_degree,
        "--experimental.context_parallel_degree": e.context_parallel_degree,
    }


def _degrees_valid(config: JobConfig) -> bool:
    shard = config.training.data_parallel_shard_degree
    return all(v >= 1 for v in _degrees(config).values()) and (shard == -1 or shard >= 1)


def _check_degrees(config: JobConfig, world_size: int, problems: list[str]) -> None:
    t, e = config.training, config.experimental
    degrees = _degrees(config)
    for flag, value in degrees.items():
        if value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if t.data_parallel_shard_degree == 0 or t.data_parallel_shard_degree < -1:
        problems.append(f"--training.data_parallel_shard_degree must be -1 or >= 1, got {t.data_parallel_shard_degree}")
        return
    if not _degrees_valid(config):
        return
    dp_shard = resolve_dp_shard(config, world_size)
    product = dp_shard
    for v in degrees.values():
        product *= v
    if e.context_parallel_degree == 1 and t.tensor_parallel_degree > 1 and t.seq_len % t.tensor_parallel_degree:
        problems.append(
            f"--training.seq_len {t.seq_len} is not divisible by --training.tensor_parallel_degree "
            f"{t.tensor_parallel_degree}: sequence parallelism splits every sequence over the tensor-parallel ranks"
        )
    if product != world_size:
        problems.append(
            f"parallel degrees multiply to {product} (dp_replicate {t.data_parallel_replicate_degree} x dp_shard "
            f"{dp_shard} x tp {t.tensor_parallel_degree} x pp {e.pipeline_parallel_degree} x cp "
            f"{e.context_parallel_degree}) but the world size is {world_size}; they must multiply to the world size"
        )


def _check_parallel_shapes(config: JobConfig, problems: list[str], device_type: str) -> None:
    """Context- and tensor-parallel checks against the model's config and the device (torch, model code)."""
    t, e = config.training, config.experimental
    if e.context_parallel_degree > 1:
        from flame.parallel.checks import context_parallel_problems

        problems.extend(context_parallel_problems(config, device_type))
    if t.tensor_parallel_degree > 1 and os.path.exists(config.model.config):
        from flame.parallel.checks import tensor_parallel_problems

        problems.extend(tensor_parallel_problems(config))
