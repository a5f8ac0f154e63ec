"""Experiments: one TOML of stages expanded into trials (flame run folders) that run locally or on Slurm.

spec (``spec.py``: dataclasses, checked up front) -> plan (``plan.py``, ``search.py``: trials, pure) ->
launchers (``local.py``, ``slurm.py``: the same plan) -> records (``records.py``: single-writer files in
the experiment folder) -> hooks (``hooks.py``: trial schedulers, reports; ``kinds.py``: stage kinds).
Python API: ``flame.experiment.run(spec_or_path)``, ``plan``, ``status``.
"""

import flame.experiments.report  # noqa: F401  (registers the report written when an experiment ends)
from flame.experiments.api import ExperimentResult, plan, run, status
from flame.experiments.hooks import register_report, register_scheduler
from flame.experiments.kinds import register_stage_kind
from flame.experiments.spec import load_spec

__all__ = [
    "ExperimentResult",
    "load_spec",
    "plan",
    "register_report",
    "register_scheduler",
    "register_stage_kind",
    "run",
    "status",
]
