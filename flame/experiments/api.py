"""``plan``, ``run`` and ``status``: the same functions behind ``python -m flame.experiment`` and Python calls.

``run`` checks everything that can be checked before any work (the spec, every trial's config as
training validates it), then drives the experiment: locally in this process, or on Slurm by submitting
the first stage's array and a controller job that carries the experiment on. Running it again resumes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.driver import Interrupted, precheck, walk
from flame.experiments.hooks import call_reports
from flame.experiments.live import LiveConsole
from flame.experiments.plan import ExperimentError
from flame.experiments.records import DriverLock, Records
from flame.experiments.spec import Experiment, resolve
from flame.experiments.status import Console, build, table
from flame.experiments.values import Link


@dataclass
class ExperimentResult:
    """What ``run`` returns: the status object (``status --json``'s shape) and helpers on it."""

    status: dict[str, Any]

    def stage(self, name: str) -> dict[str, Any]:
        return next(s for s in self.status["stages"] if s["name"] == name)

    def best(self, stage: str) -> dict[str, Any] | None:
        s = self.stage(stage)
        return next((t for t in s["trials"] if t["id"] == s["best"]), None)

    def table(self) -> str:
        return table(self.status)


_spec = resolve  # the name other modules of the package use


def plan(spec: str | os.PathLike | dict | Experiment, launcher: str | None = None) -> dict[str, Any]:
    """The dry run: every trial that can be expanded now, validated; nothing written. Status "planned"."""
    exp = _spec(spec, launcher)
    states = precheck(exp)
    result = build(exp, states, Records(exp.root), planned=True)
    for state, st in zip(states, result["stages"], strict=True):
        describe = getattr(state.scheduler, "describe", None)
        if describe is not None:  # a trial scheduler: its brackets and rungs
            st["scheduler"] = describe()
    result["launch"] = launch_plan(exp, result)
    return result


def status(spec: str | os.PathLike | dict | Experiment, launcher: str | None = None) -> dict[str, Any]:
    """The experiment's state from its records and run folders (read-only; works while it runs)."""
    exp = _spec(spec, launcher)
    records = Records(exp.root)
    try:
        states = walk(exp, records, "readonly")
    except ExperimentError as e:
        raise ConfigError(str(e)) from None
    return build(exp, states, records)


def launch_plan(exp: Experiment, result: dict[str, Any]) -> list[str]:
    """How each stage is launched, in words (the dry run prints it)."""
    lines = []
    for stage, st in zip(exp.stages, result["stages"], strict=True):
        n = len(st["trials"])
        if st["waiting_for"]:
            links = ", ".join(f"{k} <- {lk.stage} {lk.pick}{lk.k or ''} {lk.field}" for k, lk in stage.links())
            lines.append(f"stage {stage.name}: expands when {', '.join(st['waiting_for'])} is complete ({links})")
            continue
        more = ""
        sched = st.get("scheduler")
        if sched:
            unit = sched["unit"]
            for b in sched["brackets"]:
                rungs = ", ".join(f"{r['trials']} x {r['resource']:g} {unit}" for r in b["rungs"])
                lines.append(f"stage {stage.name}: {sched['kind']} bracket s={b['s']}: {rungs}")
            more = f"; {sched['kind']} over {sched['drawn']} of {sched['pool']} configurations (rung metric {sched['rung_metric']})"
        if stage.search and stage.search.kind not in ("grid", "random"):
            more = f"; {stage.search.kind} asks {stage.search.samples} points in rounds (after each round's results)"
        if exp.launcher == "slurm":
            from flame.experiments.slurm import describe_stage

            lines.append(f"stage {stage.name}: {describe_stage(exp, stage, n)}{more}")
        else:
            threads = "" if stage.ngpu < 1 else f", NGPU={stage.ngpu} each"
            lines.append(f"stage {stage.name}: {n} trials, {exp.max_parallel} at a time on this machine{threads}{more}")
    return lines


def _summary_line(exp: Experiment, records: Records) -> Any:
    def line() -> str:
        done = failed = running = 0
        stage = ""
        launched: set[str] = set()
        for e in records.events:
            if e["event"] == "launch":
                launched.add(e["trial"])
                stage = e["stage"]
            elif e["event"] == "end":
                launched.discard(e["trial"])
                done += e["status"] == "done"
                failed += e["status"] == "failed"
        running = len(launched)
        return f"[{stage}] {done} done, {running} running, {failed} failed"

    return line


def run(
    spec: str | os.PathLike | dict | Experiment,
    launcher: str | None = None,
    retry_failed: bool = False,
    echo: Any = None,
) -> ExperimentResult:
    """Run (or resume) an experiment; the same semantics as ``python -m flame.experiment run``.

    Raises ConfigError (bad input; nothing started), ExperimentError (a stage stopped the experiment:
    max_failures, no survivor to link to) or Interrupted (SIGTERM/SIGINT: trials saved and stopped)."""
    exp = _spec(spec, launcher)
    precheck(exp)  # every problem of the spec and of every expandable trial, before anything is written
    if exp.launcher == "slurm":
        from flame.experiments.slurm import submit

        return ExperimentResult(submit(exp, retry_failed=retry_failed, echo=echo or print))
    from flame.experiments.local import LocalLauncher

    with DriverLock(exp.root):
        records = Records(exp.root, writable=True)
        console = echo or LiveConsole(exp.root, lambda: status(exp))
        records.append("start", pid=os.getpid(), host=socket.gethostname(), launcher="local")
        launcher_ = LocalLauncher(exp, records, echo=console)
        if isinstance(console, Console):
            base = _summary_line(exp, records)

            def line() -> str:
                eta = launcher_.eta_seconds(0)
                return base() + (f", ETA {eta / 60:.1f} min" if eta is not None else "")

            console.line = line
        previous = {}

        def stop(signum, frame):  # the loop notices, stops the trials (they save) and raises Interrupted
            launcher_.stopping = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                previous[sig] = signal.signal(sig, stop)
            except ValueError:  # not the main thread (some notebook kernels): no handlers
                pass
        try:
            states = walk(exp, records, "local", launcher_, retry_failed=retry_failed)
        except (ExperimentError, ConfigError) as e:
            launcher_.stop_all()
            records.append("experiment", status="stopped", message=str(e))
            raise
        except Interrupted:
            records.append("experiment", status="interrupted")
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if isinstance(console, Console):
                console.close()
        result = build(exp, states, records)
        records.append("experiment", status="done", best={s["name"]: s["best"] for s in result["stages"]})
    print(table(result), file=sys.stdout)
    call_reports(exp, result)
    return ExperimentResult(result)


def links_of(exp: Experiment) -> list[tuple[str, str, Link]]:
    return [(s.name, k, lk) for s in exp.stages for k, lk in s.links()]
