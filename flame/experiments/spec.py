"""The experiment spec: dataclasses read from an experiment TOML (or a dict), every key checked up front.

An experiment is ``[experiment]`` (name, root, metric, mode, launcher, max_parallel, ``[experiment.slurm]``)
and an ordered list of ``[[stage]]`` tables. A stage names a base training TOML and sets config keys by
``override`` (literals and links to earlier stages) and ``space`` (grids, zips and distributions), searched
by ``search`` and reduced to its ``top_k`` survivors; ``[[stage.contender]]`` blocks each add their own
override and space. Every problem raises one ``ConfigError`` naming the file, the stage and the key.
Nothing here touches the disk beyond reading the spec; expansion into trials is ``plan.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.values import Dist, Grid, Link, Zip, _closest, _params, _Problems, parse_param

# The value types are re-exported: a spec's stages hold them (override, space).
__all__ = ["Contender", "Dist", "Experiment", "Grid", "Link", "Search", "Slurm", "Stage", "Zip", "load_spec", "resolve"]

SEARCH_KINDS = ("grid", "random", "tpe", "cmaes", "qmc", "gp")  # random/tpe/...: Optuna samplers
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Search:
    kind: str = "grid"
    samples: int | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna sampler


@dataclass
class Contender:
    name: str
    config: str | None = None
    override: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    kind: str = "train"
    config: str | None = None
    ngpu: int = 1
    nnode: int = 1
    override: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    search: Search | None = None
    top_k: int | None = None  # reduce = { top_k = K }
    contenders: list[Contender] = field(default_factory=list)
    max_failures: int | None = None  # None: a stage goes on whatever fails
    metric: str | None = None  # default: the experiment's
    mode: str | None = None
    scheduler: dict[str, Any] | None = None  # the trial-scheduler hook (hooks.py)
    options: dict[str, Any] = field(default_factory=dict)  # keys of its kind (kinds.py): function, checkpoint, ...

    def links(self) -> list[tuple[str, Link]]:
        """Every (key, link) of the stage, its contenders' and its kind's options."""
        found = [(k, v) for k, v in self.override.items() if isinstance(v, Link)]
        for c in self.contenders:
            found += [(k, v) for k, v in c.override.items() if isinstance(v, Link)]
        found += [(k, v) for k, v in self.options.items() if isinstance(v, Link)]
        return found


@dataclass
class Slurm:
    partition: str = ""
    time: str = ""
    account: str = ""
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem: str = ""
    options: list[str] = field(default_factory=list)  # extra sbatch options, e.g. ["--qos=high"]
    controller_time: str = "00:10:00"


@dataclass
class Experiment:
    name: str
    root: str
    metric: str = "validation_loss"
    mode: str = "min"
    launcher: str = "local"
    max_parallel: int = 1
    budget: float | None = None  # total steps or tokens of the scheduled stages (their resource), cool-downs included
    description: str = ""
    slurm: Slurm = field(default_factory=Slurm)
    stages: list[Stage] = field(default_factory=list)
    source: str = "<dict>"  # the file the spec came from, for messages
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the spec as read

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def metric_of(self, stage: Stage) -> tuple[str, str]:
        return stage.metric or self.metric, stage.mode or self.mode


EXPERIMENT_KEYS = {f.name for f in dataclasses.fields(Experiment)} - {"stages", "source", "raw"}
SLURM_KEYS = {f.name for f in dataclasses.fields(Slurm)}
STAGE_KEYS = {"name", "kind", "config", "ngpu", "nnode", "override", "space", "search", "reduce", "contender"}
STAGE_KEYS |= {"max_failures", "metric", "mode", "scheduler"}


def _int(table: dict, key: str, default: int | None, where: str, problems: _Problems, low: int = 1) -> int | None:
    value = table.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        problems.add(where, f"{key} must be an integer >= {low}, got {value!r}")
        return default
    return value


def _str(table: dict, key: str, default: Any, where: str, problems: _Problems, choices=None) -> Any:
    value = table.get(key, default)
    if value is not None and not isinstance(value, str):
        problems.add(where, f"{key} must be a string, got {value!r}")
        return default
    if choices and value not in choices:
        problems.add(where, f"{key} {value!r} is not allowed; choose one of: {', '.join(choices)}")
        return default
    return value


def _search(table: Any, where: str, problems: _Problems) -> Search | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        problems.add(where, f"search must be a table like {{ kind = 'random', samples = 8 }}, got {table!r}")
        return None
    problems.unknown(where, set(table), {"kind", "samples", "seed", "options"})
    kind = _str(table, "kind", "grid", where, problems, SEARCH_KINDS)
    options = table.get("options", {})
    if not isinstance(options, dict):
        problems.add(where, f"options must be a table of the sampler's keyword arguments, got {options!r}")
        options = {}
    seed = _int(table, "seed", 0, where, problems, low=0)
    return Search(kind, _int(table, "samples", None, where, problems), seed or 0, options)


def _stage(table: Any, index: int, problems: _Problems) -> Stage | None:
    from flame.experiments.kinds import stage_kind, stage_kinds

    if not isinstance(table, dict):
        problems.add(f"[[stage]] #{index + 1}", "must be a table")
        return None
    name = table.get("name")
    where = f"[[stage]] {name!r}" if isinstance(name, str) else f"[[stage]] #{index + 1}"
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.add(where, f"name must be a folder-safe string (letters, digits, . _ -), got {name!r}")
        return None
    kind_name = _str(table, "kind", "train", where, problems, tuple(stage_kinds()))
    kind = stage_kind(kind_name or "train")
    problems.unknown(where, set(table), STAGE_KEYS | set(kind.keys))
    stage = Stage(name=name, kind=kind.name)
    stage.config = _str(table, "config", None, where, problems)
    stage.ngpu = _int(table, "ngpu", 1, where, problems) or 1
    stage.nnode = _int(table, "nnode", 1, where, problems) or 1
    stage.override = _params(table.get("override"), f"{where} override", problems, in_space=False)
    stage.space = _params(table.get("space"), f"{where} space", problems, in_space=True)
    stage.search = _search(table.get("search"), f"{where} search", problems)
    stage.max_failures = _int(table, "max_failures", None, where, problems, low=0)
    stage.metric = _str(table, "metric", None, where, problems)
    stage.mode = _str(table, "mode", None, where, problems, (None, "min", "max"))
    reduce = table.get("reduce")
    if reduce is not None:
        if not isinstance(reduce, dict):
            problems.add(f"{where} reduce", f"must be a table like {{ top_k = 2 }}, got {reduce!r}")
        else:
            problems.unknown(f"{where} reduce", set(reduce), {"top_k"})
            stage.top_k = _int(reduce, "top_k", None, f"{where} reduce", problems)
    scheduler = table.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, dict):
        problems.add(where, f"scheduler must be a table like {{ kind = '...' }}, got {scheduler!r}")
    stage.scheduler = scheduler
    contenders = table.get("contender", [])
    if not isinstance(contenders, list):
        problems.add(where, "contender must be an array of tables ([[stage.contender]])")
        contenders = []
    names: set[str] = set()
    for c in contenders:
        cname = c.get("name") if isinstance(c, dict) else None
        cwhere = f"{where} contender {cname!r}"
        if not isinstance(cname, str) or not NAME_RE.match(cname) or cname in names:
            problems.add(cwhere, "each contender needs a unique, folder-safe name")
            continue
        names.add(cname)
        problems.unknown(cwhere, set(c), {"name", "config", "override", "space"})
        stage.contenders.append(
            Contender(
                cname,
                _str(c, "config", None, cwhere, problems),
                _params(c.get("override"), f"{cwhere} override", problems, in_space=False),
                _params(c.get("space"), f"{cwhere} space", problems, in_space=True),
            )
        )
    for key in kind.keys:
        if key in table:
            value = table[key]
            stage.options[key] = (
                parse_param(value, f"{where} {key}", problems, False)
                if isinstance(value, dict) and "link" in value
                else value
            )
    kind.check_stage(stage, f"{where}", problems.add)
    return stage


def _check_stage_rules(exp: Experiment, problems: _Problems) -> None:
    """Rules across keys: search kinds against the space, links against earlier stages, schema keys."""
    from flame.experiments.kinds import stage_kind

    seen: list[str] = []
    for stage in exp.stages:
        where = f"[[stage]] {stage.name!r}"
        if stage.name in seen:
            problems.add(where, "stage names must be unique")
        kind = stage_kind(stage.kind)
        spaces = [("", stage.override, stage.space)] + [
            (f" contender {c.name!r}", c.override, c.space) for c in stage.contenders
        ]
        for label, override, space in spaces:
            for key in set(override) & set(space):
                problems.add(f"{where}{label}", f"{key!r} is set in both override and space")
            keys = [k for k in override] + [k for k, v in space.items() if not isinstance(v, Zip)]
            keys += [k for v in space.values() if isinstance(v, Zip) for k in v.keys]
            for key in keys:
                problem = kind.check_key(key)
                if problem:
                    problems.add(f"{where}{label}", problem)
            sampled = [k for k, v in space.items() if isinstance(v, Dist)]
            search = stage.search or Search()
            if sampled and search.kind == "grid":
                problems.add(
                    f"{where}{label} space",
                    f"{', '.join(sampled)} {'is' if len(sampled) == 1 else 'are'} sampled; set search = "
                    "{ kind = 'random' (or 'tpe', 'cmaes', 'qmc', 'gp'), samples = N }",
                )
        if stage.search and stage.search.kind != "grid" and stage.search.samples is None:
            problems.add(f"{where} search", f"kind {stage.search.kind!r} needs samples = N (trials to draw)")
        if stage.scheduler is not None:
            from flame.experiments.hooks import check_scheduler

            check_scheduler(stage, f"{where} scheduler", problems.add)
        for key, link in stage.links():
            lwhere = f"{where} {key!r}"
            if link.stage not in [s.name for s in exp.stages]:
                names = [s.name for s in exp.stages]
                problems.add(
                    lwhere,
                    f"link to unknown stage {link.stage!r}.{_closest(link.stage, names)} Stages: {', '.join(names)}",
                )
            elif link.stage not in seen:
                problems.add(
                    lwhere, f"link to stage {link.stage!r}, which is not earlier: links point to earlier stages only"
                )
            else:
                problem = stage_kind(exp.stage(link.stage).kind).check_field(link.field, exp.stage(link.stage))
                if problem:
                    problems.add(lwhere, f"link field {link.field!r} of stage {link.stage!r}: {problem}")
        fanouts: dict[str, str] = {}
        for key, link in stage.links():
            if link.fans_out and fanouts.setdefault(link.stage, f"{link.pick}{link.k}") != f"{link.pick}{link.k}":
                problems.add(f"{where} {key!r}", f"links to stage {link.stage!r} fan out with different picks")
        seen.append(stage.name)


def load_spec(source: str | os.PathLike | dict[str, Any], launcher: str | None = None) -> Experiment:
    """The experiment from a TOML path or a dict of the same shape, fully checked (ConfigError otherwise).

    ``launcher`` (the ``--launcher`` flag) overrides ``[experiment] launcher``."""
    if isinstance(source, dict):
        data, path = source, "<dict>"
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: the experiment spec does not exist or is not a file")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: malformed TOML: {e}") from None
    problems = _Problems(path)
    problems.unknown("top level", set(data), {"experiment", "stage"})
    top = data.get("experiment")
    if not isinstance(top, dict):
        problems.add("[experiment]", "missing: the spec needs an [experiment] table with at least a name")
        problems.raise_if_any()
    assert isinstance(top, dict)
    problems.unknown("[experiment]", set(top), EXPERIMENT_KEYS)
    name = top.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.add("[experiment] name", f"must be a folder-safe string, got {name!r}")
        name = "experiment"
    exp = Experiment(name=name, root=_str(top, "root", f"experiments/{name}", "[experiment]", problems) or "")
    exp.source, exp.raw = path, data
    exp.metric = _str(top, "metric", exp.metric, "[experiment]", problems) or exp.metric
    exp.mode = _str(top, "mode", "min", "[experiment]", problems, ("min", "max"))
    exp.description = _str(top, "description", "", "[experiment]", problems)
    exp.launcher = launcher or _str(top, "launcher", "local", "[experiment]", problems, ("local", "slurm"))
    if exp.launcher not in ("local", "slurm"):
        problems.add("--launcher", f"{exp.launcher!r} is not a launcher; choose local or slurm")
    exp.max_parallel = _int(top, "max_parallel", 1, "[experiment]", problems) or 1
    budget = top.get("budget")
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0):
        problems.add("[experiment] budget", f"must be a positive number of steps or tokens, got {budget!r}")
    exp.budget = budget
    slurm = top.get("slurm", {})
    if not isinstance(slurm, dict):
        problems.add("[experiment.slurm]", "must be a table")
        slurm = {}
    problems.unknown("[experiment.slurm]", set(slurm), SLURM_KEYS)
    for slurm_field in dataclasses.fields(Slurm):
        key = slurm_field.name
        if key in slurm:
            value, default = slurm[key], getattr(exp.slurm, key)
            if type(value) is not type(default) or (key == "options" and not all(isinstance(o, str) for o in value)):
                problems.add(f"[experiment.slurm] {key}", f"expected {type(default).__name__}, got {value!r}")
            else:
                setattr(exp.slurm, key, value)
    stages = data.get("stage", [])
    if not isinstance(stages, list) or not stages:
        problems.add("[[stage]]", "the spec needs at least one [[stage]] table")
        stages = []
    exp.stages = [s for i, t in enumerate(stages) if (s := _stage(t, i, problems)) is not None]
    _check_stage_rules(exp, problems)
    if exp.budget is not None:
        units = {(st.scheduler or {}).get("resource", "steps") for st in exp.stages if st.scheduler is not None}
        if not units:
            problems.add("[experiment] budget", "applies to stages with a scheduler, and no stage has one")
        elif len(units) > 1:
            problems.add(
                "[experiment] budget", "the scheduled stages count their resource in steps and in tokens; use one"
            )
    if exp.launcher == "slurm" and shutil.which("sbatch") is None:
        problems.add(
            "launcher", "'slurm' needs Slurm's sbatch on the PATH, and there is none here; use --launcher local"
        )
    problems.raise_if_any()
    return exp


def resolve(spec: str | os.PathLike | dict[str, Any] | Experiment, launcher: str | None = None) -> Experiment:
    """``load_spec`` with the experiment root made absolute (an Experiment is returned as it is)."""
    if isinstance(spec, Experiment):
        return spec
    exp = load_spec(spec, launcher)
    exp.root = os.path.abspath(exp.root)
    return exp
