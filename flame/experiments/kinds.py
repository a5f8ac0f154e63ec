"""Stage kinds: what a stage's trials are, how they resolve, and the command that runs one.

``train`` (default): a training run, ``bash train.sh --job.config_file <trial>/config.toml``.
``evaluate``: ``python -m flame.evaluate`` on a linked checkpoint or Hugging Face folder.
``python``: a user's ``module:function`` called with the trial's values (``flame.experiments.pyrun``).
``distill``: a training run distilled from ``teacher`` (a run or Hugging Face folder, usually a link).
Another package adds a kind with ``register_stage_kind``: a kind declares
its extra stage keys, checks them, resolves a trial's config or values, and names its command.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.trial import Trial
from flame.experiments.values import LINK_FIELDS, Link

Add = Callable[[str, str], None]  # (where, message)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


@cache
def schema_keys() -> list[str]:
    from flame.config.loader import field_specs

    return [f"{s}.{k}" for s, fields in field_specs().items() for k in fields]


def config_hash(material: Any) -> str:
    """8 hex digits of the SHA-256 of canonical JSON: the trial id's stable part."""
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@cache
def _base_config(path: str, mtime: float):
    from flame.config.loader import load_toml

    return load_toml(path)


def load_base(path: str, where: str):
    """A stage's base training TOML (cached per file version); a missing file is a ConfigError naming ``where``."""
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: config {path!r} does not exist or is not a file")
    return _base_config(path, os.path.getmtime(path))


class StageKind:
    """The train kind; other kinds override what differs."""

    name = "train"
    keys: tuple[str, ...] = ()  # extra stage keys this kind accepts
    config_keys = True  # override/space keys are dotted keys of the training schema
    trains = True  # its trials train for training.steps (status shows step/steps)

    def check_stage(self, stage: Any, where: str, add: Add) -> None:
        if stage.config is None and (not stage.contenders or not all(c.config for c in stage.contenders)):
            add(where, "config (the base training TOML of every trial) is missing")

    def check_key(self, key: str) -> str | None:
        if not self.config_keys or key in schema_keys():
            return None
        return f"unknown config key {key!r}.{_closest(key, schema_keys())} (any [section] key of the training schema)"

    def check_field(self, fld: str, stage: Any) -> str | None:
        if fld in LINK_FIELDS or fld.startswith("metrics.") or fld in schema_keys():
            return None
        return f"no such field.{_closest(fld, [*LINK_FIELDS, *schema_keys()])} Fields: {', '.join(LINK_FIELDS)}, metrics.<key>, or a config key"

    def resolve(self, stage: Any, base_path: str, values: dict[str, Any], where: str) -> tuple[Any, dict, Any]:
        """(resolved config or None, kind values, hash material) of a trial whose dotted ``values`` are
        its stage's literals, links and searched params; ``job.dump_folder`` is set later."""
        from flame.config.loader import apply_overrides, to_dict

        config = apply_overrides(load_base(base_path, where), values, where=where)
        material = to_dict(config)
        material["job"].pop("dump_folder", None)
        return config, {}, material

    def command(self, trial: Trial) -> list[str]:
        return ["bash", os.path.join(ROOT, "train.sh"), "--job.config_file", os.path.join(trial.folder, "config.toml")]

    def validate(self, trial: Trial, device_type: str, where: str) -> None:
        from flame.config.validate import validate

        assert trial.config is not None
        try:
            validate(trial.config, trial.ngpu * trial.nnode, device_type)
        except ConfigError as e:
            raise ConfigError([f"{where}: trial {trial.id}: {p}" for p in e.problems]) from None


class EvaluateKind(StageKind):
    """``kind = "evaluate"``: loss, perplexity and bits per byte of a model on ``[validation]`` datasets.

    ``checkpoint`` is a DCP step folder, a run folder (its last complete checkpoint) or a Hugging Face
    folder, usually a link (``{ link = "train", field = "checkpoint", pick = "each" }``); ``config``
    defaults to the linked trial's own config.toml; ``lm_eval = { tasks = [...], include_path, limit,
    num_fewshot, batch_size }`` adds lm-evaluation-harness tasks."""

    name = "evaluate"
    keys = ("checkpoint", "lm_eval")
    trains = False
    LM_EVAL_KEYS = ("tasks", "include_path", "limit", "num_fewshot", "batch_size")

    def check_stage(self, stage: Any, where: str, add: Add) -> None:
        ck = stage.options.get("checkpoint")
        if ck is None:
            add(where, "checkpoint (a DCP step folder, a run folder, a Hugging Face folder, or a link) is missing")
        elif not isinstance(ck, (str, Link)):
            add(f"{where} checkpoint", f"expected a path or a link, got {ck!r}")
        if stage.config is None and not isinstance(ck, Link):
            add(where, "config is missing (it defaults to the linked trial's config only with a linked checkpoint)")
        lm = stage.options.get("lm_eval")
        if lm is not None:
            if not isinstance(lm, dict) or not isinstance(lm.get("tasks"), list) or not lm["tasks"]:
                add(f"{where} lm_eval", "expected { tasks = ['task', ...], include_path = ..., limit = N }")
            else:
                for key in set(lm) - set(self.LM_EVAL_KEYS):
                    add(f"{where} lm_eval", f"unknown key {key!r}; allowed: {', '.join(self.LM_EVAL_KEYS)}")
        if stage.ngpu * stage.nnode > 1 and stage.nnode > 1:
            add(where, "evaluate runs on one node (nnode = 1)")

    def resolve(self, stage: Any, base_path: str, values: dict[str, Any], where: str):
        checkpoint = values.pop("checkpoint")
        values = {**values, "validation.enable": True, "checkpoint.enable_checkpoint": False}
        config, _, material = super().resolve(stage, base_path, values, where)
        extra = {"checkpoint": checkpoint, "lm_eval": stage.options.get("lm_eval")}
        return config, extra, {"config": material, **extra}

    def command(self, trial: Trial) -> list[str]:
        args = [
            "--job.config_file",
            os.path.join(trial.folder, "config.toml"),
            "--model_path",
            trial.values["checkpoint"],
        ]
        lm = trial.values.get("lm_eval") or {}
        for key in self.LM_EVAL_KEYS:
            if key in lm:
                args += [f"--lm_eval.{key}", ",".join(map(str, lm[key])) if key == "tasks" else str(lm[key])]
        if trial.ngpu > 1:
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={trial.ngpu}",
                "-m",
                "flame.evaluate",
                *args,
            ]
        return [sys.executable, "-m", "flame.evaluate", *args]


