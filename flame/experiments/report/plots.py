"""The report's figures. Each function returns a matplotlib ``Figure`` (or None when the stage has nothing
to show), built with the object API (no pyplot state, no display needed), so tests check the artists:
every trial's line carries its trial id as ``gid``, the best trial's line is drawn wider and on top.

* ``loss_figure``: training and validation loss against tokens, one line per trial (Flambé's one plot of
  every variant).
* ``box_figure``: the metric per contender across its trials (seeds, grid points): Metaflow's box plots;
  without contenders, per configuration across seeds when the stage has a seed axis.
* ``params_figure``: the metric against each searched parameter (log axes for log-sampled ones).
* ``rung_figure``: a scheduled stage's rung ladder (Flambé's Figure 5): each trial's metric at each rung
  it reached, stopped trials ending at their rung.
* ``importance_figure``: Optuna's parameter importances of a search stage.
"""

from __future__ import annotations

import io
import json
import math
import random
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from flame.experiments.report.collect import StageData, TrialData

BEST = "#d62728"
WIDTH = 8.0  # inches; saved at DPI below: 880 px wide
DPI = 110


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.1 + 0.75 * i / max(n - 1, 1)) for i in range(n)]


def _label(t: TrialData) -> str:
    return t.id if len(t.id) <= 40 else t.id[:37] + "..."


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # constrained layout: one draw, nothing cut off
    return buf.getvalue()


def _lines(ax, stage: StageData, xs: str, ys: str, trials: list[TrialData]) -> int:
    colors = _colors(len(trials))
    drawn = 0
    for color, t in zip(colors, trials, strict=True):
        x, y = getattr(t.curve, xs), getattr(t.curve, ys)
        if not y:
            continue
        few = len(y) <= 3
        if t.best:
            ax.plot(
                x, y, color=BEST, lw=2.6, zorder=10, marker="o" if few else None, gid=t.id, label=f"best: {_label(t)}"
            )
        else:
            ax.plot(x, y, color=color, lw=1.0, alpha=0.75, marker="o" if few else None, ms=4, gid=t.id, label=_label(t))
        drawn += 1
    return drawn


def loss_figure(stage: StageData) -> Figure | None:
    """Training loss (and validation loss, when logged) against tokens, one line per trial."""
    trials = [t for t in stage.trials if t.curve.loss or t.curve.val_loss]
    if not trials:
        return None
    has_val = any(t.curve.val_loss for t in trials)
    panels = [("tokens", "loss", "training loss")] + (
        [("val_tokens", "val_loss", "validation loss")] if has_val else []
    )
    legend_rows = math.ceil(len(trials) / 2) if len(trials) <= 12 else 1
    fig = Figure(figsize=(WIDTH, 3.2 + 0.17 * legend_rows), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xs, ys, title) in zip(axes, panels, strict=True):
        _lines(ax, stage, xs, ys, trials)
        ax.set_title(f"{stage.name}: {title}", fontsize=10)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    handles, labels = axes[-1].get_legend_handles_labels()
    if len(trials) > 12:  # a long legend hides the plot: name the best only
        keep = [i for i, lb in enumerate(labels) if lb.startswith("best:")]
        handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    return fig


