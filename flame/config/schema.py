"""The config schema: one dataclass per TOML section, one field per flag.

Everything else derives from these classes: the ``--section.key`` argparse flags and their
``-h`` text (the ``help`` metadata), TOML loading, the ``config.toml`` written into every run
folder, and the job-array files that sweeps write. Field types drive parsing: ``bool`` flags are
switches, ``list[...]`` fields take comma lists (or TOML arrays), ``X | None`` fields may be unset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A config field: its default, one line of help (with units), and the allowed values."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    config_file: str = opt("", "TOML file with any of these sections; command-line flags override it")
    dump_folder: str = opt(
        "./outputs",
        "folder for everything a run writes (config, logs, checkpoints, metrics)",
    )
    description: str = opt("", "free text describing the run, kept in config.toml")
    print_args: bool = opt(False, "print the fully resolved config before training")
    dry_run: bool = opt(
        False, "build the parallel plan for NGPU x NNODE ranks in one CPU process (fake process group), report, exit"
    )


@dataclass
class Model:
    config: str = opt(
        "",
        "model config: a JSON file or a folder with config.json that AutoConfig reads",
    )
    tokenizer_path: str = opt("", "anything AutoTokenizer.from_pretrained loads (a local folder here)")
    norm_type: str = opt("", "override the config's norm implementation where the model family has one")


@dataclass
class Optimizer:
    name: str = opt("AdamW", "any optimizer class in torch.optim, by name (AdamW, Adam, SGD, ...)")
    lr: float = opt(8e-4, "peak learning rate")
    eps: float = opt(1e-8, "epsilon of Adam-style optimizers")
    weight_decay: float = opt(0.1, "weight decay")
    beta1: float = opt(0.9, "first Adam beta")
    beta2: float = opt(0.95, "second Adam beta")
    betas: list[float] = opt([], "beta1,beta2 in one flag; overrides beta1/beta2 when given")
    implementation: str = opt("foreach", "optimizer kernel", ("for-loop", "foreach", "fused"))
    early_step_in_backward: bool = opt(False, "step each parameter's optimizer as soon as its gradient is ready")


@dataclass
class LRScheduler:
    warmup_steps: int = opt(200, "steps of linear warmup from 0 to optimizer.lr")
    decay_ratio: float | None = opt(
        None,
        "unset: decay right after warmup; set: warmup-stable-decay, decaying over the last decay_ratio of steps",
    )
    decay_type: str = opt("linear", "shape of the decay", ("linear", "sqrt", "cosine"))
    lr_min: float = opt(0.0, "final learning rate as a fraction of optimizer.lr")
    schedule_steps: int | None = opt(
        None,
        "steps the schedule is laid out over (warmup, stable, decay); unset: training.steps. Larger than "
        "training.steps: the run stops early on a longer run's schedule and continues it exactly when resumed "
        "with a larger training.steps (a trunk of a trial scheduler)",
    )


@dataclass
class Training:
    batch_size: int = opt(8, "sequences per device per micro-batch")
    seq_len: int = opt(2048, "tokens in one packed sequence")
    context_len: int = opt(2048, "longest single sample in tokens with varlen; longer documents are split")
    varlen: bool = opt(
        False,
        "pack documents into one sequence with per-document attention (cu_seqlens)",
    )
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    steps: int = opt(10000, "optimizer steps to train for")
    max_norm: float = opt(1.0, "gradient clipping by global L2 norm; 0 disables clipping")
    skip_nan_inf: bool = opt(False, "skip optimizer steps whose gradient norm is NaN or Inf (and count them)")
    max_consecutive_bad_steps: int = opt(
        10,
        "with skip_nan_inf: after this many skipped steps in a row, save the last good state and stop "
        "with an error (0: never stop)",
    )
    dataset: list[str] = opt(
        [],
        "comma list: hub names, local folders, or builders (json, parquet, text, arrow)",
    )
    dataset_name: list[str] = opt([], "comma list: the config name of each dataset ('' for none)")
    dataset_split: list[str] = opt(["train"], "comma list: the split of each dataset")
    data_dir: list[str] = opt([], "comma list: the data_dir of each dataset ('' for none)")
    data_files: list[str] = opt(
        [],
        "comma list: the data files (paths or globs, ';' between several) of each dataset",
    )
    data_probs: list[float] = opt([], "comma list: sampling probability of each dataset")
    text_column: str = opt("", "column holding the text; default: 'text', else 'content'")
    streaming: bool = opt(False, "read datasets as streams (IterableDataset)")
    shuffle_buffer_size: int = opt(
        1000,
        "streaming: documents read into the shuffle buffer and emitted in a seeded order per block (1: no shuffling)",
    )
    sequence_shuffle_buffer: int | None = opt(
        None,
        "packed rows, over all data-parallel ranks, read ahead and dealt out in a seeded order so that a batch "
        "holds rows of many documents (each rank holds its share); 0 or 1: rows in stream order; unset: about "
        "4M tokens of rows (at least 16 steps), fewer when one epoch of a rank's data holds less",
    )
    num_workers: int = opt(0, "dataloader worker processes per rank")
    prefetch_factor: int = opt(2, "batches each worker loads ahead (with num_workers > 0)")
    pin_memory: bool = opt(False, "pin host memory of batches (GPU)")
    persistent_workers: bool = opt(False, "keep dataloader workers alive between epochs")
    seed: int = opt(42, "seed of weight init, data order and dropout")
    deterministic: bool = opt(False, "use deterministic algorithms only (slower)")
    compile: bool = opt(
        False, "torch.compile each decoder layer and the training loss (distillation: its fused CE + KD)"
    )
    gc_freq: int = opt(
        50,
        "run Python's garbage collector every this many steps (0: leave it automatic)",
    )
    mixed_precision_param: str = opt("bfloat16", "dtype of parameters in compute", ("bfloat16", "float32"))
    mixed_precision_reduce: str = opt("float32", "dtype of gradient reduction", ("float32",))
    data_parallel_replicate_degree: int = opt(1, "replicas of the model (DDP, or HSDP with dp_shard > 1)")
    data_parallel_shard_degree: int = opt(-1, "ranks a replica is sharded over (FSDP2); -1: all ranks left over")
    tensor_parallel_degree: int = opt(1, "tensor-parallel degree")
    disable_loss_parallel: bool = opt(False, "gather full logits instead of computing the loss on vocab shards (TP)")
    enable_cpu_offload: bool = opt(False, "keep parameters, gradients and optimizer state on the CPU (FSDP2)")


@dataclass
class Experimental:
    pipeline_parallel_degree: int = opt(1, "pipeline-parallel degree")
    pipeline_parallel_split_points: list[str] = opt([], "comma list of layer names where stages begin")
    pipeline_parallel_schedule: str = opt("1F1B", "a torch.distributed.pipelining schedule name")
    pipeline_parallel_microbatches: int | None = opt(None, "micro-batches per pipeline step (default: the stage count)")
    context_parallel_degree: int = opt(1, "context-parallel degree: ranks each sequence is split over")
    context_parallel_rotate_method: str = opt(
        "allgather",
        "how K/V move between CP ranks: allgather (everywhere), alltoall (torch's ring rotation, CUDA only)",
        ("allgather", "alltoall"),
    )
    enable_async_tensor_parallel: bool = opt(False, "overlap TP communication with compute (GPU, with compile)")
    enable_compiled_autograd: bool = opt(False, "compile the backward pass too")
    custom_model_path: str = opt(
        "",
        "module or folder whose import registers custom models with the Auto classes",
    )


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "activation checkpointing", ("none", "selective", "full"))
    selective_ac_option: str = opt("2", "selective mode: checkpoint every Nth layer (a number) or 'op'")


@dataclass
class Checkpoint:
    enable_checkpoint: bool = opt(False, "save DCP checkpoints and resume from the latest one")
    folder: str = opt("checkpoint", "checkpoint folder, relative to job.dump_folder")
    interval_type: str = opt("steps", "unit of checkpoint.interval", ("steps", "seconds"))
    interval: int = opt(500, "save every this many steps (or seconds)")
    model_weights_only: bool = opt(False, "final checkpoint: model weights only (smaller, not resumable)")
    export_dtype: str = opt(
        "float32",
        "dtype of a weights-only final checkpoint",
        ("float16", "bfloat16", "float32"),
    )
    create_seed_checkpoint: bool = opt(False, "write the initial weights as step-0 and exit (run with NGPU=1)")
    async_mode: str = opt(
        "disabled",
        "save in the background",
        ("disabled", "async", "async_with_pinned_mem"),
    )
    keep_latest_k: int = opt(0, "keep only the newest k complete checkpoints, the final one included (0 keeps all)")
    load_step: int = opt(-1, "resume from this step; -1: the latest complete one")
    initial_load_hf: str = opt(
        "",
        "Hugging Face model folder (safetensors) whose weights training starts from; "
        "used only while the checkpoint folder holds no checkpoint",
    )
    fork_from: str = opt(
        "",
        "a complete step folder of another run (<dump_folder>/checkpoint/step-N): this run starts from its full "
        "state (model, optimizer, lr schedule, data position, RNG, step) while its own checkpoint folder holds no "
        "checkpoint; the model, data and world size must be the source run's",
    )
    keep_steps: list[int] = opt(
        [],
        "comma list of steps saved whatever the interval and kept whatever keep_latest_k says (rung checkpoints)",
    )


@dataclass
class Metrics:
    log_freq: int = opt(10, "log metrics every this many steps")
    enable_tensorboard: bool = opt(False, "write TensorBoard event files")
    save_tb_folder: str = opt("tb", "TensorBoard folder, relative to job.dump_folder")
    rank_0_only: bool = opt(True, "only rank 0 writes TensorBoard files (else one folder per rank)")
    enable_wandb: bool = opt(False, "log to Weights & Biases (WANDB_MODE=offline works without network)")
    disable_color_printing: bool = opt(False, "plain console output without ANSI colours")


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "record torch profiler traces")
    save_traces_folder: str = opt("profile_traces", "trace folder, relative to job.dump_folder")
    profile_freq: int = opt(10, "record a trace every this many steps")
    enable_memory_snapshot: bool = opt(False, "dump CUDA memory snapshots (GPU)")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "snapshot folder, relative to job.dump_folder")


@dataclass
class Float8:
    enable_float8_linear: bool = opt(
        False, "float8 linear layers via torchao (GPU of compute capability 8.9+: H100, L40S, ...)"
    )
    enable_fsdp_float8_all_gather: bool = opt(False, "all-gather FSDP parameters in float8 (GPU)")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(False, "one all-reduce for all float8 scales (GPU)")
    scaling_type_input: str = opt("dynamic", "float8 scaling of inputs", ("dynamic", "delayed"))
    scaling_type_weight: str = opt("dynamic", "float8 scaling of weights", ("dynamic", "delayed"))
    scaling_type_grad_output: str = opt("dynamic", "float8 scaling of output gradients", ("dynamic", "delayed"))
    emulate: bool = opt(False, "emulate float8 matmuls (for tests on machines without float8 GPUs; eager only, slow)")


@dataclass
class Comm:
    init_timeout_seconds: int = opt(300, "timeout of process-group setup and the first step, in seconds")
    train_timeout_seconds: int = opt(100, "timeout of collectives after the first step, in seconds")
    trace_buf_size: int = opt(20000, "NCCL flight-recorder entries kept for debugging hangs (GPU)")


@dataclass
class MemoryEstimation:
    enabled: bool = opt(False, "estimate per-device memory before training")
    disable_fake_mode: bool = opt(False, "estimate with real tensors instead of fake ones")


@dataclass
class Validation:
    enable: bool = opt(False, "compute the validation loss every validation.freq steps (and at the end)")
    dataset: list[str] = opt([], "comma list like --training.dataset; empty: the training datasets")
    dataset_name: list[str] = opt([], "comma list: the config name of each validation dataset")
    dataset_split: list[str] = opt(["validation"], "comma list: the split of each validation dataset")
    data_dir: list[str] = opt([], "comma list: the data_dir of each validation dataset")
    data_files: list[str] = opt([], "comma list: the data files of each validation dataset")
    freq: int = opt(500, "validate every this many training steps")
    steps: int = opt(10, "batches per validation (the same batches every time)")
    batch_size: int = opt(8, "sequences per device per validation batch")


@dataclass
class Distill:
    """Knowledge distillation (README "Distillation"): on when ``teacher`` or ``teacher_cache`` is set."""

    teacher: str = opt(
        "",
        "teacher of knowledge distillation: a Hugging Face model folder, or a flame run folder (its checkpoint at "
        "teacher_step, read with the run's model config); empty: no distillation",
    )
    teacher_step: int = opt(-1, "flame run folder as teacher: its checkpoint step (-1: the latest complete one)")
    teacher_dtype: str = opt(
        "auto",
        "dtype of the teacher's weights and forward (auto: bfloat16 on GPU, float32 on CPU)",
        ("auto", "float32", "bfloat16", "float16"),
    )
    teacher_cache: str = opt(
        "",
        "folder written by python -m flame.distill.cache: train on its top-k teacher log-probs, no teacher in "
        "memory (every row's token fingerprint is checked)",
    )
    loss: str = opt(
        "forward_kl",
        "divergence of teacher P and student Q: forward_kl KL(P||Q), reverse_kl KL(Q||P), jsd (see beta), "
        "tvd 0.5*sum|P-Q|",
        ("forward_kl", "reverse_kl", "jsd", "tvd"),
    )
    beta: float = opt(
        0.5,
        "jsd: beta*KL(P||M) + (1-beta)*KL(Q||M) with M = beta*P + (1-beta)*Q (TRL's convention); "
        "beta 0 is exactly forward_kl, beta 1 exactly reverse_kl",
    )
    temperature: float = opt(
        1.0, "T: both distributions are softmax(logits / T); the KD term is scaled by T^2 (Hinton)"
    )
    alpha: float = opt(0.5, "weight of the KD term: loss = (1 - alpha)*CE + alpha*KD (the schedule's peak)")
    alpha_schedule: str = opt(
        "constant",
        "alpha over the steps: constant; linear from alpha_start at step 1 to alpha at the last step; wsd: "
        "alpha_start -> alpha over alpha_warmup_steps, alpha, then -> alpha_end over the last alpha_decay_ratio",
        ("constant", "linear", "wsd"),
    )
    alpha_start: float = opt(0.0, "linear/wsd: alpha at the start")
    alpha_end: float = opt(0.0, "wsd: alpha at the last step")
    alpha_warmup_steps: int = opt(0, "wsd: steps from alpha_start to alpha")
    alpha_decay_ratio: float = opt(0.0, "wsd: the last fraction of the steps, going from alpha to alpha_end")
    top_k: int | None = opt(
        None,
        "KD on the teacher's top-k tokens per position plus one bucket holding the rest of its mass (the student's "
        "distribution coarsened the same way); unset: the whole vocabulary",
    )
    chunk_size: int = opt(
        1024,
        "tokens per chunk of the KD computation: its fp32 memory is chunk x vocabulary (0: all tokens at once)",
    )


@dataclass
class JobConfig:
    """The whole configuration of a run: one attribute per TOML section."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    experimental: Experimental = field(default_factory=Experimental)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    float8: Float8 = field(default_factory=Float8)
    comm: Comm = field(default_factory=Comm)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)
    validation: Validation = field(default_factory=Validation)
    distill: Distill = field(default_factory=Distill)
