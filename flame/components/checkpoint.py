"""Checkpoints: torchtitan's DCP CheckpointManager plus flame's train state, retention and safety rules.

Layout: ``<dump_folder>/<checkpoint.folder>/step-N/`` holding the model under its Hugging Face
state-dict keys, the optimizer (FQN-keyed), the lr schedule, every data-parallel rank's loader
state, and ``train_state`` (step, counters, every rank's RNG).

torchtitan's manager writes and reads the folders; flame decides around it, thinly:

* **Completeness.** DCP writes ``.metadata`` last (temporary name, then rename), so a step folder
  without it is a save that was interrupted: it is reported and never resumed from. Before a step
  is written, folders of that step and later ones are removed (interrupted saves, or the checkpoints
  of a run abandoned by an older ``load_step``), so a ``.metadata`` always describes the files beside
  it and an automatic resume never jumps into another run.
* **Which step to resume.** ``load_step`` or the newest complete, resumable checkpoint. A model-only
  folder (a final ``model_weights_only`` export) is skipped; a model-only ``step-0`` (a seed
  checkpoint or ``convert_hf_to_dcp`` output) gives the initial weights. Keys and shapes are checked
  against the model first: a checkpoint of another model config is a ``ConfigError``, not a DCP crash.
* **Retention.** flame purges, not torchtitan: torchtitan skips the purge after the last-step save
  (one too many kept), lags one checkpoint in async mode, and counts interrupted folders. Here only
  complete checkpoints count, the final one included, and an in-flight async save is never touched.
* **Hugging Face start.** Without any checkpoint, ``initial_load_hf`` gives the initial weights.
* **Forks.** Without a checkpoint of its own, ``fork_from`` (another run's step folder) gives the full
  state, through torchtitan's ``initial_load_path`` with everything loaded (``flame/components/fork.py``
  checks the source run's settings before any work; the tensors are checked here as for a resume).
* **Rung checkpoints.** ``keep_steps`` are saved whatever the interval and never purged by
  ``keep_latest_k`` (a trial scheduler releases them when the trial ends).
* **Save errors.** A save that fails with an ``OSError`` (a full disk, a quota, a read-only folder)
  removes its incomplete step folder, so the newest complete checkpoint stays the one a restart
  resumes from, and raises ``CheckpointSaveError`` with one clear message instead of DCP's multi-rank
  traceback dump.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import flame.distributed.titan  # noqa: F401  (before any torchtitan import)
from flame.components.errors import RunError
from flame.config.errors import ConfigError
from flame.config.schema import JobConfig
from flame.utils._checkpoint_io import available_steps, incomplete_steps, is_model_only, match_keys, tensor_metadata

from torchtitan.components.checkpointer import CheckpointManager

logger = logging.getLogger("flame")
RECORD = "record.json"  # a checkpoint's notes beside its tensors (see Checkpointer)


class CheckpointSaveError(RunError):
    """A checkpoint could not be written (full disk, quota, permissions)."""


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, a cause or context, or one rank's failure in DCP's CheckpointException."""
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        item = pending.pop(0)
        if isinstance(item, tuple):  # DCP keeps (exception, stack summary) per failed rank
            item = item[0]
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError):
            return item
        failures = getattr(item, "failures", None)
        if isinstance(failures, dict):
            pending.extend(failures.values())
        pending.extend([item.__cause__, item.__context__])
    return None


