"""TOML and command-line loading of the schema in ``schema.py``.

Precedence: command line > TOML file (``--job.config_file``) > dataclass defaults. Every problem
(an unknown section, key or flag, a wrong type, a value outside its choices) becomes a
``ConfigError`` that names the flag or ``[section] key`` in the file and what is allowed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import sys
import tomllib
import types
import typing
from functools import cache
from typing import Any

from flame.config.errors import ConfigError
from flame.config.schema import JobConfig

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What the loader needs to know about one field."""

    section: str
    name: str
    kind: type  # bool, int, float or str
    is_list: bool
    optional: bool
    default: Any
    help: str
    choices: tuple[Any, ...] | None

    @property
    def flag(self) -> str:
        return f"--{self.section}.{self.name}"

    def type_name(self) -> str:
        base = {bool: "boolean", int: "integer", float: "number", str: "string"}[self.kind]
        if self.is_list:
            base = f"comma list of {base}s"
        return base + (" or unset" if self.optional else "")


@cache
def field_specs() -> dict[str, dict[str, FieldSpec]]:
    """Section name -> field name -> FieldSpec, from the dataclass annotations."""
    specs: dict[str, dict[str, FieldSpec]] = {}
    sections = typing.get_type_hints(JobConfig)
    for section, section_cls in sections.items():
        hints = typing.get_type_hints(section_cls)
        specs[section] = {}
        for f in dataclasses.fields(section_cls):
            kind, is_list, optional = _unpack_type(hints[f.name])
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc,operator]
            specs[section][f.name] = FieldSpec(
                section,
                f.name,
                kind,
                is_list,
                optional,
                default,
                f.metadata.get("help", ""),
                f.metadata.get("choices"),
            )
    return specs


def _unpack_type(tp: Any) -> tuple[type, bool, bool]:
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def _scalar(spec: FieldSpec, value: Any, where: str) -> Any:
    """One scalar value converted to the field's type, from a TOML value or a CLI string."""
    kind = spec.kind
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() in _TRUE | _FALSE:
                    return text.lower() in _TRUE
                raise ValueError
            return kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {spec.type_name()}, got {value!r}") from None
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected {spec.type_name()}, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected {spec.type_name()}, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected {spec.type_name()}, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected {spec.type_name()}, got {value!r}")
    return value


def convert(spec: FieldSpec, value: Any, where: str) -> Any:
    """A TOML or CLI value converted to the field's type and checked against its choices."""
    if spec.optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
        return None
    if spec.is_list:
        if isinstance(value, str):
            items: list[Any] = [] if not value.strip() else [v.strip() for v in value.split(",")]
        elif isinstance(value, list):
            items = value
        else:
            items = [value]
        result = [_scalar(spec, v, where) for v in items]
    else:
        result = _scalar(spec, value, where)
    values = result if isinstance(result, list) else [result]
    if spec.choices is not None:
        for v in values:
            if v not in spec.choices:
                allowed = ", ".join(str(c) for c in spec.choices)
                raise ConfigError(f"{where}: {v!r} is not allowed; choose one of: {allowed}")
    return result


def _read_toml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--job.config_file: {path!r} does not exist or is not a file.")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--job.config_file {path}: malformed TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--job.config_file {path}: not UTF-8 text: {e}") from None


