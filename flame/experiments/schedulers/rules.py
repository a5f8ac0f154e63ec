"""The rules of successive halving, Hyperband and ASHA, and the check of a stage's ``scheduler`` table. Pure.

Notation: ``min`` and ``max`` resources (steps or tokens), ``eta`` the reduction factor, ``s`` a bracket.

* **Hyperband** (Li et al., JMLR 2018): ``s_max = floor(log_eta(max / min))`` brackets; bracket ``s``
  starts ``n = ceil((s_max + 1) / (s + 1) * eta^s)`` trials at ``max * eta^-s``; rung ``i`` of it holds
  ``floor(n * eta^-i)`` trials at ``max * eta^(i - s)`` (never fewer than one: the best always reaches
  ``max``). For max / min = 81, eta = 3 this is the paper's table.
* **Successive halving**: one bracket, ``s = s_max``, with every trial of the stage at its first rung.
* A rung's decision (``promote``): the top ``max(1, floor(n / eta))`` of the ``n`` trials at the rung go
  on, ranked by the metric; a failed trial or a non-finite metric (NaN, diverged) ranks last and is never
  promoted.
* **ASHA** (Li et al., MLSys 2020, Algorithm 2, ``asha_choice``): when a worker is free, for the rungs from
  the top down, promote the best trial of rung ``k`` that is in its top ``floor(|rung k| / eta)`` and not
  promoted yet; if there is none, a new trial starts at the bottom rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KINDS = ("sha", "hyperband", "asha")
RESOURCES = ("steps", "tokens")
RUNG_METRICS = ("cooldown", "stable")
KEYS = ("kind", "resource", "min", "max", "eta", "rung_metric", "cooldown_ratio")


@dataclass(frozen=True)
class Settings:
    kind: str
    resource: str = "steps"
    min: float = 1
    max: float = 1
    eta: int = 3
    rung_metric: str = "cooldown"
    cooldown_ratio: float = 0.2

    @property
    def s_max(self) -> int:
        return s_max(self.min, self.max, self.eta)


@dataclass(frozen=True)
class Rung:
    trials: int
    resource: float


@dataclass(frozen=True)
class Bracket:
    s: int
    rungs: tuple[Rung, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"s": self.s, "rungs": [{"trials": r.trials, "resource": r.resource} for r in self.rungs]}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_table(table: Any, where: str, add) -> Settings | None:
    """The scheduler table's keys checked (``add(where, message)`` for each problem); Settings if sound."""
    if not isinstance(table, dict):
        add(where, f"must be a table like {{ kind = 'hyperband', min = 3, max = 81 }}, got {table!r}")
        return None
    bad = False

    def problem(message: str) -> None:
        nonlocal bad
        bad = True
        add(where, message)

    for key in sorted(set(table) - set(KEYS)):
        problem(f"unknown key {key!r}; allowed: {', '.join(KEYS)}")
    kind = table.get("kind")
    if kind not in KINDS:
        problem(f"kind {kind!r} is not a scheduler; choose one of: {', '.join(KINDS)}")
    resource = table.get("resource", "steps")
    if resource not in RESOURCES:
        problem(f"resource {resource!r} is not allowed; choose steps or tokens")
    rung_metric = table.get("rung_metric", "cooldown")
    if rung_metric not in RUNG_METRICS:
        problem(f"rung_metric {rung_metric!r} is not allowed; choose cooldown or stable")
    lo, hi = table.get("min"), table.get("max")
    for key, value in (("min", lo), ("max", hi)):
        if not _number(value) or value <= 0:  # type: ignore[operator]
            problem(
                f"{key} must be a positive number of {resource if resource in RESOURCES else 'steps'}, got {value!r}"
            )
    if _number(lo) and _number(hi) and lo > 0 and hi > 0 and lo >= hi:  # type: ignore[operator]
        problem(f"min {lo} must be below max {hi} (the rungs go from min up to max)")
    eta = table.get("eta", 3)
    if not isinstance(eta, int) or isinstance(eta, bool) or eta < 2:
        problem(f"eta must be an integer >= 2 (the reduction factor between rungs), got {eta!r}")
    if resource == "steps":
        for key, value in (("min", lo), ("max", hi)):
            if _number(value) and value > 0 and value != int(value):  # type: ignore[operator, arg-type]
                problem(f"{key} must be a whole number of steps with resource = 'steps', got {value!r}")
    ratio = table.get("cooldown_ratio", 0.2)
    if not _number(ratio) or not 0 < ratio < 1:
        problem(f"cooldown_ratio must be a fraction in (0, 1) of the rung's steps, got {ratio!r}")
    if bad:
        return None
    return Settings(kind, resource, lo, hi, eta, rung_metric, float(ratio))  # type: ignore[arg-type]


