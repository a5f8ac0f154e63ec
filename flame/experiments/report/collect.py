"""What a report shows, read from an experiment folder: per stage its trials, their curves and their cost.

Everything comes from the status object (``status --json``'s shape: ids, params, status, metric), the
run folders (``metrics.jsonl`` curves, ``summary.json`` tokens and wall time, ``trial.json`` processes
per trial, ``config.toml``), the experiment's ``records.jsonl`` (launch and end times, the wall time of
each attempt) and, for a stage with a trial scheduler, ``<root>/<stage>/decisions.jsonl``: one JSON
object per rung decision, ``{"rung": k, "resource": steps or tokens at the rung (optional), "bracket": s
(optional), "competitors": {trial: metric} or [{"trial": id, "metric": m}], "promoted": [ids], "stopped":
[ids], "cooldown_steps": steps of its cool-down forks (optional)}``, and a last ``{"end": true, "spent":
resource used, "unit", "budget" and "budget_hit" (with an experiment budget)}``. Reading never writes anything.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from flame.experiments.records import Records
from flame.experiments.schedulers.files import read_lines
from flame.experiments.spec import Dist, Experiment, Grid, Stage, Zip
from flame.experiments.trial import read_json

DECISIONS = "decisions.jsonl"


@dataclass
class Curve:
    """One trial's logged losses: x in steps and in tokens (tokens seen; else steps x tokens per step)."""

    steps: list[int] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_tokens: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    measured_tokens: bool = False  # tokens_seen was logged (not derived from the config)


@dataclass
class TrialData:
    id: str
    contender: str | None
    params: dict[str, Any]
    status: str
    step: int
    steps: int
    metric: float | None
    folder: str
    curve: Curve
    tokens: float | None = None  # tokens trained
    wall_seconds: float | None = None  # time of the trial's own processes, all attempts
    processes: int = 1  # ngpu x nnode
    on_gpu: bool = False
    rung: int | None = None  # the highest rung reached (scheduled stages)
    pruned: bool = False  # stopped by the scheduler at its rung
    rung_metrics: list[tuple[float, float]] = field(default_factory=list)  # (resource, metric) per rung
    hf_export: str | None = None
    best: bool = False

    @property
    def gpu_hours(self) -> float | None:
        if not self.on_gpu or self.wall_seconds is None:
            return None
        return self.wall_seconds * self.processes / 3600


@dataclass
class Param:
    """A searched key of a stage: its values across trials and whether its axis is logarithmic."""

    key: str
    log: bool
    numeric: bool


@dataclass
class StageData:
    name: str
    kind: str
    metric: str
    mode: str
    trials: list[TrialData]  # sorted by the metric, best first; trials without a metric last
    best: TrialData | None
    params: list[Param]
    scheduler: dict[str, Any] | None
    decisions: list[dict[str, Any]]
    search: str | None  # the search kind (grid, random, tpe, ...)
    waiting_for: list[str]
    first_launch: float | None  # records times (epoch seconds)
    last_end: float | None
    folder: str

    @property
    def elapsed_seconds(self) -> float | None:
        if self.first_launch is None or self.last_end is None:
            return None
        return max(self.last_end - self.first_launch, 0.0)


