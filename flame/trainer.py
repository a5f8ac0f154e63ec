"""The training loop, and ``Trainer.__init__`` wiring the components around it.

The trainer is distribution-oblivious: in a notebook it creates a one-rank process group itself,
under torchrun it joins the launcher's group; the loop is the same code either way.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import flame.distributed.titan  # noqa: F401  (before any torchtitan import)
from flame.builders import (
    build_checkpointing,
    build_distillation,
    build_loss,
    build_metrics,
    build_model,
    build_optimizer,
    build_tokenizer,
    build_validator,
    data_parallel_layout,
    step_options,
)
from flame.components.loss import num_targets
from flame.components.metrics import device_name, memory_stats
from flame.components.profiling import MemorySnapshots, maybe_profile
from flame.config.schema import JobConfig
from flame.config.validate import validate
from flame.data.loader import build_dataloader
from flame.data.mixing import describe_sources
from flame.distributed.parallel_dims import build_parallel_dims
from flame.distributed.setup import device_for_rank, init_distributed, launched_world_size, set_collective_timeout
from flame.models.flops import peak_tflops
from flame.parallel.float8 import precompute_scales

from torchtitan.distributed import utils as dist_utils

logger = logging.getLogger("flame")


class Trainer:
    """Builds the model, data, optimizer and components for ``config``, then trains with ``train()``."""

    def __init__(self, config: JobConfig) -> None:
        """Validate ``config``, then build the run's parts (``flame.builders``) in order."""
        self.config, t = config, config.training
        self.device = device_for_rank()
        # The run's one validation (the CLI leaves it to here): so that flame.train() from Python is checked
        # as the command line is, and before the process group, so that a bad config stops every rank first.
        validate(config, launched_world_size(), self.device.type)
        self.owns_process_group = init_distributed(config.comm.init_timeout_seconds, config.comm.trace_buf_size)
        try:
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
            self.parallel_dims = build_parallel_dims(config, self.world_size)
            self.layout = data_parallel_layout(self.parallel_dims)
            self.tokenizer = build_tokenizer(config)
            self.built = build_model(config, self.tokenizer, self.parallel_dims, self.device)
            self.model, self.model_parts, self.pipeline = self.built.parts[0], self.built.parts, self.built.pipeline
            self.loss = build_loss(config, self.built, self.parallel_dims, self.device)
            # distillation: (1 - alpha) CE + alpha KD, the teacher on the same mesh (flame/distill/mode.py)
            self.loss = build_distillation(
                config, self.loss, self.tokenizer, self.parallel_dims, self.built, self.layout
            )
            self.options = step_options(config)
            self.dataloader = build_dataloader(
                t, self.tokenizer, dp_rank=self.layout.dp_rank, dp_world_size=self.layout.dp_world_size
            )
            self.memory_snapshots = MemorySnapshots(config, self.rank)
            self.validator = build_validator(config, self.tokenizer, self.layout, self.device, self.built.shard_batch)
            self.optimizers, self.lr_schedulers = build_optimizer(self.model_parts, config)
            self.state, self.checkpointer, self.fault = build_checkpointing(
                config, self.model_parts, self.optimizers, self.lr_schedulers, self.dataloader, self.device, self.loss
            )
            torch.manual_seed(t.seed + self.rank)  # dropout differs per rank; restored on resume
            self.checkpointer.load()  # resume, or initial weights from step-0 or a Hugging Face folder
            self.metrics = build_metrics(config, self.rank, resume_step=self.state.step)
        except BaseException:
            # A caller in a notebook keeps no half-built process group around after an error.
            if self.owns_process_group and dist.is_initialized():
                dist.destroy_process_group()
            raise
        self.peak_tflops = peak_tflops(device_name(self.device), t.mixed_precision_param)
        self.last_validation: dict[str, Any] | None = None
        self.summary: dict[str, Any] = {}  # the end-of-run summary, once training finished
        self._log_start()

    def _log_start(self) -> None:
        dims = self.parallel_dims
        logger.info(
            "model %s: %.2fM parameters; world %d (dp_replicate %d, dp_shard %d)%s on %s; %s",
            self.built.name,
            self.built.num_params / 1e6,
            self.world_size,
            dims.dp_replicate,
            dims.dp_shard,
            f" x cp {dims.cp}" if dims.cp_enabled else "",
            self.device,
            self.checkpointer.loaded_from,
        )

    # ---- the loop -------------------------------------------------------------------------------

    def forward_backward(self, batch: dict[str, torch.Tensor], num_global_tokens: torch.Tensor) -> torch.Tensor:
        """Sum of token losses of one micro-batch; backward of its share of the global mean."""
        # Gradient reduction averages over the data- and context-parallel ranks; scale so the result is
        # the mean over every target token of the global batch (not a mean of per-micro-batch means).
        scale = self.layout.num_gradient_ranks / num_global_tokens
        with self.loss.context():
            if self.pipeline is not None:  # the last stage's loss and its backward run inside the schedule
                return self.pipeline.forward_backward(batch, scale)
            loss_sum = self.loss(batch)
            with self.options.backward_context():
                (loss_sum * scale).backward()
        loss_sum = loss_sum.detach()
        return loss_sum.full_tensor() if isinstance(loss_sum, DTensor) else loss_sum

    def shard_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a loader batch: its context-parallel shard, or the whole batch without CP."""
        return self.built.shard_batch(batch)

    @torch.no_grad()
    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed token loss of one batch without gradients, under any layout (for validation);
        under context parallelism ``batch`` is this rank's shard (``shard_batch``)."""
        with self.loss.context():
            if self.pipeline is not None:
                return self.pipeline.loss_sum(batch)
            loss_sum = self.loss.eval_loss_sum(batch)
        return loss_sum.full_tensor() if isinstance(loss_sum, DTensor) else loss_sum

    @torch.no_grad()
    def eval_sums(self, batch: dict[str, torch.Tensor]) -> Any:
        """``eval_loss_sum``, or with a distilling loss its validation sums (loss, KL to the teacher, ...)."""
        if self.pipeline is not None or not hasattr(self.loss, "eval_sums"):
            return self.eval_loss_sum(batch)
        with self.loss.context():
            return self.loss.eval_sums(batch)

    @functools.cached_property
    def model_parameters(self) -> list[torch.Tensor]:
        """The model's parameters, listed once at the first step: they keep their identity from then on
        (the optimizer holds them too), and walking the modules every step cost ~0.2 ms of CPU time."""
        return [p for part in self.model_parts for p in part.parameters()]

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        t = self.config.training
        self.loss.begin_step(self.state.step, batches)  # before sharding (a distiller's cached targets)
        batches = [self.shard_batch(b) for b in batches]
        local_tokens = sum(int(num_targets(b["labels"])) for b in batches)
        num_tokens = torch.tensor(float(local_tokens), device=self.device)
        if self.layout.loss_mesh is not None:
            dist.all_reduce(num_tokens, group=self.layout.loss_mesh.get_group())
        loss_sum = sum(self.forward_backward(b, num_tokens) for b in batches)
        grad_norm = dist_utils.clip_grad_norm_(
            [p for p in self.model_parameters if p.grad is not None],
            t.max_norm if t.max_norm > 0 else math.inf,
            foreach=True,
            pp_mesh=self.parallel_dims.get_optional_mesh("pp"),
        )
        skipped = t.skip_nan_inf and not torch.isfinite(grad_norm).item()
        if skipped:
            self.state.skipped_steps += 1
            logger.warning("step %d: gradient norm is %s; step skipped", self.state.step, grad_norm.item())
        else:
            self.optimizers.step()
            if self.options.precompute_float8_scales:
                precompute_scales(self.model_parts)
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        return {
            "loss_sum": loss_sum,
            "terms": self.loss.take_terms(),  # sums of the loss's parts (a distiller's ce_loss, kd_loss)
            "num_tokens": num_tokens,
            "grad_norm": grad_norm,
            "local_tokens": local_tokens,
            "skipped": skipped,
        }

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from self.dataloader

    def train(self) -> dict[str, Any]:
        """Train until ``training.steps``; return the last logged metrics."""
        if self.config.checkpoint.create_seed_checkpoint:
            self.checkpointer.save_seed()
            return {}
        with maybe_profile(self.config, self.rank, self.state.step) as profiler:
            return self._train_loop(profiler)

    def _train_loop(self, profiler) -> dict[str, Any]:
        t, m = self.config.training, self.config.metrics
        data = self._batches()
        if t.gc_freq > 0:
            gc.disable()  # collected every gc_freq steps instead, at the same point on every rank
        session_start = time.perf_counter()
        run_start = session_start - self.state.elapsed_seconds  # elapsed time counts across resumes
        start_step, start_tokens = self.state.step, self.state.tokens_seen
        window = self._new_window(self.state.step)
        last: dict[str, Any] = {}
        while self.state.step < t.steps:
            self.state.step += 1
            step = self.state.step
            if t.gc_freq > 0 and step % t.gc_freq == 0:
                gc.collect(1)
            fetch_start = time.perf_counter()
            batches = [next(data) for _ in range(t.gradient_accumulation_steps)]
            window["data_wait"] += time.perf_counter() - fetch_start
            lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
            out = self.train_step(batches)
            window["tokens"] += out["local_tokens"]
            window["loss"] += out["loss_sum"] / out["num_tokens"]  # this rank's share of the step's mean
            window["rank_loss"] += out["loss_sum"] / max(out["local_tokens"], 1)  # this rank's own mean
            window["global_tokens"] += out["num_tokens"]
            for name, value in out["terms"].items():
                window.setdefault(name, torch.zeros((), device=self.device)).add_(value / out["num_tokens"])
            if step == start_step + 1:
                set_collective_timeout(self.config.comm.train_timeout_seconds)
            is_last = step == t.steps
            # All ranks agree whether a stop signal arrived (anywhere) or the run diverged.
            stop = self.fault.after_step(step, skipped=out["skipped"], is_last=is_last)
            extra = {}
            if self.validator is not None and self.validator.should_run(step, is_last):
                extra = self.validator.validate(self.model_parts, self.eval_sums)
                self.loss.validated()
                self.last_validation = extra
            if step % m.log_freq == 0 or is_last or extra or stop:
                last = self._log(step, lr, out, window, run_start, extra)
                window = self._new_window(step)
            self.state.elapsed_seconds = time.perf_counter() - run_start
            if is_last or stop or self.checkpointer.should_save(step):
                self._flush_tokens(window)
                self.checkpointer.save(step, last_step=is_last)  # a clear error on a full disk
            if stop:
                self.fault.stop(step)  # preempted: leaves the marker for the launcher; diverged: raises
                break
            if profiler is not None:
                profiler.step()
            self.memory_snapshots.step(step)
        if t.gc_freq > 0:
            gc.enable()
        if self.fault.reason is None:  # a preempted session is no finished run: no summary
            self._summary(last, start_tokens, time.perf_counter() - session_start)
        return last

    def _new_window(self, step: int) -> dict[str, Any]:
        """Accumulators between two log lines (no device sync until the log step)."""
        zeros = {k: torch.zeros((), device=self.device) for k in ("loss", "rank_loss", "global_tokens")}
        return {"start": time.perf_counter(), "step": step, "tokens": 0, "data_wait": 0.0, **zeros}

    def _flush_tokens(self, window: dict[str, Any]) -> None:
        """Add the window's global target tokens to the train state (one device sync)."""
        self.state.tokens_seen += int(window["global_tokens"].item())
        window["global_tokens"].zero_()

    def _log(
        self, step: int, lr: float, out: dict[str, Any], window: dict[str, Any], run_start: float, extra: dict
    ) -> dict[str, Any]:
        """Log the loss averaged over the steps since the last log line (exactly the step's loss
        with ``log_freq`` 1) and its maximum over ranks, the last step's gradient norm and lr,
        throughput, FLOPs, memory and time."""
        loss, rank_loss = window["loss"].clone(), window["rank_loss"].clone()
        terms = {name: window[name].clone() for name in out["terms"]}
        loss_mesh = self.layout.loss_mesh
        if loss_mesh is not None:
            dist.all_reduce(loss, group=loss_mesh.get_group())
            dist.all_reduce(rank_loss, op=dist.ReduceOp.MAX, group=loss_mesh.get_group())
            for value in terms.values():
                dist.all_reduce(value, group=loss_mesh.get_group())
        self._flush_tokens(window)
        num_steps = step - window["step"]
        now = time.perf_counter()
        seconds = max(now - window["start"], 1e-9)
        tokens_per_second = window["tokens"] / seconds
        tflops = tokens_per_second * self.built.flops_per_token / 1e12
        record = {
            "step": step,
            "loss": loss.item() / num_steps,
            "loss_max": rank_loss.item() / num_steps,
            **{name: value.item() / num_steps for name, value in terms.items()},
            **self.loss.step_values(),
            "grad_norm": out["grad_norm"].item(),
            "lr": lr,
            "tokens_per_second": tokens_per_second,
            "tflops": tflops,
            "mfu": 100 * tflops / self.peak_tflops if self.peak_tflops else None,
            **memory_stats(self.device),
            "data_wait_share": window["data_wait"] / seconds,
            "skipped_steps": self.state.skipped_steps,
            "tokens_seen": self.state.tokens_seen,
            "elapsed_seconds": now - run_start,
            "eta_seconds": seconds / num_steps * (self.config.training.steps - step),
            **extra,
        }
        # Mixing: each source's realized documents/tokens/shares, summed over the data-parallel ranks.
        batch_mesh = self.layout.batch_mesh
        group = batch_mesh.get_group() if batch_mesh is not None else None
        record.update(self.dataloader.source_metrics(group, self.device))
        self.metrics.log(record)
        if self.rank == 0 and (mix := describe_sources(record)):
            logger.info(mix)
        return record

    def _summary(self, last: dict[str, Any], start_tokens: int, seconds: float) -> None:
        """One line (and ``summary.json``) at the end, whatever log_freq was."""
        ck = self.config.checkpoint
        dump = self.config.job.dump_folder
        checkpoint = os.path.join(dump, ck.folder, f"step-{self.state.step}") if ck.enable_checkpoint else None
        summary = {
            "steps": self.state.step,
            "tokens": self.state.tokens_seen,
            "wall_seconds": self.state.elapsed_seconds,
            "tokens_per_second": (self.state.tokens_seen - start_tokens) / max(seconds, 1e-9),
            "final_loss": last.get("loss"),
            "final_validation_loss": (self.last_validation or {}).get("validation_loss"),
            "checkpoint": checkpoint,
            "hf_export": dump if checkpoint else None,
        }
        self.summary = summary
        self.metrics.summary(summary)

    def close(self) -> None:
        """Finish pending saves and close sinks; tear down the process group if we created it."""
        self.checkpointer.close()
        self.metrics.close()
        self.fault.close()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclasses.dataclass
class TrainResult:
    """What ``flame.train`` returns: the last logged metrics, the end-of-run summary and the run folder."""

    metrics: dict[str, Any]  # the last metrics record (step, loss, grad_norm, ..., validation_* when validated)
    summary: dict[str, Any]  # summary.json's content; empty for a preempted session or a seed checkpoint
    dump_folder: str

    @property
    def checkpoint(self) -> str | None:
        """The last checkpoint's folder, when checkpoints were on."""
        return self.summary.get("checkpoint")

    @property
    def hf_export(self) -> str | None:
        """Where train.sh (or ``convert_dcp_to_hf``) puts the Hugging Face export of the last checkpoint."""
        return self.summary.get("hf_export")


def train(config: JobConfig) -> TrainResult:
    """Train with ``config`` in this process (one rank, or one rank of a torchrun job)."""
    trainer = Trainer(config)
    try:
        metrics = trainer.train()
        return TrainResult(metrics=metrics, summary=dict(trainer.summary), dump_folder=config.job.dump_folder)
    finally:
        trainer.close()
