"""``write_report``: an experiment folder turned into ``<root>/report/`` and ``<root>/summary.txt``.

The report answers which configuration won, by how much, how sure we are and what it cost: per stage the
trials table (sorted by the metric, the best marked), the best trial's resolved training TOML as
``best_<stage>.toml`` beside its Hugging Face export path, the figures of ``plots.py``, and the cost of
``cost.py``. Files are written whole to temporary names and renamed, so a reader never sees half a
report; the TensorBoard view is refreshed on the way.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

from flame.experiments.records import Records
from flame.experiments.report import cost as costs
from flame.experiments.report import plots
from flame.experiments.report.collect import StageData, TrialData, collect
from flame.experiments.report.render import (
    Block,
    fmt_num,
    fmt_params,
    fmt_seconds,
    fmt_tokens,
    markdown,
    to_html,
)
from flame.experiments.spec import Experiment

REPORT = "report"
HEADERS = ["", "trial", "contender", "parameters", "metric", "steps", "tokens", "wall time", "status", "rung"]


def _write(path: str, data: str | bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def trial_row(t: TrialData) -> list[str]:
    """One line of a stage's table (the test compares these with ``status --json``)."""
    rung = "-" if t.rung is None else f"{t.rung}" + (" (stopped)" if t.pruned else "")
    return [
        "★" if t.best else "",
        t.id,
        t.contender or "-",
        fmt_params(t.params),
        fmt_num(t.metric, 5),
        f"{t.step}/{t.steps}" if t.steps else str(t.step),
        fmt_tokens(t.tokens),
        fmt_seconds(t.wall_seconds),
        t.status,
        rung,
    ]


def _config_key(t: TrialData) -> str:
    """A trial's configuration without its seed: trials that differ only in the seed share it."""
    rest = {k: v for k, v in t.params.items() if k != "training.seed"}
    return f"{t.contender}|{sorted(rest.items())!r}"


def _margin(stage: StageData) -> str:
    """How far the best is ahead of the best other configuration, and the spread of its own configuration
    across its trials (seeds) where it has several."""
    ok = [t for t in stage.trials if t.metric is not None and math.isfinite(t.metric)]
    best = stage.best
    if best is None or best.metric is None:
        return ""
    parts = []
    key = _config_key(best)
    others = [t for t in ok if _config_key(t) != key]
    if others:
        gap = others[0].metric - best.metric  # type: ignore[operator]
        parts.append(f"best other configuration `{others[0].id}` {fmt_num(others[0].metric, 5)} ({gap:+.4g})")
    same = [float(t.metric) for t in ok if _config_key(t) == key and t.metric is not None]
    if len(same) > 1:
        parts.append(
            f"its configuration over {len(same)} trials (seeds): {statistics.mean(same):.4g} ± {statistics.stdev(same):.2g}"
        )
    return "; ".join(parts)


def _counts(stage: StageData) -> str:
    counts: dict[str, int] = {}
    for t in stage.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    pruned = sum(t.pruned for t in stage.trials)
    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{len(stage.trials)} trials: {text}" + (f" ({pruned} stopped by the scheduler)" if pruned else "")


def _state(records: Records) -> str:
    starts = [e for e in records.events if e["event"] == "start"]
    ends = [e for e in records.events if e["event"] == "experiment"]
    if not starts and not ends:
        return "not started"
    if ends and (not starts or ends[-1]["time"] >= starts[-1]["time"]):
        return {"done": "complete"}.get(ends[-1]["status"], ends[-1]["status"])
    return "running" if records.events else "not started"