def _tokens_per_step(folder: str, processes: int) -> float | None:
    """Global tokens of one optimizer step from the trial's config.toml: batch x seq_len x accumulation x
    data-parallel degree (processes over TP x PP x CP)."""
    try:
        with open(os.path.join(folder, "config.toml"), "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, ValueError):
        return None
    t = cfg.get("training", {})
    x = cfg.get("experimental", {})
    try:
        split = int(t.get("tensor_parallel_degree", 1)) * int(x.get("pipeline_parallel_degree", 1))
        split *= int(x.get("context_parallel_degree", 1))
        dp = max(processes // max(split, 1), 1)
        return float(t["batch_size"]) * float(t["seq_len"]) * int(t.get("gradient_accumulation_steps", 1)) * dp
    except (KeyError, TypeError, ValueError):
        return None


def read_curve(folder: str, processes: int = 1) -> tuple[Curve, dict[str, Any]]:
    """The losses of ``folder``'s metrics.jsonl and its last record."""
    curve = Curve()
    last: dict[str, Any] = {}
    rows = []
    try:
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line being written
                    continue
    except OSError:
        pass
    per_step = None if all("tokens_seen" in r for r in rows) else _tokens_per_step(folder, processes)
    curve.measured_tokens = bool(rows) and per_step is None
    for r in rows:
        step = int(r.get("step", 0))
        tokens = r.get("tokens_seen")
        x = float(tokens) if isinstance(tokens, (int, float)) else (step * per_step if per_step else float(step))
        if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]):
            curve.steps.append(step)
            curve.tokens.append(x)
            curve.loss.append(float(r["loss"]))
        if isinstance(r.get("validation_loss"), (int, float)) and math.isfinite(r["validation_loss"]):
            curve.val_steps.append(step)
            curve.val_tokens.append(x)
            curve.val_loss.append(float(r["validation_loss"]))
        last = r
    return curve, last


def competitors(decision: dict[str, Any]) -> dict[str, float | None]:
    """``{trial: metric}`` of a decision, whichever of the accepted shapes it has."""
    c = decision.get("competitors") or {}
    if isinstance(c, dict):
        return {str(k): (float(v) if isinstance(v, (int, float)) else None) for k, v in c.items()}
    out: dict[str, float | None] = {}
    for entry in c:
        if isinstance(entry, dict):
            trial, metric = entry.get("trial", entry.get("id")), entry.get("metric")
        else:
            trial, metric = entry[0], entry[1]
        out[str(trial)] = float(metric) if isinstance(metric, (int, float)) else None
    return out


def _rank_key(t: TrialData, mode: str) -> tuple:
    ok = t.metric is not None and math.isfinite(t.metric)
    return (0, t.metric if mode == "min" else -t.metric, t.id) if ok else (1, 0.0, t.status, t.id)  # type: ignore[operator]


def searched_params(stage: Stage | None, trials: list[TrialData]) -> list[Param]:
    """The keys that vary across the stage's trials, in the spec's order; log axes for loguniform keys
    and for positive numeric grids spanning two decades or more."""
    spaces: dict[str, Any] = {}
    if stage is not None:
        spaces.update(stage.space)
        for c in stage.contenders:
            spaces.update(c.space)
    keys = list(
        dict.fromkeys(
            [*(k for k in spaces if any(k in t.params for t in trials)), *(k for t in trials for k in t.params)]
        )
    )
    out = []
    for key in keys:
        values = [t.params[key] for t in trials if key in t.params]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < 2:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        spec = spaces.get(key)
        if spec is None:
            spec = next((z for z in spaces.values() if isinstance(z, Zip) and key in z.keys), None)
        log = isinstance(spec, Dist) and spec.kind == "loguniform"
        if not log and numeric and isinstance(spec, (Grid, Zip)) and min(values) > 0:
            log = max(values) / min(values) >= 100
        out.append(Param(key, log, numeric))
    return out