@dataclass
class TrainState:
    """Counters that resume with the run, and the RNG state of every rank."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    elapsed_seconds: float = 0.0
    rng_states: list[torch.Tensor] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        # Every rank's RNG, gathered so that the one saved object holds them all.
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, torch.get_rng_state())
        buffer = io.BytesIO()
        torch.save(states, buffer)
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "elapsed_seconds": self.elapsed_seconds,
            "rng": buffer.getvalue(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.elapsed_seconds = float(state["elapsed_seconds"])
        states = torch.load(io.BytesIO(state["rng"]), weights_only=True)
        rank = dist.get_rank()
        if rank < len(states):  # a run resumed on more ranks keeps its fresh seeds on the new ones
            torch.set_rng_state(states[rank])


def _on_rank0(fn) -> Any:
    """Run ``fn`` on rank 0 and give its result (or its ConfigError) to every rank.

    Decisions read from the shared file system are taken once, so that ranks never disagree about
    which step to load (and none waits forever in a collective that another rank skipped).
    """
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ConfigError as e:
            box[0] = ("config", e.problems)
        except Exception as e:  # any failure reaches every rank, instead of leaving them in the broadcast
            box[0] = ("failed", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "config":
        raise ConfigError(value)
    if status == "failed":
        raise RuntimeError(f"rank 0 could not read the checkpoint folder: {value}")
    return value


class Checkpointer:
    """When to save (every N steps or seconds, and at the end), what to resume from, what to keep."""

    def __init__(
        self,
        config: JobConfig,
        *,
        model,
        optimizers,
        lr_schedulers,
        dataloader,
        train_state: TrainState,
        device,
        record: dict[str, Any] | None = None,
        record_problems: Any = None,
    ):
        """``record``: what every checkpoint of this run notes beside its tensors (``record.json``: the
        distillation teacher and loss, or nothing); ``record_problems(stored, path)``: why a checkpoint whose
        record is ``stored`` (None: it has none) cannot be resumed by this run (checked before loading)."""
        ck = config.checkpoint
        self.record, self.record_problems = record, record_problems
        self.enabled = ck.enable_checkpoint and not ck.create_seed_checkpoint
        self.folder = os.path.join(config.job.dump_folder, ck.folder)
        self.interval_type = ck.interval_type
        self.interval = ck.interval
        self.load_step = ck.load_step
        self.keep_latest_k = ck.keep_latest_k
        self.keep_steps = set(ck.keep_steps)
        self.initial_load_hf = ck.initial_load_hf
        self.fork_from = os.path.abspath(ck.fork_from) if ck.fork_from else ""
        # The model, or its pipeline stages on this rank (each then holds only some of the weights).
        self.model_parts = model if isinstance(model, list) else [model]
        self.pipelined = config.experimental.pipeline_parallel_degree > 1
        self.device = device
        self.loaded_from = "fresh start"  # what load() did, in words, for the start-up log line
        self.clock = time.monotonic  # seconds; replaceable so that tests can drive interval_type seconds
        self._last_save_time = self.clock()
        self.manager = CheckpointManager(
            CheckpointManager.Config(
                # a fork loads through the manager even when this run saves no checkpoints of its own
                enable=ck.enable_checkpoint or ck.create_seed_checkpoint or bool(ck.fork_from),
                folder=ck.folder,
                interval=1,  # flame decides when to save (steps or seconds); see should_save
                keep_latest_k=0,  # flame purges (see the module docstring)
                load_step=ck.load_step,
                last_save_model_only=ck.model_weights_only,
                export_dtype=ck.export_dtype,  # type: ignore[arg-type]
                async_mode=ck.async_mode,  # type: ignore[arg-type]
                initial_load_model_only=False,  # a fork takes everything: optimizer, data, schedule, step
                initial_load_path=self.fork_from or None,
            ),
            dataloader=dataloader,
            model_parts=self.model_parts,
            optimizers=optimizers,
            lr_schedulers=lr_schedulers,
            states={"train_state": train_state},
            sd_adapter=None,
            base_folder=config.job.dump_folder,
        )

    # ---- loading ---------------------------------------------------------------------------------

    def _step_to_load(self) -> int | None:
        """The step to resume from (rank 0 decides): ``load_step``, else the newest resumable one."""
        complete = available_steps(self.folder)
        interrupted = incomplete_steps(self.folder)
        if interrupted:
            logger.warning(
                "incomplete checkpoint folder(s) in %s: %s (no .metadata: the save was interrupted); not resumed "
                "from, rewritten or removed later",
                self.folder,
                ", ".join(f"step-{s}" for s in interrupted),
            )
        listing = ", ".join(map(str, complete)) or "none"
        if self.load_step != -1:
            path = os.path.join(self.folder, f"step-{self.load_step}")
            if self.load_step not in complete:
                raise ConfigError(
                    f"--checkpoint.load_step {self.load_step}: {path} is not a complete checkpoint "
                    f"(complete steps in {self.folder}: {listing})"
                )
            if self.load_step > 0 and is_model_only(path):
                raise ConfigError(
                    f"--checkpoint.load_step {self.load_step}: {path} holds model weights only (a final export "
                    f"with --checkpoint.model_weights_only) and cannot be resumed; complete steps: {listing}"
                )
            newer = [s for s in complete if s > self.load_step]
            if newer:
                logger.warning(
                    "resuming from step %d although newer checkpoints exist (%s); they belong to the earlier "
                    "run and are removed when this run saves its first checkpoint",
                    self.load_step,
                    ", ".join(map(str, newer)),
                )
            return self.load_step
        for step in reversed(complete):
            if step == 0 or not is_model_only(os.path.join(self.folder, f"step-{step}")):
                return step
            logger.warning("step-%d holds model weights only (a final export); resuming from an earlier one", step)
        return None

    def _check_fits_model(self, path: str) -> None:
        """Keys and shapes of the checkpoint at ``path`` against the model: a ConfigError naming the first mismatch."""
        fix = (
            "it was written for another model config; resume with the --model.config (and --model.norm_type) "
            "the run was trained with, or start in a fresh --job.dump_folder"
        )
        if path == self.fork_from:
            fix = "it was written for another model config; fork from a run of this model"
        stored = tensor_metadata(path)
        for part in self.model_parts:
            match_keys(part, stored, path, fix, allow_extra=self.pipelined)

    def _check_record(self, path: str) -> None:
        file = os.path.join(path, RECORD)
        stored = None
        if os.path.isfile(file):
            with open(file) as f:
                stored = json.load(f)
        problems = self.record_problems(stored, path)
        if problems:
            raise ConfigError(problems)

    def load(self) -> bool:
        """Restore the run's state, or set initial weights; False when training starts from scratch.

        With checkpointing on: ``load_step`` (-1: the newest complete, resumable checkpoint). A
        model-only ``step-0`` (a seed checkpoint, or ``convert_hf_to_dcp`` output) gives the initial
        weights and training starts at step 1. With no checkpoint of its own, ``fork_from`` (if set)
        gives the whole state of another run's checkpoint, else ``initial_load_hf`` (if set) the
        initial weights.
        """
        step = _on_rank0(self._step_to_load) if self.enabled else None
        if step is not None:
            if step > 0 and self.record_problems is not None:
                _on_rank0(lambda: self._check_record(os.path.join(self.folder, f"step-{step}")))
            self._check_fits_model(os.path.join(self.folder, f"step-{step}"))
            self.manager.load(step=step)
            self.loaded_from = "initial weights from step-0" if step == 0 else f"resumed at step {step}"
            return True
        if self.fork_from:
            self._check_fits_model(self.fork_from)
            self.manager.load(step=-1)  # no checkpoint here: torchtitan loads initial_load_path, in full
            self.loaded_from = f"forked from {self.fork_from} at step {self.manager.states['train_state'].step}"
            return True
        if self.initial_load_hf:
            from flame.components.hf_init import load_hf_weights

            for part in self.model_parts:
                load_hf_weights(part, self.initial_load_hf, stage_only=self.pipelined)
            self.loaded_from = f"initial weights from Hugging Face folder {self.initial_load_hf}"
            return True
        return False

    # ---- saving ----------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        if not self.enabled:
            return False
        if step in self.keep_steps:  # the same on every rank: no rank enters the broadcast below alone
            return True
        if self.interval_type == "steps":
            return step % self.interval == 0
        # Seconds: rank 0's clock decides for everyone, so all ranks enter the collective save.
        due = torch.tensor(
            [self.clock() - self._last_save_time >= self.interval], dtype=torch.int32, device=self.device
        )
        dist.broadcast(due, src=0)
        return bool(due.item())

    def save(self, step: int, last_step: bool = False) -> None:
        """Save now (call when ``should_save`` said so, or at the last step), then apply ``keep_latest_k``.

        In async mode the previous save is finished first; the last step is always saved synchronously.
        An OSError (full disk ...) becomes a ``CheckpointSaveError``: the incomplete step folder is removed
        (rank 0, after DCP reported the failure on every rank, so no rank still writes there), which frees
        the space and leaves the newest complete checkpoint as the one to resume from.
        """
        if not self.enabled:
            return
        try:
            self._save(step, last_step)
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            error = os_error_in(e)
            if error is None or isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise self._save_error(step, error) from None

    def _save_error(self, step: int, error: OSError) -> CheckpointSaveError:
        path = os.path.join(self.folder, f"step-{step}")
        if dist.get_rank() == 0 and not os.path.isfile(os.path.join(path, ".metadata")):
            shutil.rmtree(path, ignore_errors=True)
        complete = available_steps(self.folder)
        keep = (
            f"the newest complete checkpoint, step-{complete[-1]} in {self.folder}, is intact: fix the cause "
            "and run the same command again to resume from it"
            if complete
            else "no complete checkpoint exists yet, so a new run starts from scratch"
        )
        reason = error.strerror or str(error)
        code = f" (errno {error.errno})" if error.errno else ""
        return CheckpointSaveError(
            f"checkpoint step-{step} could not be written to {path}: {reason}{code}. "
            f"The incomplete folder was removed; {keep}"
        )

    def _save(self, step: int, last_step: bool) -> None:
        self.manager.maybe_wait_for_saving()
        if dist.get_rank() == 0:
            self._remove_from(step)
            if self.record is not None:  # beside the tensors DCP writes next (its .metadata comes last)
                os.makedirs(os.path.join(self.folder, f"step-{step}"), exist_ok=True)
                with open(os.path.join(self.folder, f"step-{step}", RECORD), "w") as f:
                    json.dump(self.record, f, indent=1)
        dist.barrier()
        self.manager.save(step, last_step=last_step)
        self._purge()
        self._last_save_time = self.clock()

    def _remove_from(self, step: int) -> None:
        """Remove every step folder at or after ``step`` before ``step`` is written.

        Saves happen in increasing step order, so such folders are never this run's: a folder left by
        an interrupted save (its stale files must not mix with the new save's), or checkpoints of an
        earlier run that this one abandoned by resuming an older ``load_step`` (left in place, they would
        make a later automatic resume jump back into that other run).
        """
        later = sorted(s for s in available_steps(self.folder) + incomplete_steps(self.folder) if s >= step)
        for old in later:
            shutil.rmtree(os.path.join(self.folder, f"step-{old}"), ignore_errors=True)
        if later:
            logger.info("removed step folders %s (an interrupted save, or an earlier run's) before saving", later)

    def _purge(self) -> None:
        """Keep the newest ``keep_latest_k`` complete checkpoints and every ``keep_steps`` one; drop older
        ones and interrupted leftovers.

        Only complete folders count. An incomplete folder newer than every complete one may be an async
        save in flight and is left alone; older incomplete folders are leftovers of an interrupted save.
        """
        if self.keep_latest_k <= 0 or dist.get_rank() != 0:
            return
        complete = available_steps(self.folder)
        doomed = [s for s in complete[: -self.keep_latest_k] if s not in self.keep_steps]
        if complete:
            doomed += [s for s in incomplete_steps(self.folder) if s < complete[-1]]
        for step in doomed:
            shutil.rmtree(os.path.join(self.folder, f"step-{step}"), ignore_errors=True)
        if doomed:
            logger.info("checkpoints removed (keep_latest_k %d): %s", self.keep_latest_k, doomed)

    def save_seed(self) -> str:
        """Write the initial weights as a model-only ``step-0`` that any layout trains from."""
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.manager.folder, "step-0")
        dcp.save(self.manager.states["model"].state_dict(), checkpoint_id=path)
        logger.info("seed checkpoint written to %s", path)
        return path

    def close(self) -> None:
        """Finish a save in flight, apply retention to it, release torchtitan's threads."""
        if self.enabled:
            self.manager.maybe_wait_for_saving()
            self._purge()
        self.manager.close()