def _apply_toml(config: JobConfig, data: dict[str, Any], path: str) -> list[str]:
    problems: list[str] = []
    specs = field_specs()
    for section, values in data.items():
        if section not in specs:
            problems.append(
                f"{path}: unknown section [{section}].{_closest(section, list(specs))} Sections: {', '.join(specs)}"
            )
            continue
        if not isinstance(values, dict):
            problems.append(f"{path}: {section} must be a [{section}] table, got {values!r}")
            continue
        for key, value in values.items():
            spec = specs[section].get(key)
            if spec is None:
                problems.append(f"{path}: unknown key {key!r} in [{section}].{_closest(key, list(specs[section]))}")
                continue
            try:
                setattr(
                    getattr(config, section),
                    key,
                    convert(spec, value, f"{path}: [{section}] {key}"),
                )
            except ConfigError as e:
                problems.extend(e.problems)
    return problems


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser(prog: str = "flame.train") -> argparse.ArgumentParser:
    """The argparse parser with one ``--section.key`` flag per field, grouped by section in ``-h``."""
    parser = _Parser(
        prog=prog,
        description="Train a Hugging Face causal LM. Precedence: command line > TOML file > defaults.",
        usage="%(prog)s [-h] [--job.config_file FILE.toml] [--section.key VALUE ...]",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for section, fields in field_specs().items():
        group = parser.add_argument_group(f"[{section}]")
        for spec in fields.values():
            default = ",".join(map(str, spec.default)) if spec.is_list else spec.default
            text = f"{spec.help} (default: {default!r}"
            if spec.choices:
                text += f"; one of {', '.join(map(str, spec.choices))}"
            text += ")"
            if spec.kind is bool and not spec.is_list:
                group.add_argument(spec.flag, nargs="?", const="true", metavar="BOOL", help=text)
            else:
                metavar = "LIST" if spec.is_list else spec.type_name().split()[0].upper()
                group.add_argument(spec.flag, metavar=metavar, help=text)
    return parser


def _cli_values(argv: list[str]) -> dict[tuple[str, str], str]:
    parser = build_parser()
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [s.flag for fields in field_specs().values() for s in fields.values()]
        problems = []
        for i, arg in enumerate(unknown):
            if arg.startswith("-"):
                name = arg.split("=", 1)[0]
                problems.append(f"unknown flag {name}.{_closest(name, flags)} See -h for all flags.")
            elif i == 0 or not unknown[i - 1].startswith("-"):  # not the value of an unknown flag
                problems.append(f"unexpected argument {arg!r}: flags look like --section.key value")
        raise ConfigError(problems)
    out = {}
    for dest, value in vars(known).items():
        section, key = dest.split(".", 1)
        out[(section, key)] = value
    return out


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """The config from defaults, then the TOML named by ``--job.config_file``, then the flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cli = _cli_values(argv)
    config = JobConfig()
    problems: list[str] = []
    config_file = cli.get(("job", "config_file"))
    if config_file:
        problems += _apply_toml(config, _read_toml(config_file), config_file)
    specs = field_specs()
    for (section, key), value in cli.items():
        spec = specs[section][key]
        try:
            setattr(getattr(config, section), key, convert(spec, value, spec.flag))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return config


def load_toml(path: str) -> JobConfig:
    """A config from one TOML file alone (for example a run's saved config.toml)."""
    config = JobConfig()
    problems = _apply_toml(config, _read_toml(path), path)
    if problems:
        raise ConfigError(problems)
    return config


def apply_overrides(config: JobConfig, overrides: dict[str, Any], where: str = "override") -> JobConfig:
    """A copy of ``config`` with dotted keys set (``{"training.steps": 300, "optimizer.lr": 1e-3}``).

    Values are converted and checked exactly like TOML values; an unknown section or key is an error
    naming ``where`` (a file, an experiment stage, a Python call) and the closest valid key.
    """
    specs = field_specs()
    config = copy.deepcopy(config)
    problems: list[str] = []
    keys = [f"{s}.{k}" for s, fields in specs.items() for k in fields]
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        spec = specs.get(section, {}).get(key)
        if spec is None:
            problems.append(f"{where}: unknown config key {dotted!r}.{_closest(dotted, keys)}")
            continue
        try:
            setattr(getattr(config, section), key, convert(spec, value, f"{where}: {dotted}"))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return config


def to_dict(config: JobConfig) -> dict[str, dict[str, Any]]:
    """The config as nested dicts, leaving out unset (None) values, which TOML cannot hold."""
    return {
        section: {k: v for k, v in dataclasses.asdict(getattr(config, section)).items() if v is not None}
        for section in field_specs()
    }


def save_toml(config: JobConfig, path: str) -> None:
    """Write the fully resolved config; ``load_toml`` of it gives back an equal config."""
    import tomli_w

    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        tomli_w.dump(to_dict(config), f)
    os.replace(tmp, path)