def collect_stage(exp: Experiment, st: dict[str, Any], records: Records) -> StageData:
    """One stage of the status object, with everything the report shows about it."""
    spec = next((s for s in exp.stages if s.name == st["name"]), None)
    folder = os.path.join(exp.root, st["name"])
    scheduler = spec.scheduler if spec is not None else None
    decisions = read_lines(os.path.join(folder, DECISIONS)) if scheduler else []
    reached: dict[str, int] = {}
    stopped: set[str] = set()
    rung_metrics: dict[str, list[tuple[float, float]]] = {}
    for d in decisions:
        rung = int(d.get("rung", 0))
        resource = d.get("resource", rung)
        for trial, metric in competitors(d).items():
            reached[trial] = max(reached.get(trial, rung), rung)
            if metric is not None and (float(resource), metric) not in rung_metrics.get(trial, []):
                rung_metrics.setdefault(trial, []).append((float(resource), metric))  # ASHA repeats a rung's
        for trial in d.get("promoted", []):
            reached[trial] = max(reached.get(trial, rung + 1), rung + 1)
        stopped.update(d.get("stopped", []))
    ends: dict[str, float] = {}
    launches: list[float] = []
    last_end = None
    for e in records.events:
        if e.get("stage") != st["name"]:
            continue
        if e["event"] == "launch":
            launches.append(e["time"])
        elif e["event"] == "end":
            if isinstance(e.get("seconds"), (int, float)):
                ends[e["trial"]] = ends.get(e["trial"], 0.0) + e["seconds"]
            last_end = max(last_end or 0.0, e["time"])
    trials = []
    for row in st["trials"]:
        info = read_json(os.path.join(row["dump_folder"], "trial.json")) or {}
        processes = int(info.get("ngpu", 1)) * int(info.get("nnode", 1))
        curve, last = read_curve(row["dump_folder"], processes)
        summary = read_json(os.path.join(row["dump_folder"], "summary.json")) or {}
        tokens = summary.get("tokens") if isinstance(summary.get("tokens"), (int, float)) else None
        if tokens is None and curve.tokens and row["status"] not in ("pending", "planned"):
            tokens = curve.tokens[-1]
        wall = summary.get("wall_seconds") if isinstance(summary.get("wall_seconds"), (int, float)) else None
        wall = wall if wall is not None else ends.get(row["id"])
        if wall is None and isinstance(last.get("elapsed_seconds"), (int, float)):
            wall = last["elapsed_seconds"]
        hf = summary.get("hf_export")
        if not hf and os.path.exists(os.path.join(row["dump_folder"], "config.json")):
            hf = row["dump_folder"]
        status = row["status"]
        trials.append(
            TrialData(
                id=row["id"],
                contender=row.get("contender"),
                params=dict(row.get("params") or {}),
                status=status,
                step=int(row.get("step") or 0),
                steps=int(row.get("steps") or 0),
                metric=row.get("metric"),
                folder=row["dump_folder"],
                curve=curve,
                tokens=float(tokens) if tokens is not None else None,
                wall_seconds=float(wall) if wall is not None else None,
                processes=processes,
                on_gpu="memory_reserved_gib" in last,  # the trainer logs CUDA memory only on GPUs
                rung=row.get("rung", reached.get(row["id"])),
                pruned=row["id"] in stopped or status in ("pruned", "stopped"),
                rung_metrics=sorted(rung_metrics.get(row["id"], [])),
                hf_export=hf if isinstance(hf, str) and os.path.exists(os.path.join(hf, "config.json")) else None,
            )
        )
    mode = st.get("mode", exp.mode)
    trials.sort(key=lambda t: _rank_key(t, mode))
    best_id = st.get("best")
    if best_id is None:  # a stage not complete yet: the best finished so far
        ranked = [t for t in trials if t.status in ("done", "masked") and t.metric is not None]
        best_id = ranked[0].id if ranked and math.isfinite(ranked[0].metric) else None  # type: ignore[arg-type]
    best = next((t for t in trials if t.id == best_id), None)
    if best is not None:
        best.best = True
    return StageData(
        name=st["name"],
        kind=st.get("kind", "train"),
        metric=st.get("metric", exp.metric),
        mode=mode,
        trials=trials,
        best=best,
        params=searched_params(spec, trials),
        scheduler=scheduler,
        decisions=decisions,
        search=spec.search.kind if spec is not None and spec.search is not None else None,
        waiting_for=list(st.get("waiting_for") or []),
        first_launch=min(launches) if launches else None,
        last_end=last_end,
        folder=folder,
    )


def collect(exp: Experiment, status: dict[str, Any]) -> list[StageData]:
    records = Records(exp.root)
    return [collect_stage(exp, st, records) for st in status["stages"]]
