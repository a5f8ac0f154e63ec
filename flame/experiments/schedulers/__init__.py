"""Trial schedulers by checkpoint rungs: ``scheduler = { kind = "sha" | "hyperband" | "asha", ... }``.

``rules`` (the pure rules and the table's check), ``ladder`` (a stage's rungs and decisions, driven by
results), ``trunks`` (trunks, cool-down forks and their checks), ``stage`` (the driver's scheduler),
``worker`` (ASHA's Slurm array tasks). Importing this package registers the three kinds with
``flame.experiments.hooks`` (the hooks import it by name on the first lookup).
"""

from __future__ import annotations

from flame.experiments.hooks import register_scheduler
from flame.experiments.schedulers.rules import KINDS, check_table


def _check(stage, where, add) -> None:
    check_table(stage.scheduler, where, add)
    if not stage.space and not any(c.space for c in stage.contenders):
        add(where, "a scheduler needs a stage with a space (the configurations it compares); add space = { ... }")


def _factory(ctx):
    from flame.experiments.schedulers.stage import RungScheduler

    return RungScheduler(ctx)


for _kind in KINDS:
    register_scheduler(_kind, _check, _factory)
