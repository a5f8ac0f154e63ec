"""The weight α of the KD term over the training steps: loss = (1 − α(step))·CE + α(step)·KD.

* ``constant``: α at every step.
* ``linear``: from ``alpha_start`` at step 1 to ``alpha`` at the last step (``training.steps``).
* ``wsd`` (warmup-stable-decay, like the learning-rate schedule): from ``alpha_start`` to ``alpha`` over
  the first ``alpha_warmup_steps`` steps, ``alpha`` in the stable phase, then to ``alpha_end`` over the
  last ``alpha_decay_ratio`` of the steps (a student that ends on its own cross entropy).

α depends on the step only (not on any state), so a resumed run has the uninterrupted run's α.
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("constant", "linear", "wsd")


def _between(start: float, end: float, fraction: float) -> float:
    return start + (end - start) * min(max(fraction, 0.0), 1.0)


def alpha_at(step: int, steps: int, distill: Any) -> float:
    """α at optimizer step ``step`` (1-based) of ``steps``, from the ``[distill]`` section ``distill``."""
    d = distill
    if d.alpha_schedule == "constant":
        return d.alpha
    if d.alpha_schedule == "linear":
        return _between(d.alpha_start, d.alpha, (step - 1) / max(steps - 1, 1))
    if d.alpha_schedule == "wsd":
        decay_steps = math.ceil(d.alpha_decay_ratio * steps)
        decay_start = steps - decay_steps  # the decay spans steps decay_start + 1 .. steps
        if d.alpha_warmup_steps > 0 and step <= d.alpha_warmup_steps:
            return _between(d.alpha_start, d.alpha, step / d.alpha_warmup_steps)
        if decay_steps > 0 and step > decay_start:
            return _between(d.alpha, d.alpha_end, (step - decay_start) / decay_steps)
        return d.alpha
    raise ValueError(f"unknown alpha schedule {d.alpha_schedule!r}; one of {SCHEDULES}")
