"""Checkpoints: torchtitan's DCP CheckpointManager plus flame's train state.

Layout: ``<dump_folder>/<checkpoint.folder>/step-N/`` holding the model under its Hugging Face
state-dict keys, the optimizer (FQN-keyed), the lr schedule, every data-parallel rank's loader
state, and ``train_state`` (step, counters, every rank's RNG). DCP writes ``.metadata`` last, so a
step folder without it (a crash during the save) is never resumed from.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import flame.distributed.titan  # noqa: F401  (before any torchtitan import)
from flame.config.schema import JobConfig

from torchtitan.components.checkpointer import CheckpointManager

logger = logging.getLogger("flame")


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


class Checkpointer:
    """When to save (every N steps or seconds, and at the end) and what to resume from."""

    def __init__(
        self, config: JobConfig, *, model, optimizers, lr_schedulers, dataloader, train_state: TrainState, device
    ):
        ck = config.checkpoint
        self.enabled = ck.enable_checkpoint and not ck.create_seed_checkpoint
        self.interval_type = ck.interval_type
        self.interval = ck.interval
        self.load_step = ck.load_step
        self.device = device
        self._last_save_time = time.monotonic()
        self.manager = CheckpointManager(
            CheckpointManager.Config(
                enable=ck.enable_checkpoint or ck.create_seed_checkpoint,
                folder=ck.folder,
                interval=1,  # flame decides when to save (steps or seconds); see should_save
                keep_latest_k=ck.keep_latest_k,
                load_step=ck.load_step,
                last_save_model_only=ck.model_weights_only,
                export_dtype=ck.export_dtype,  # type: ignore[arg-type]
                async_mode=ck.async_mode,  # type: ignore[arg-type]
                initial_load_model_only=False,
            ),
            dataloader=dataloader,
            model_parts=[model],
            optimizers=optimizers,
            lr_schedulers=lr_schedulers,
            states={"train_state": train_state},
            sd_adapter=None,
            base_folder=config.job.dump_folder,
        )

    def load(self) -> bool:
        """Resume from ``load_step`` (-1: the newest complete checkpoint); False on a fresh start.

        A model-only ``step-0`` (a seed checkpoint, or ``convert_hf_to_dcp`` output) gives the initial
        weights and training starts at step 1.
        """
        if not self.enabled:
            return False
        return self.manager.load(step=self.load_step)

    def should_save(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.interval_type == "steps":
            return step % self.interval == 0
        # Seconds: rank 0's clock decides for everyone, so all ranks enter the collective save.
        due = torch.tensor(
            [time.monotonic() - self._last_save_time >= self.interval], dtype=torch.int32, device=self.device
        )
        dist.broadcast(due, src=0)
        return bool(due.item())

    def save(self, step: int, last_step: bool = False) -> None:
        """Save now (call when ``should_save`` said so, or at the last step)."""
        if self.enabled:
            self.manager.save(step, last_step=last_step)
            self._last_save_time = time.monotonic()

    def save_seed(self) -> str:
        """Write the freshly initialised weights as a model-only ``step-0`` that any layout trains from."""
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.manager.folder, "step-0")
        dcp.save(self.manager.states["model"].state_dict(), checkpoint_id=path)
        logger.info("seed checkpoint written to %s", path)
        return path

    def close(self) -> None:
        self.manager.maybe_wait_for_saving()
        self.manager.close()
