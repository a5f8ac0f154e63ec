"""Fault tolerance inside the training loop: preemption signals and the divergence stop.

**Preemption.** SIGTERM (Slurm's kill or preemption, torchrun's shutdown) and SIGUSR1 (Slurm's
``--signal``) only set a flag. After every step all ranks all-reduce their flags (MAX, one small
int64 tensor on a dedicated gloo group: no accelerator sync), so they stop at the same step even when
the signal reached them at different times or not at all. The trainer then saves a checkpoint, rank 0
writes ``<dump_folder>/preempted.json`` and the process exits 0: a non-zero exit would make
torchrun (with ``--max-restarts``) restart the workers instead of letting the job end. Launchers read
the marker: ``train.sh`` exits 75 (EX_TEMPFAIL: "run me again") and the Slurm script requeues the job,
which resumes from that checkpoint.

**Divergence.** With ``training.skip_nan_inf`` a step whose gradient norm is not finite is skipped
(the weights and optimizer keep the last good state). After ``training.max_consecutive_bad_steps``
such steps in a row the run saves a checkpoint of that last good state and stops with
``TrainingDiverged`` instead of burning compute on a model that no longer learns.

A save that fails is the checkpointer's to explain (``CheckpointSaveError``,
``flame/components/checkpoint.py``). ``flame.cli`` (the ``python -m flame.train`` command) turns the
``RunError`` subclasses (``flame/components/errors.py``) into one ``flame: error:`` line and exit code 1.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from flame.components.errors import RunError

logger = logging.getLogger("flame")

PREEMPTED_FILE = "preempted.json"  # in the dump folder; train.sh and scripts/slurm read it
REQUEUE_EXIT_CODE = 75  # train.sh's exit code after a preemption stop (EX_TEMPFAIL)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# The first stop signal this process received (None: none), and the handlers ours replaced.
_received: int | None = None
_previous: dict[int, Any] = {}


class TrainingDiverged(RunError):
    """Too many consecutive steps with a non-finite gradient norm."""


def _on_signal(signum: int, frame: Any) -> None:
    # Only record it: the loop acts at the end of the step, after all ranks agreed.
    global _received
    if _received is None:
        _received = signum


def install_signal_handlers() -> bool:
    """Catch SIGTERM and SIGUSR1 in this process (idempotent); False off the main thread, where Python cannot."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in STOP_SIGNALS:
        if sig not in _previous:
            _previous[sig] = signal.signal(sig, _on_signal)
    return True


def restore_signal_handlers() -> None:
    """Put back the handlers that ``install_signal_handlers`` replaced and forget a received signal."""
    global _received
    if threading.current_thread() is threading.main_thread():
        for sig, previous in _previous.items():
            signal.signal(sig, previous)
        _previous.clear()
    _received = None


