"""Experiment reports: ``python -m flame.experiment report X.toml``, also written when an experiment ends.

``<root>/report/`` gets report.md, a self-contained report.html, plots/ (PNG) and ``best_<stage>.toml``;
``<root>/summary.txt`` the winners in a few lines; ``<root>/tensorboard/`` one TensorBoard view of every
trial. ``build.py`` assembles it from ``collect.py`` (what the folder says), ``plots.py`` (figures),
``cost.py`` (steps, tokens, time, GPU-hours, a scheduler's saving), ``render.py`` (Markdown and HTML)
and ``tensorboard.py``. Importing this package only registers the report hook; matplotlib is imported
when a report is written.
"""

from __future__ import annotations

import os
from typing import Any

from flame.experiments.hooks import register_report


def report(spec: Any, launcher: str | None = None) -> dict[str, Any]:
    """Write the report of the experiment ``spec`` (a path, a dict or an Experiment) as it is now."""
    from flame.experiments import api

    exp = api._spec(spec, launcher)
    return write(exp, api.status(exp))


def write(exp: Any, status: dict[str, Any]) -> dict[str, Any]:
    """The report of ``exp`` from its ``status`` object (the hook the driver calls when it ends)."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg")  # files only; never a window
    from flame.experiments.report.build import write_report

    paths = write_report(exp, status)
    print(f"report: {paths['html']} (and report.md); summary: {paths['summary']}")
    return paths


register_report(write)
