"""Expansion of a stage into trials: links, contenders, grids, zips and sampled points. Pure: no files written.

A stage expands once every stage it links to is complete. Its trials are grouped: one *group* per
contender and per combination of fanned-out upstream survivors (``pick = "each"`` / ``"top:K"``); a
group's trials are the cartesian product of its grid axes (``grid`` values and ``zip`` rows), crossed
with its sampled points (one round for grid and random search, rounds of asks for Optuna's adaptive
samplers). Each trial resolves to a complete config (``apply_overrides`` on the base TOML) and gets the
id ``<readable name>-<8 hex digits of its resolved config>``: the same spec gives the same trials, and a
change to a trial's config gives a new id (its old folder is kept).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.kinds import config_hash, stage_kind
from flame.experiments.spec import Contender, Experiment, Search, Stage
from flame.experiments.trial import Outcome, Trial, last_checkpoint, metric_value
from flame.experiments.values import Dist, Grid, Link, Zip


class Waiting(Exception):
    """The stage links to stages that are not complete yet: it cannot expand now."""

    def __init__(self, stages: list[str]) -> None:
        self.stages = stages
        super().__init__(f"waits for {', '.join(stages)}")


class ExperimentError(Exception):
    """A runtime problem of the experiment (not of its spec): no survivor to link to, too many failures."""


@dataclass
class StageView:
    """What later stages see of a complete stage: its outcomes and survivors, best first."""

    stage: Stage
    outcomes: list[Outcome]
    survivors: list[Outcome]

    @property
    def best(self) -> Outcome | None:
        return self.survivors[0] if self.survivors else None


@dataclass
class Group:
    key: str
    contender: Contender | None
    base_path: str
    fixed: dict[str, Any]  # literals and link values, dotted
    shown: dict[str, Any]  # link values shown among the params
    lineage: dict[str, str]
    grid: list[dict[str, Any]]  # grid points; [{}] without grid axes
    dists: dict[str, Dist]
    search: Search
    trials: dict[int, list[Trial]] = field(default_factory=dict)  # round -> its trials


def rank(outcomes: list[Outcome], mode: str) -> list[Outcome]:
    """Finished trials with a finite metric, best first; ties by trial id. Failed ones never rank."""
    ok = [o for o in outcomes if o.ok]
    return sorted(ok, key=lambda o: ((o.metric if mode == "min" else -o.metric), o.trial.id))  # type: ignore[operator]


def survivors(stage: Stage, outcomes: list[Outcome], mode: str) -> list[Outcome]:
    ranked = rank(outcomes, mode)
    return ranked[: stage.top_k] if stage.top_k else ranked


def field_value(outcome: Outcome, fld: str, where: str) -> Any:
    """The value of a link field on a finished trial (see spec.LINK_FIELDS)."""
    trial = outcome.trial
    if fld == "dump_folder":
        return trial.folder
    if fld == "config":
        return os.path.join(trial.folder, "config.toml")
    if fld == "metric":
        return outcome.metric
    if fld == "checkpoint":
        path = last_checkpoint(trial.folder, trial.config)
        if path is None:
            raise ExperimentError(
                f"{where}: trial {trial.id} has no complete checkpoint (is checkpoint.enable_checkpoint on?)"
            )
        return path
    if fld == "hf_export":
        path = outcome.summary.get("hf_export") or trial.folder
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ExperimentError(
                f"{where}: trial {trial.id} has no Hugging Face export in {path} (train.sh writes one when checkpoints are on)"
            )
        return path
    if fld.startswith("metrics."):
        return metric_value(trial.folder, fld[len("metrics.") :], outcome.summary)
    if trial.config is not None:
        section, _, key = fld.partition(".")
        return getattr(getattr(trial.config, section), key)
    return trial.values.get("kwargs", {}).get(fld)


def _readable(contender: str | None, params: dict[str, Any]) -> str:
    parts = [contender] if contender else []
    for key, value in params.items():
        short = key.rsplit(".", 1)[-1]
        if isinstance(value, float):
            text = f"{value:.3g}"
        elif isinstance(value, str) and ("/" in value or value.endswith((".json", ".toml"))):
            text = os.path.splitext(os.path.basename(value.rstrip("/")))[0]
        else:
            text = str(value)
        parts.append(f"{short[:8]}{text[:12]}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_-.")
    return name[:48].rstrip("_-.") or "trial"


def _grid_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    axes: list[list[dict[str, Any]]] = []
    for key, value in space.items():
        if isinstance(value, Grid):
            axes.append([{key: v} for v in value.values])
        elif isinstance(value, Zip):
            axes.append([dict(zip(value.keys, row, strict=True)) for row in value.rows])
    return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*axes)] or [{}]


class StageExpansion:
    """The groups of a stage whose linked stages are complete; ``trials(group, round, asks)`` resolves."""

    def __init__(self, exp: Experiment, stage: Stage, views: dict[str, StageView]) -> None:
        self.exp, self.stage = exp, stage
        self.kind = stage_kind(stage.kind)
        self.where = f"{exp.source}: [[stage]] {stage.name!r}"
        waiting = sorted({link.stage for _, link in stage.links() if link.stage not in views})
        if waiting:
            raise Waiting(waiting)
        fan_stages = sorted({link.stage for _, link in stage.links() if link.fans_out})
        self.fan_stages = fan_stages
        choices = []
        for name in fan_stages:
            link = next(lk for _, lk in stage.links() if lk.stage == name and lk.fans_out)
            pool = views[name].survivors[: link.k] if link.pick == "top" else views[name].survivors
            if not pool:
                raise ExperimentError(f"{self.where}: stage {name!r} has no successful trial to link to")
            choices.append(pool)
        self.groups: list[Group] = []
        for combo in itertools.product(*choices):
            picked = dict(zip(fan_stages, combo, strict=True))
            contenders: list[Contender | None] = list(stage.contenders) or [None]
            for contender in contenders:
                self.groups.append(self._group(contender, picked, views))

    def _link_value(self, key: str, link: Link, picked: dict[str, Outcome], views: dict[str, StageView]) -> Any:
        where = f"{self.where} {key!r}"
        if link.fans_out:
            return field_value(picked[link.stage], link.field, where)
        view = views[link.stage]
        if link.pick == "all":
            return [field_value(o, link.field, where) for o in view.survivors]
        if view.best is None:
            raise ExperimentError(f"{where}: stage {link.stage!r} has no successful trial to link to")
        return field_value(view.best, link.field, where)

    def _group(self, contender: Contender | None, picked: dict[str, Outcome], views: dict[str, StageView]) -> Group:
        stage = self.stage
        override = {**stage.override, **(contender.override if contender else {})}
        space = {**stage.space, **(contender.space if contender else {})}
        fixed: dict[str, Any] = {}
        shown: dict[str, Any] = {}
        lineage = {name: o.trial.id for name, o in picked.items()}
        for key, value in [*override.items(), *stage.options.items()]:
            if isinstance(value, Link):
                fixed[key] = self._link_value(key, value, picked, views)
                if value.pick == "best" and views[value.stage].best is not None:
                    lineage.setdefault(value.stage, views[value.stage].best.trial.id)  # type: ignore[union-attr]
                if value.pick != "all" and value.field not in ("dump_folder", "checkpoint", "hf_export", "config"):
                    shown[key] = fixed[key]
            elif key in override:
                fixed[key] = value
        base = (contender.config if contender and contender.config else None) or stage.config
        if base is None:  # an evaluate stage: the linked trial's own config
            ck = stage.options.get("checkpoint")
            origin = picked.get(ck.stage) if isinstance(ck, Link) else None
            origin = origin or (views[ck.stage].best if isinstance(ck, Link) else None)
            base = os.path.join(origin.trial.folder, "config.toml") if origin else ""
        key = "/".join([contender.name if contender else "-", *(f"{s}={o.trial.id}" for s, o in picked.items())])
        dists = {k: v for k, v in space.items() if isinstance(v, Dist)}
        return Group(key, contender, base, fixed, shown, lineage, _grid_points(space), dists, stage.search or Search())

    def trials(self, group: Group, round_index: int, asks: list[dict[str, Any]]) -> list[Trial]:
        """The trials of one round: each ask (sampled values; ``{}`` without sampling) x the grid points."""
        out = []
        for ask in asks:
            for point in group.grid:
                out.append(self.resolve(group, {**point, **ask}))
        group.trials[round_index] = out
        return out

    def resolve(self, group: Group, searched: dict[str, Any]) -> Trial:
        stage = self.stage
        values = {**group.fixed, **searched}
        if self.kind.trains and self.kind.config_keys:  # TensorBoard on inside experiments (the stage may say no)
            values = {"metrics.enable_tensorboard": True, **values}
        config, extra, material = self.kind.resolve(stage, group.base_path, dict(values), self.where)
        params = {**group.shown, **searched}
        name = _readable(
            group.contender.name if group.contender else None,
            {k: v for k, v in params.items() if k in searched or not isinstance(v, str)},
        )
        # Trials from different upstream survivors stay apart even where their configs agree (lineage).
        fanned = {s: group.lineage[s] for s in self.fan_stages}
        trial_id = f"{name}-{config_hash({'kind': stage.kind, 'material': material, 'from': fanned})}"
        folder = os.path.join(self.exp.root, stage.name, trial_id)
        if config is not None:
            from flame.config.loader import apply_overrides

            config = apply_overrides(config, {"job.dump_folder": folder}, where=self.where)
        return Trial(
            experiment=self.exp.name,
            stage=stage.name,
            id=trial_id,
            kind=stage.kind,
            folder=folder,
            contender=group.contender.name if group.contender else None,
            params=params,
            lineage=dict(group.lineage),
            config=config,
            values=extra,
            ngpu=stage.ngpu,
            nnode=stage.nnode,
            steps=config.training.steps if config is not None and self.kind.trains else 0,
        )

    def is_sampled(self, group: Group) -> bool:
        return bool(group.dists)

    def num_rounds(self, group: Group) -> int:
        from flame.experiments.search import num_rounds

        return num_rounds(group.search, self.exp.max_parallel, len(group.grid)) if group.dists else 1

    def asks_in_round(self, group: Group, round_index: int) -> int:
        from flame.experiments.search import round_size

        size = round_size(group.search, self.exp.max_parallel, len(group.grid))
        return max(0, min(size, (group.search.samples or 0) - size * round_index))


def check_device(exp: Experiment) -> str:
    """The device type trials are validated for: this machine's for the local launcher, the nodes'
    (``[experiment.slurm] gpus_per_node``) on Slurm."""
    if exp.launcher == "slurm":
        return "cuda" if exp.slurm.gpus_per_node > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def validate_trials(exp: Experiment, trials: list[Trial], device_type: str) -> None:
    """Every trial's config as training would check it (schema, world size, files): one ConfigError."""
    problems: list[str] = []
    for trial in trials:
        if exp.launcher == "local" and trial.nnode > 1:
            problems.append(f"{exp.source}: [[stage]] {trial.stage!r}: nnode = {trial.nnode} needs --launcher slurm")
            continue
        try:
            stage_kind(trial.kind).validate(trial, device_type, f"{exp.source}: [[stage]] {trial.stage!r}")
        except ConfigError as e:
            problems.extend(p for p in e.problems if p not in problems)
    # A problem of the base config repeats in every trial: say it once, with the number of trials.
    merged: dict[str, list[str]] = {}
    for p in problems:
        m = re.match(r"(.*?): trial (\S+): (.*)", p)
        key = f"{m.group(1)}: {m.group(3)}" if m else p
        merged.setdefault(key, []).append(m.group(2) if m else "")
    if merged:
        raise ConfigError(
            [
                k
                if len(v) == 1 and not v[0]
                else f"{k} (in {len(v)} trials: {', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                for k, v in merged.items()
            ]
        )


def finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
