"""flame: pretrain Hugging Face causal language models with torchtitan components.

Public API: ``JobConfig`` (the config schema), ``parse_args`` (CLI + TOML), ``Trainer``,
``train(config_or_path, **sections)`` returning a ``TrainResult``, and ``experiment`` (``run``, ``plan``,
``status`` of experiment specs). Heavy modules are imported on first
use, so ``import flame`` stays fast.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from flame.config.errors import ConfigError
from flame.config.loader import load_toml, parse_args
from flame.config.schema import JobConfig

# torchao (imported by transformers' quantizer registry whenever it is installed) warns about its optional
# CUDA extensions, and torch about torchao's enum registration: noise on every start, not about the run.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

if TYPE_CHECKING:
    from flame.trainer import Trainer, TrainResult

__all__ = ["ConfigError", "JobConfig", "TrainResult", "Trainer", "experiment", "load_toml", "parse_args", "train"]


def train(config: JobConfig | str | os.PathLike, **sections: dict[str, Any]) -> TrainResult:
    """Train in this process: one rank here (a notebook, a script), or one rank of a torchrun job.

    ``config`` is a ``JobConfig`` or the path of a training TOML; each keyword names a section whose
    keys override it, checked like the TOML's (``flame.train("configs/demo.toml", training={"steps":
    20}, optimizer={"lr": 1e-3})``). Returns the last metrics, the summary and the run folder.
    """
    from flame.config.loader import apply_overrides
    from flame.trainer import train as _train

    base = config if isinstance(config, JobConfig) else load_toml(os.fspath(config))
    overrides: dict[str, Any] = {}
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"flame.train: {section}= takes a dict of that section's keys, got {values!r}")
        overrides.update({f"{section}.{key}": value for key, value in values.items()})
    return _train(apply_overrides(base, overrides, where="flame.train()"))


def __getattr__(name: str) -> Any:
    if name == "experiment":  # flame.experiment.run(spec): imported on first use
        import importlib

        return importlib.import_module("flame.experiment")
    if name in ("Trainer", "TrainResult"):
        import flame.trainer

        return getattr(flame.trainer, name)
    raise AttributeError(name)
