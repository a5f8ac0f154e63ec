"""Sampled search: Optuna's samplers through ask-and-tell, each round a pure function of (seed, round, history).

A round builds a fresh in-memory study whose sampler is seeded from (the search seed, the group, the
round), adds every earlier ask with its told value (``create_trial``), and asks the round's points. The
same spec and the same finished metrics therefore give the same asks, whether the driver ran without
stopping or was killed and resumed (the driver also records every ask before launching it, and reuses
the record). Random search is the same with Optuna's RandomSampler and one round of all samples (its
draws do not depend on the history). The study a user can open with Optuna's tools is written by the
driver alone (``write_journal``): trials never touch it.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.spec import Search
from flame.experiments.values import Dist

SAMPLERS = {
    "random": "RandomSampler",
    "tpe": "TPESampler",
    "cmaes": "CmaEsSampler",
    "qmc": "QMCSampler",
    "gp": "GPSampler",
}


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(dists: dict[str, Dist]) -> dict[str, Any]:
    """Optuna distributions of the sampled keys: loguniform -> log float, int -> int, choice -> categorical."""
    optuna = _quiet_optuna()
    d = optuna.distributions
    out: dict[str, Any] = {}
    for key, dist in dists.items():
        if dist.kind == "choice":
            out[key] = d.CategoricalDistribution(list(dist.args))
        elif dist.kind == "int":
            out[key] = d.IntDistribution(int(dist.args[0]), int(dist.args[1]))
        else:
            out[key] = d.FloatDistribution(float(dist.args[0]), float(dist.args[1]), log=dist.kind == "loguniform")
    return out


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed from several parts (the search seed, a group key, a round), stable across runs."""
    text = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def make_sampler(search: Search, seed: int, where: str = "search"):
    """The Optuna sampler of ``search.kind``, seeded, with ``search.options`` as keyword arguments."""
    optuna = _quiet_optuna()
    try:
        cls = getattr(optuna.samplers, SAMPLERS[search.kind])
        return cls(seed=seed, **search.options)
    except TypeError as e:
        raise ConfigError(
            f"{where}: options {search.options} do not fit optuna.samplers.{SAMPLERS[search.kind]}: {e}"
        ) from None
    except ImportError as e:
        raise ConfigError(f"{where}: search kind {search.kind!r} needs a package Optuna imports: {e}") from None


def round_size(search: Search, max_parallel: int, grid_points: int) -> int:
    """Asks per round: all samples at once for random search (history-independent); otherwise about
    ``max_parallel`` trials per round, each ask crossed with the stage's ``grid_points`` grid values."""
    samples = search.samples or 0
    if search.kind == "random":
        return samples
    return max(1, min(samples, max_parallel // max(grid_points, 1)))


def num_rounds(search: Search, max_parallel: int, grid_points: int) -> int:
    return math.ceil((search.samples or 0) / round_size(search, max_parallel, grid_points))


def ask_round(
    search: Search,
    dists: dict[str, Dist],
    group: str,
    round_index: int,
    history: list[tuple[dict[str, Any], float | None]],
    count: int,
    direction: str,
) -> list[dict[str, Any]]:
    """``count`` new points of round ``round_index``: a pure function of its arguments.

    ``history`` lists every earlier ask (params, told value; None for a failed one) in ask order."""
    optuna = _quiet_optuna()
    distr = distributions(dists)
    sampler = make_sampler(search, derived_seed(search.seed, group, round_index))
    study = optuna.create_study(direction="minimize" if direction == "min" else "maximize", sampler=sampler)
    for params, value in history:
        ok = value is not None and math.isfinite(value)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distr,
                value=value if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            )
        )
    asks = []
    for _ in range(count):
        trial = study.ask(distr)
        asks.append(dict(trial.params))
    return asks


def write_journal(
    path: str, dists: dict[str, Dist], history: list[tuple[dict[str, Any], float | None]], direction: str
) -> None:
    """The stage's Optuna study as a JournalFileBackend file, rewritten whole by the driver (one writer)."""
    optuna = _quiet_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    storage = JournalStorage(JournalFileBackend(tmp))
    study = optuna.create_study(
        storage=storage, study_name="search", direction="minimize" if direction == "min" else "maximize"
    )
    distr = distributions(dists)
    for params, value in history:
        ok = value is not None and math.isfinite(value)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distr,
                value=value if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            )
        )
    del study, storage
    os.replace(tmp, path)