def _groups(stage: StageData) -> tuple[str, dict[str, list[TrialData]]] | None:
    finished = [t for t in stage.trials if t.metric is not None and math.isfinite(t.metric)]
    if any(t.contender for t in finished):
        groups: dict[str, list[TrialData]] = {}
        for t in finished:
            groups.setdefault(t.contender or "-", []).append(t)
        return "contender", groups
    if any("training.seed" in t.params for t in finished):
        groups = {}
        for t in finished:
            rest = {k: v for k, v in t.params.items() if k != "training.seed"}
            name = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in rest.items()) or "all"
            groups.setdefault(name, []).append(t)
        if any(len(g) > 1 for g in groups.values()):
            return "configuration (across seeds)", groups
    return None


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def box_figure(stage: StageData) -> Figure | None:
    """The metric per contender (or per configuration across seeds): a box each, every trial a point."""
    found = _groups(stage)
    if found is None:
        return None
    what, groups = found
    names = list(groups)
    fig = Figure(figsize=(WIDTH, 3.4 + 0.1 * max(len(n) for n in names) * (len(names) > 4)), layout="constrained")
    ax = fig.subplots()
    data = [[float(t.metric or 0.0) for t in groups[n]] for n in names]  # finished trials only: metrics known
    ax.boxplot(data, tick_labels=names, widths=0.5, medianprops={"color": "black"})
    rng = random.Random(0)  # the same jitter every time the report is written
    for i, name in enumerate(names, start=1):
        trials = groups[name]
        xs = [i + rng.uniform(-0.12, 0.12) for _ in trials]
        colors = [BEST if t.best else "#1f77b4" for t in trials]
        ax.scatter(
            xs,
            [float(t.metric or 0.0) for t in trials],
            c=colors,
            s=[60 if t.best else 18 for t in trials],
            zorder=5,
            gid=name,
        )
    ax.set_ylabel(stage.metric)
    ax.set_title(f"{stage.name}: {stage.metric} per {what} (red: the best trial)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(names) > 4:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    return fig


def params_figure(stage: StageData) -> Figure | None:
    """The metric against each searched parameter; one point per finished trial, the best a red star."""
    finished = [t for t in stage.trials if t.metric is not None and math.isfinite(t.metric)]
    params = [p for p in stage.params if any(p.key in t.params for t in finished)]
    if not params or not finished:
        return None
    cols = min(len(params), 3)
    rows = math.ceil(len(params) / cols)
    fig = Figure(figsize=(WIDTH, 2.9 * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    contenders = list(dict.fromkeys(t.contender for t in finished))
    colors = dict(zip(contenders, _colors(len(contenders)) if len(contenders) > 1 else ["#1f77b4"], strict=True))
    for ax, p in zip(axes, params, strict=False):
        trials = [t for t in finished if p.key in t.params]
        if p.numeric:
            position = {id(t): float(t.params[p.key]) for t in trials}
        else:
            cats = sorted({json.dumps(t.params[p.key], default=str) for t in trials})
            position = {id(t): float(cats.index(json.dumps(t.params[p.key], default=str))) for t in trials}
            ax.set_xticks(range(len(cats)), [c.strip('"') for c in cats], fontsize=7)
        for c in contenders:
            group = [t for t in trials if t.contender == c]
            if group:
                ax.scatter(
                    [position[id(t)] for t in group],
                    [t.metric for t in group],
                    s=18,
                    color=colors[c],
                    label=c if c else None,
                    gid="trials",
                )
        best = [t for t in trials if t.best]
        if best:
            ax.scatter([position[id(best[0])]], [best[0].metric], marker="*", s=160, color=BEST, zorder=6, gid="best")
        if p.log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log range overlap
        elif p.numeric and all(float(t.params[p.key]).is_integer() for t in trials):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(p.key + (" (log)" if p.log else ""), fontsize=8)
        ax.set_ylabel(stage.metric, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    if len(contenders) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{stage.name}: {stage.metric} against the searched parameters (star: best)", fontsize=10)
    return fig


def rung_figure(stage: StageData) -> Figure | None:
    """The rung ladder of a scheduled stage: each trial's metric at each rung it reached; a stopped trial
    ends with an x at its last rung, a trial that went to the end continues to its final metric (a
    Hyperband bracket that starts at the maximum has only that point)."""
    if not stage.scheduler:
        return None
    trials = [t for t in stage.trials if t.rung_metrics or (t.rung is not None and t.metric is not None)]
    if not trials:
        return None
    resource = stage.scheduler.get("resource", "steps")
    fig = Figure(figsize=(WIDTH, 3.8), layout="constrained")
    ax = fig.subplots()
    colors = _colors(len(trials))
    for color, t in zip(colors, trials, strict=True):
        points = list(t.rung_metrics)
        if not t.pruned and t.status in ("done", "masked") and t.metric is not None:
            end = (t.tokens or 0.0) if resource == "tokens" else float(t.step)
            if not points or end > points[-1][0]:
                points.append((end, t.metric))
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        style = {"color": BEST, "lw": 2.6, "zorder": 10} if t.best else {"color": color, "lw": 1.0, "alpha": 0.8}
        ax.plot(xs, ys, marker="o", ms=3, gid=t.id, **style)  # type: ignore[arg-type]
        if t.pruned:
            ax.plot([xs[-1]], [ys[-1]], marker="x", ms=7, color=style["color"], lw=0, gid=f"{t.id}:stopped")
    rungs = sorted({x for t in trials for x, _ in t.rung_metrics})
    if len(rungs) > 1 and rungs[0] > 0 and rungs[-1] / rungs[0] >= 8:
        ax.set_xscale("log")
    ax.set_xlabel(f"{resource} (rungs)")
    ax.set_ylabel(stage.metric)
    ax.set_title(f"{stage.name}: rung ladder ({stage.scheduler.get('kind', 'scheduler')}; x: stopped)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def optuna_importances(stage: StageData) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Optuna's parameter importances per study of the stage (``<stage>/optuna*.journal``, written by the
    driver for sampled searches), and notes on studies that have none (too few trials, one value)."""
    import glob
    import os

    out: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    paths = sorted(glob.glob(os.path.join(stage.folder, "optuna*.journal")))
    if not paths:
        return out, notes
    from flame.experiments.search import _quiet_optuna

    optuna = _quiet_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    for path in paths:
        label = os.path.basename(path)[: -len(".journal")]
        try:
            study = optuna.load_study(study_name="search", storage=JournalStorage(JournalFileBackend(path)))
            complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            if len(complete) < 2:
                notes.append(f"{label}: {len(complete)} complete trial(s); importances need two or more")
                continue
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # the same numbers every time
            out[label] = dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
        except Exception as e:  # Optuna has none for this study (e.g. every value equal): say why
            notes.append(f"{label}: no importances ({type(e).__name__}: {e})")
    return out, notes


def importance_figure(stage: StageData, importances: dict[str, dict[str, float]]) -> Figure | None:
    if not importances:
        return None
    n = len(importances)
    fig = Figure(
        figsize=(WIDTH, max(2.6, 1.0 + 0.45 * max(len(v) for v in importances.values()))), layout="constrained"
    )
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (label, values) in zip(axes, importances.items(), strict=True):
        keys = sorted(values, key=values.get)  # type: ignore[arg-type]
        ax.barh(keys, [values[k] for k in keys], color="#1f77b4", gid=label)
        ax.set_xlim(0, 1)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("importance (fANOVA)", fontsize=8)
    fig.suptitle(f"{stage.name}: Optuna parameter importances for {stage.metric}", fontsize=10)
    return fig
