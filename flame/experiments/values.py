"""Values of an experiment spec: literals, grids, zips, distributions and links, parsed and checked.

``parse_param`` turns one spec value into a literal or one of the frozen dataclasses below, adding a
problem (naming where it was found) for anything malformed; ``spec.py`` assembles them into stages.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from flame.config.errors import ConfigError

SAMPLED = ("choice", "uniform", "loguniform", "int")
LINK_FIELDS = ("dump_folder", "checkpoint", "hf_export", "metric", "config")
PICKS = "best | each | top:K | all"


@dataclass(frozen=True)
class Grid:
    """``{ grid = [...] }``: one axis of the stage's cartesian product."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Zip:
    """``{ zip = { key = [...], key2 = [...] } }``: keys that move together, one axis of the product."""

    keys: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]  # rows[i] holds every key's i-th value


@dataclass(frozen=True)
class Dist:
    """A sampled value: ``choice`` (a list), ``uniform`` / ``loguniform`` (floats), ``int`` (inclusive)."""

    kind: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Link:
    """Flambé's ``!@``: a value taken from the survivors of an earlier stage.

    ``pick``: ``best`` (one value), ``each`` / ``top`` (the stage fans out once per survivor, or per one
    of the top ``k``), ``all`` (one list of every survivor's value, for analyses)."""

    stage: str
    field: str
    pick: str
    k: int = 0

    @property
    def fans_out(self) -> bool:
        return self.pick in ("each", "top")


def _closest(word: str, options: list[str] | set[str]) -> str:
    match = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


class _Problems:
    """Collects problems, each prefixed with where it was found."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{self.source}: {where}: {message}")

    def unknown(self, where: str, keys: set[str] | dict, allowed: set[str]) -> None:
        for key in keys:
            if key not in allowed:
                self.add(where, f"unknown key {key!r}.{_closest(key, allowed)} Allowed: {', '.join(sorted(allowed))}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def parse_link(table: dict[str, Any], where: str, problems: _Problems) -> Link | None:
    unknown = set(table) - {"link", "field", "pick"}
    if unknown:
        problems.unknown(where, unknown, {"link", "field", "pick"})
    stage, fld, pick = table.get("link"), table.get("field"), table.get("pick", "best")
    if not isinstance(stage, str) or not isinstance(fld, str) or not fld:
        problems.add(where, "a link needs link = '<stage>' and field = '<what>' (strings)")
        return None
    if not isinstance(pick, str):
        problems.add(where, f"pick must be {PICKS}, got {pick!r}")
        return None
    if pick.startswith("top:"):
        try:
            k = int(pick[4:])
        except ValueError:
            k = 0
        if k < 1:
            problems.add(where, f"pick {pick!r}: top:K needs an integer K >= 1")
            return None
        return Link(stage, fld, "top", k)
    if pick not in ("best", "each", "all"):
        problems.add(where, f"pick must be {PICKS}, got {pick!r}")
        return None
    return Link(stage, fld, pick)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_param(value: Any, where: str, problems: _Problems, in_space: bool) -> Any:
    """A literal, or a ``{ grid | choice | uniform | loguniform | int | zip | link = ... }`` table."""
    if not isinstance(value, dict):
        if in_space:
            problems.add(
                where,
                "space values are tables ({ grid = [...] }, { loguniform = [a, b] }, ...); "
                "put fixed values in override",
            )
        return value
    kinds = set(value) & {"grid", "zip", "link", *SAMPLED}
    if "link" in value:
        if in_space:
            problems.add(where, "links belong in override, not in space")
            return None
        return parse_link(value, where, problems)
    if len(kinds) != 1 or len(value) != 1:
        problems.add(where, f"expected one of grid, zip, {', '.join(SAMPLED)}, link; got {value!r}")
        return None
    kind, arg = next(iter(value.items()))
    if not in_space:
        problems.add(where, f"{kind!r} values belong in space (override takes literals and links)")
        return None
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            problems.add(where, f"{kind} needs a non-empty list of values, got {arg!r}")
            return None
        return Grid(tuple(arg)) if kind == "grid" else Dist("choice", tuple(arg))
    if kind == "zip":
        if not isinstance(arg, dict) or not arg or not all(isinstance(v, list) and v for v in arg.values()):
            problems.add(where, "zip needs a table of non-empty lists: { zip = { 'a.b' = [1, 2], 'c.d' = [3, 4] } }")
            return None
        lengths = {len(v) for v in arg.values()}
        if len(lengths) != 1:
            problems.add(where, f"zip lists must have one length, got {sorted(len(v) for v in arg.values())}")
            return None
        return Zip(tuple(arg), tuple(zip(*arg.values(), strict=True)))
    if not isinstance(arg, list) or len(arg) != 2 or not all(_is_number(v) for v in arg):
        problems.add(where, f"{kind} needs [low, high] (two numbers), got {arg!r}")
        return None
    low, high = arg
    if kind == "int" and not all(isinstance(v, int) for v in arg):
        problems.add(where, f"int needs two integers, got {arg!r}")
        return None
    if low >= high:
        problems.add(where, f"{kind} [{low}, {high}]: low must be below high")
        return None
    if kind == "loguniform" and low <= 0:
        problems.add(where, f"loguniform [{low}, {high}]: bounds must be > 0")
        return None
    return Dist(kind, (low, high))


def _params(table: Any, where: str, problems: _Problems, in_space: bool) -> dict[str, Any]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        problems.add(where, f"expected a table of 'section.key' = value, got {table!r}")
        return {}
    return {key: parse_param(v, f"{where} {key!r}", problems, in_space) for key, v in table.items()}