def received_signal() -> int | None:
    """The stop signal this process received so far, if any."""
    return _received


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class FaultHandler:
    """The loop's fault-tolerance hooks: ``after_step`` decides (for all ranks) whether to stop, ``stop``
    ends a stopped run (after the trainer saved its checkpoint)."""

    def __init__(self, config, *, rank: int, world_size: int) -> None:
        t, ck = config.training, config.checkpoint
        self.rank = rank
        self.dump_folder = config.job.dump_folder
        self.folder = os.path.join(config.job.dump_folder, ck.folder)
        self.checkpointing = ck.enable_checkpoint and not ck.create_seed_checkpoint
        self.max_bad_steps = t.max_consecutive_bad_steps if t.skip_nan_inf else 0
        self.bad_steps = 0  # consecutive skipped steps up to now
        self.reason: str | None = None  # "signal" or "diverged" once the ranks agreed to stop
        self.stop_signal: int | None = None
        self._first_step = True
        install_signal_handlers()
        # A gloo group of its own: the flag lives on the CPU, so agreeing costs no device sync, and
        # its collectives never queue behind the model's on an accelerator stream.
        self.group = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=config.comm.init_timeout_seconds))
            if world_size > 1
            else None
        )

    @property
    def marker_path(self) -> str:
        return os.path.join(self.dump_folder, PREEMPTED_FILE)

    def after_step(self, step: int, skipped: bool, is_last: bool) -> bool:
        """Count a skipped step, then agree with every rank whether to stop after this step.

        True when a stop signal reached any rank (unless this was the last step anyway) or when the
        run diverged; ``reason`` says which. Every rank gets the same answer.
        """
        if self._first_step:
            self._first_step = False
            if self.rank == 0 and os.path.exists(self.marker_path):
                os.remove(self.marker_path)  # left by an earlier, preempted session of this run
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        diverged = 0 < self.max_bad_steps <= self.bad_steps
        flags = torch.tensor([received_signal() or 0, int(diverged)], dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if flags[1]:
            self.reason = "diverged"
        elif flags[0] and not is_last:
            self.reason, self.stop_signal = "signal", int(flags[0])
            here = "received here" if received_signal() else "received by another rank"
            logger.warning("%s (%s): stopping after step %d", _signal_name(self.stop_signal), here, step)
        return self.reason is not None

    def stop(self, step: int) -> None:
        """End a run that ``after_step`` stopped: raise for divergence, leave the marker after a signal."""
        if self.reason == "diverged":
            n = self.bad_steps
            saved = (
                f"a checkpoint of the last good state (the weights and optimizer after step {step - n}; the bad "
                f"steps were skipped) is {os.path.join(self.folder, f'step-{step}')}"
                if self.checkpointing
                else "checkpointing is off (--checkpoint.enable_checkpoint), so nothing was saved"
            )
            raise TrainingDiverged(
                f"training diverged: steps {step - n + 1}-{step} all had a non-finite gradient norm "
                f"(--training.max_consecutive_bad_steps {self.max_bad_steps}); {saved}. Lower --optimizer.lr or "
                "check the data, then resume with the same command"
            )
        name = _signal_name(self.stop_signal or 0)
        if not self.checkpointing:
            raise RunError(
                f"stopped by {name} after step {step}; checkpointing is off (--checkpoint.enable_checkpoint), "
                "so nothing was saved and running again starts from scratch"
            )
        checkpoint = os.path.join(self.folder, f"step-{step}")
        if self.rank == 0:
            record = {"step": step, "signal": name, "checkpoint": checkpoint}
            tmp = self.marker_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self.marker_path)
        logger.warning(
            "stopped by %s after step %d; checkpoint %s saved. Run the same command again to resume "
            "(train.sh exits %d for this; the Slurm script requeues the job)",
            name,
            step,
            checkpoint,
            REQUEUE_EXIT_CODE,
        )

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        restore_signal_handlers()
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
            self.group = None


_TIMEOUT_WORDS = ("timed out", "timeout")
_PEER_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe")


def explain_runtime_error(exc: BaseException, config) -> str | None:
    """One message for a failure the user can act on without a traceback, else None.

    A ``RunError`` explains itself. A collective that timed out or lost its peer means another rank
    stalled or died: say so and name the timeout flags, since the stack trace is only gloo/NCCL internals.
    """
    if isinstance(exc, RunError):
        return str(exc)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if first.startswith("[") and "] " in first:  # "[.../gloo/transport/tcp/pair.cc:553] Connection closed ..."
        first = first.split("] ", 1)[1]
    lowered = first.lower()
    comm = config.comm
    if any(word in lowered for word in _TIMEOUT_WORDS):
        return (
            f"a collective operation timed out ({first}); another rank stalled or died, see its log. Limits: "
            f"--comm.init_timeout_seconds {comm.init_timeout_seconds} until the first step is done, "
            f"--comm.train_timeout_seconds {comm.train_timeout_seconds} after it"
        )
    if any(word in lowered for word in _PEER_LOST_WORDS):
        return f"lost the connection to another rank ({first}); it crashed or was killed, see its log"
    return None
