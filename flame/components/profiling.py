"""torch.profiler traces every ``profiling.profile_freq`` steps, on CPU and GPU alike.

Each trace covers one step after a short warmup and goes to
``<dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json`` (Chrome/Perfetto format).
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