def s_max(lo: float, hi: float, eta: int) -> int:
    """``floor(log_eta(hi / lo))``, exact for powers (81 / 1 with eta 3 is 4, not 3.9999)."""
    s = 0
    while lo * eta ** (s + 1) <= hi * (1 + 1e-9):
        s += 1
    return s


def _resource(hi: float, eta: int, power: int, whole: bool) -> float:
    value = hi / eta**power
    return round(value) if whole else value


def bracket(settings: Settings, s: int, n: int | None = None) -> Bracket:
    """Bracket ``s`` (starting ``n`` trials; the Hyperband count when None)."""
    eta, smax = settings.eta, settings.s_max
    if n is None:
        n = math.ceil((smax + 1) / (s + 1) * eta**s - 1e-9)
    whole = settings.resource == "steps"
    rungs = []
    count = n
    for i in range(s + 1):
        rungs.append(Rung(count, _resource(settings.max, eta, s - i, whole)))
        count = max(1, count // eta) if count else 0
    return Bracket(s, tuple(rungs))


def hyperband(settings: Settings) -> list[Bracket]:
    """Every bracket of one Hyperband iteration, the most aggressive (s_max) first."""
    return [bracket(settings, s) for s in range(settings.s_max, -1, -1)]


def brackets(settings: Settings, pool: int) -> list[Bracket]:
    """The brackets a stage with ``pool`` configurations runs: SHA and ASHA one (s_max) over the whole
    pool; Hyperband its brackets, filled in order from the pool (a short pool leaves later brackets smaller
    or empty; configurations beyond one iteration's are not drawn)."""
    if settings.kind != "hyperband":
        return [bracket(settings, settings.s_max, pool)]
    out, left = [], pool
    for b in hyperband(settings):
        n = min(b.rungs[0].trials, left)
        left -= n
        if n:
            out.append(bracket(settings, b.s, n))
    return out


def sort_key(metric: float | None, mode: str, name: str) -> tuple:
    """Best first; failed (None) and non-finite metrics last; ties by name."""
    if metric is None or not math.isfinite(metric):
        return (1, 0.0, name)
    return (0, metric if mode == "min" else -metric, name)


def ranked(results: dict[str, float | None], mode: str) -> list[str]:
    return sorted(results, key=lambda t: sort_key(results[t], mode, t))


def promotable(metric: float | None) -> bool:
    return metric is not None and math.isfinite(metric)


def promote(results: dict[str, float | None], eta: int, mode: str) -> tuple[list[str], list[str]]:
    """(promoted, stopped) of a complete rung: the top max(1, floor(n / eta)), finite metrics only."""
    quota = max(1, len(results) // eta)
    order = ranked(results, mode)
    promoted = [t for t in order[:quota] if promotable(results[t])]
    return promoted, [t for t in order if t not in promoted]


def asha_choice(
    rungs: list[dict[str, float | None]], promoted: list[set[str]], eta: int, mode: str
) -> tuple[int, str] | None:
    """ASHA's promotion when a worker is free: (rung k, trial) to continue to rung k + 1, or None (start
    a new trial). ``rungs[k]`` holds the results at rung k, ``promoted[k]`` who left it already; the top
    rung (the last of ``rungs``) promotes nobody."""
    for k in range(len(rungs) - 2, -1, -1):
        results = rungs[k]
        top = ranked(results, mode)[: len(results) // eta]
        for trial in top:
            if trial not in promoted[k] and promotable(results[trial]):
                return k, trial
    return None