def write_report(exp: Experiment, status: dict[str, Any], tensorboard: bool = True) -> dict[str, Any]:
    """Write ``<root>/report/`` (report.md, report.html, plots/, best_<stage>.toml) and
    ``<root>/summary.txt``; returns their paths and the figures' file names per stage."""
    root = exp.root
    out = os.path.join(root, REPORT)
    plots_dir = os.path.join(out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    records = Records(root)
    stages = collect(exp, status)
    state = _state(records)
    tb = {"trials": 0}
    if tensorboard:
        from flame.experiments.report.tensorboard import sync

        tb = sync(root, status)
    stage_costs = [costs.stage_cost(s) for s in stages]
    launches = [e["time"] for e in records.events if e["event"] == "launch"]
    ends = [e["time"] for e in records.events if e["event"] == "end"]
    total = costs.total_cost(stage_costs, max(ends) - min(launches) if launches and ends else None)
    blocks = [
        Block("h1", f"Experiment {exp.name}"),
        Block(
            "p",
            f"`{root}`: {state}; metric **{exp.metric}** ({exp.mode}); written {time.strftime('%Y-%m-%d %H:%M')}.",
        ),
    ]
    if exp.description:
        blocks.append(Block("p", exp.description))
    summary_lines = [f"experiment {exp.name} ({root}): {state}; metric {exp.metric} ({exp.mode})"]
    winners = []
    for s in stages:
        if s.best is None:
            why = f"waits for {', '.join(s.waiting_for)}" if s.waiting_for else "no finished trial"
            winners.append(f"**{s.name}**: {why} ({_counts(s)})")
            summary_lines.append(f"{s.name}: {why}")
            continue
        b = s.best
        margin = _margin(s)
        winners.append(
            f"**{s.name}**: `{b.id}`"
            + (f" ({b.contender})" if b.contender else "")
            + f", {s.metric} **{fmt_num(b.metric, 5)}**; {fmt_params(b.params)}"
            + (f"; {margin}" if margin else "")
        )
        summary_lines.append(
            f"{s.name}: best {b.id}"
            + (f" ({b.contender})" if b.contender else "")
            + f" {s.metric} {fmt_num(b.metric, 5)}; {fmt_params(b.params)}"
            + (f"; {margin.replace('`', '')}" if margin else "")
            + f"; {_counts(s)}"
        )
    blocks += [Block("h2", "Winners"), Block("ul", items=winners)]

    # ---- cost ----
    gpu = total.gpu_hours is not None
    head = ["stage", "trials", "steps", "tokens", "trial time", "elapsed"] + (["GPU-hours"] if gpu else [])
    rows = []
    for c in [*stage_costs, total]:
        row = [c.name, str(c.trials), f"{c.steps:,}", fmt_tokens(c.tokens), fmt_seconds(c.trial_seconds)]
        row.append(fmt_seconds(c.elapsed_seconds))
        if gpu:
            row.append(fmt_num(c.gpu_hours, 3))
        rows.append(row)
    blocks += [Block("h2", "Cost"), Block("table", headers=head, rows=rows, marked={len(rows) - 1})]
    cost_line = (
        f"cost: {total.trials} trials, {total.steps:,} steps, {fmt_tokens(total.tokens)} tokens, trial time "
        f"{fmt_seconds(total.trial_seconds)}, elapsed {fmt_seconds(total.elapsed_seconds)}"
        + (f", {total.gpu_hours:.3g} GPU-hours" if gpu and total.gpu_hours is not None else "")
    )
    savings = []
    for s, c in zip(stages, stage_costs, strict=True):
        sv = costs.saving(s, c)
        if sv is not None:
            text = (
                f"{s.name} ({s.scheduler.get('kind')}): {sv.steps:,} steps trained (cool-downs included) against "  # type: ignore[union-attr]
                f"{sv.full_steps:,.0f} for all {sv.trials} trials to {sv.max_steps:,.0f} steps: "
                f"{100 * sv.fraction:.1f} % of the full budget, a saving of {100 * sv.saving:.1f} %"
                + (
                    f" (about {fmt_seconds(sv.full_seconds)} of trial time for the full budget)"
                    if sv.full_seconds
                    else ""
                )
            )
            end = next((d for d in s.decisions if d.get("end") and "budget" in d), None)
            if end is not None:  # the experiment's budget
                spent, unit = end.get("spent", 0), end.get("unit", "steps")
                text += (
                    f"; the experiment budget of {end['budget']:,} {unit} was spent ({spent:,.0f}): no new work was started after that"
                    if end.get("budget_hit")
                    else f"; {spent:,.0f} of the experiment budget of {end['budget']:,} {unit} spent"
                )
            savings.append(text)
            summary_lines.append(f"scheduler saving: {text}")
    if savings:
        blocks += [Block("p", "With a trial scheduler:"), Block("ul", items=savings)]
    summary_lines.append(cost_line)
    if tb["trials"]:
        blocks += [
            Block("h2", "TensorBoard"),
            Block(
                "p",
                f"Every trial's event files ({tb['trials']} trials) in one view, with the hyper-parameters in "
                f"the HParams tab: `tensorboard --logdir {os.path.join(root, 'tensorboard')}`",
            ),
        ]

    # ---- stages ----
    figures: dict[str, list[str]] = {}
    best_tomls: dict[str, str] = {}
    for s in stages:
        blocks += [Block("h2", f"Stage {s.name}")]
        search = f", search {s.search}" if s.search else ""
        sched = f", scheduler {s.scheduler.get('kind')}" if s.scheduler else ""
        blocks.append(Block("p", f"{s.kind}{search}{sched}; {s.metric} ({s.mode}); {_counts(s)}."))
        if s.waiting_for:
            blocks.append(Block("p", f"Waits for {', '.join(s.waiting_for)}."))
            continue
        if s.best is not None:
            best_toml = os.path.join(out, f"best_{s.name}.toml")
            source = os.path.join(s.best.folder, "config.toml")
            text = f"Best: `{s.best.id}` in `{s.best.folder}`"
            if os.path.exists(source):
                with open(source) as f:
                    header = f"# best trial of stage {s.name!r}: {s.best.id}, {s.metric} = {s.best.metric}\n"
                    header += f"# Hugging Face export: {s.best.hf_export or 'none'}\n"
                    _write(best_toml, header + f.read())
                best_tomls[s.name] = best_toml
                text += f"; its training TOML: `{best_toml}`"
            text += f"; Hugging Face export: `{s.best.hf_export}`" if s.best.hf_export else "; no Hugging Face export"
            blocks.append(Block("p", text + "."))
        rows = [trial_row(t) for t in s.trials]
        marked = {i for i, t in enumerate(s.trials) if t.best}
        blocks.append(Block("table", headers=HEADERS, rows=rows, marked=marked))
        importances, notes = plots.optuna_importances(s) if s.search and s.search != "grid" else ({}, [])
        made = [
            ("loss", "losses of every trial", plots.loss_figure(s)),
            ("box", "the metric per contender", plots.box_figure(s)),
            ("params", "the metric against each searched parameter", plots.params_figure(s)),
            ("rungs", "rung ladder", plots.rung_figure(s)),
            ("importance", "Optuna parameter importances", plots.importance_figure(s, importances)),
        ]
        figures[s.name] = []
        for name, alt, fig in made:
            if fig is None:
                continue
            data = plots.png_bytes(fig)
            file = f"{s.name}_{name}.png"
            _write(os.path.join(plots_dir, file), data)
            figures[s.name].append(file)
            blocks.append(Block("img", text=f"{s.name}: {alt}", image=data, path=f"plots/{file}"))
        if notes:
            blocks.append(Block("p", "Optuna importances: " + "; ".join(notes)))
    # figures of stages that no longer make one (or renamed stages) must not linger
    keep = {f for files in figures.values() for f in files}
    for name in os.listdir(plots_dir):
        if name.endswith(".png") and name not in keep:
            os.remove(os.path.join(plots_dir, name))
    md_path, html_path = os.path.join(out, "report.md"), os.path.join(out, "report.html")
    _write(md_path, markdown(blocks))
    _write(html_path, to_html(blocks, f"Experiment {exp.name}"))
    summary_lines.append(f"report: {html_path}")
    summary_path = os.path.join(root, "summary.txt")
    _write(summary_path, "\n".join(summary_lines) + "\n")
    return {
        "markdown": md_path,
        "html": html_path,
        "summary": summary_path,
        "figures": figures,
        "best": best_tomls,
        "tensorboard": tb,
    }
