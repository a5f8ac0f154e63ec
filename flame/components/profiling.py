"""torch.profiler traces every ``profiling.profile_freq`` steps (CPU and GPU), and CUDA memory snapshots.

Each trace covers one step after a short warmup and goes to
``<dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json`` (Chrome/Perfetto format).
Memory snapshots (GPU only; validation rejects them on CPU) record every allocation from the start
and are dumped every ``profile_freq`` steps to
``<dump_folder>/<save_memory_snapshot_folder>/iteration_<step>/rank<r>_memory_snapshot.pickle``
(open them at https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger("flame")

_WARMUP_STEPS = 1


@contextlib.contextmanager
def maybe_profile(config, rank: int, start_step: int) -> Iterator[torch.profiler.profile | None]:
    """A profiler to ``step()`` once per training step, or None when profiling is off."""
    p = config.profiling
    if not p.enable_profiling:
        yield None
        return
    folder = os.path.join(config.job.dump_folder, p.save_traces_folder)
    freq = p.profile_freq
    # Record the last step of every window of ``freq`` steps.
    wait = max(freq - _WARMUP_STEPS - 1, 0)
    counter = {"step": start_step}

    def save(prof: torch.profiler.profile) -> None:
        out = os.path.join(folder, f"iteration_{counter['step']}")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"rank{rank}_trace.json")
        prof.export_chrome_trace(path)
        logger.info("profiler trace of step %d written to %s", counter["step"], path)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Skip ahead so that the recorded steps are multiples of freq, also after a resume.
    skip_first = (-start_step) % freq
    schedule = torch.profiler.schedule(wait=wait, warmup=min(_WARMUP_STEPS, freq - 1), active=1, skip_first=skip_first)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=save) as prof:
        original_step = prof.step

        def step() -> None:
            counter["step"] += 1
            original_step()

        prof.step = step  # type: ignore[method-assign]
        yield prof


class MemorySnapshots:
    """CUDA allocator history, dumped every ``profile_freq`` steps (a no-op object when disabled)."""

    def __init__(self, config, rank: int) -> None:
        p = config.profiling
        self.enabled = p.enable_memory_snapshot and torch.cuda.is_available()
        self.freq = p.profile_freq
        self.rank = rank
        self.folder = os.path.join(config.job.dump_folder, p.save_memory_snapshot_folder)
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def step(self, step: int) -> None:
        if not self.enabled or step % self.freq:
            return
        out = os.path.join(self.folder, f"iteration_{step}")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"rank{self.rank}_memory_snapshot.pickle")
        torch.cuda.memory._dump_snapshot(path)
        logger.info("CUDA memory snapshot of step %d written to %s", step, path)