class PythonKind(StageKind):
    """``kind = "python"``: ``function = "package.module:name"`` called with the trial's values as keyword
    arguments (override literals, searched params, linked inputs; plus ``trial_folder`` when it takes one),
    returning a dict of metrics, written to the trial's summary.json."""

    name = "python"
    keys = ("function",)
    config_keys = False
    trains = False

    def check_stage(self, stage: Any, where: str, add: Add) -> None:
        fn = stage.options.get("function")
        if not isinstance(fn, str) or fn.count(":") != 1:
            add(where, f"function must be 'package.module:function', got {fn!r}")

    def check_key(self, key: str) -> str | None:
        return None if key.isidentifier() else f"{key!r}: python stage values are keyword arguments (identifiers)"

    def check_field(self, fld: str, stage: Any) -> str | None:
        if fld in ("dump_folder", "metric") or fld.startswith("metrics.") or fld.isidentifier():
            return None
        return "python stages give dump_folder, metric, metrics.<key> or one of their values"

    def resolve(self, stage: Any, base_path: str, values: dict[str, Any], where: str):
        fn = stage.options["function"]
        return None, {"function": fn, "kwargs": values}, {"function": fn, "kwargs": values}

    def command(self, trial: Trial) -> list[str]:
        return [sys.executable, "-m", "flame.experiments.pyrun", os.path.join(trial.folder, "trial.json")]

    def validate(self, trial: Trial, device_type: str, where: str) -> None:
        import importlib

        module, _, name = trial.values["function"].partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{where}: function {trial.values['function']!r} cannot be imported: {e}") from None
        if not callable(fn):
            raise ConfigError(f"{where}: {trial.values['function']!r} is not callable")


class DistillKind(StageKind):
    """``kind = "distill"``: training runs distilled from ``teacher`` (``--distill.teacher``): a flame run folder
    or a Hugging Face folder, usually linked (``{ link = "teacher", field = "dump_folder", pick = "best" }``:
    the best teacher trial's run, its latest checkpoint read from DCP). α, T, the loss and every other
    ``distill.*`` key are config keys: set in ``override``, searched in ``space``, reduced like any stage."""

    name = "distill"
    keys = ("teacher",)

    def check_stage(self, stage: Any, where: str, add: Add) -> None:
        super().check_stage(stage, where, add)
        teacher = stage.options.get("teacher")
        if teacher is None:
            add(where, "teacher (a flame run folder, a Hugging Face folder, or a link to the teacher stage) is missing")
        elif not isinstance(teacher, (str, Link)):
            add(f"{where} teacher", f"expected a path or a link, got {teacher!r}")
        for table in [stage.override, stage.space, *[c.override for c in stage.contenders]]:
            for key in ("distill.teacher", "distill.teacher_cache"):
                if key in table:
                    add(where, f"{key!r} is set by the stage's teacher key in a distill stage; remove it")

    def resolve(self, stage: Any, base_path: str, values: dict[str, Any], where: str) -> tuple[Any, dict, Any]:
        teacher = values.pop("teacher")
        return super().resolve(stage, base_path, {**values, "distill.teacher": teacher}, where)


_KINDS: dict[str, StageKind] = {k.name: k for k in (StageKind(), EvaluateKind(), PythonKind(), DistillKind())}
# Modules imported on the first lookup of a kind: each registers its kinds (e.g. a distill stage). The
# environment variable FLAME_STAGE_KINDS adds more (a comma list of modules of the user's own packages).
PLUGIN_MODULES: list[str] = []
_loaded: set[str] = set()


def _load_plugins() -> None:
    import importlib

    extra = [m.strip() for m in os.environ.get("FLAME_STAGE_KINDS", "").split(",") if m.strip()]
    for module in PLUGIN_MODULES + extra:
        if module not in _loaded:
            _loaded.add(module)
            importlib.import_module(module)


def register_stage_kind(kind: StageKind) -> None:
    """Add a stage kind (``kind = "<name>"`` in specs); a package registers its kind when imported."""
    _KINDS[kind.name] = kind


def stage_kinds() -> dict[str, StageKind]:
    _load_plugins()
    return dict(_KINDS)


def stage_kind(name: str) -> StageKind:
    _load_plugins()
    return _KINDS.get(name, _KINDS["train"])
