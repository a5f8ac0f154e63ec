"""flame: pretrain Hugging Face causal language models with torchtitan components.

Public API: ``JobConfig`` (the config schema), ``parse_args`` (CLI + TOML), ``Trainer`` and
``train(config)``. Heavy modules are imported on first use, so ``import flame`` stays fast.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flame.config.errors import ConfigError
from flame.config.loader import load_toml, parse_args
from flame.config.schema import JobConfig

# torchao (imported by transformers' quantizer registry whenever it is installed) warns about its optional
# CUDA extensions, and torch about torchao's enum registration: noise on every start, not about the run.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

if TYPE_CHECKING:
    from flame.trainer import Trainer

__all__ = ["ConfigError", "JobConfig", "Trainer", "load_toml", "parse_args", "train"]


def train(config: JobConfig) -> dict[str, Any]:
    """Train with ``config`` in this process: one rank here, or one rank of a torchrun job."""
    from flame.trainer import train as _train

    return _train(config)


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from flame.trainer import Trainer

        return Trainer
    raise AttributeError(name)
