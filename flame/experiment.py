"""``flame.experiment``: run, plan and status of experiments from Python; ``python -m flame.experiment``.

The code lives in ``flame.experiments``; this module is its short public name and the command.
"""

from __future__ import annotations

import sys

from flame.experiments import ExperimentResult, load_spec, plan, register_report, register_scheduler, run, status
from flame.experiments.cli import main

__all__ = ["ExperimentResult", "load_spec", "main", "plan", "register_report", "register_scheduler", "run", "status"]

if __name__ == "__main__":
    sys.exit(main())
