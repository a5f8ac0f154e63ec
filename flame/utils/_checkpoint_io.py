"""Shared pieces of the checkpoint conversion CLIs: DCP folders, dtypes, and error reporting."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator

import torch

from flame.config.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STEP_DIR = re.compile(r"step-(\d+)")


def available_steps(checkpoint_root: str) -> list[int]:
    """Steps under ``checkpoint_root`` whose DCP folder is complete (``.metadata`` is written last)."""
    if not os.path.isdir(checkpoint_root):
        return []
    steps = []
    for name in os.listdir(checkpoint_root):
        match = _STEP_DIR.fullmatch(name)
        if match and os.path.isfile(os.path.join(checkpoint_root, name, ".metadata")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def step_folder(dump_folder: str, step: int) -> tuple[str, int]:
    """``<dump_folder>/checkpoint/step-<step>`` and its step; ``step=-1`` picks the latest complete step."""
    if not os.path.isdir(dump_folder):
        raise ConfigError(f"--path: dump folder {dump_folder!r} does not exist.")
    root = os.path.join(dump_folder, "checkpoint")
    steps = available_steps(root)
    if not steps:
        raise ConfigError(f"--step {step}: there is no complete checkpoint (step-<N>/.metadata) in {root}.")
    if step == -1:
        step = steps[-1]
    if step not in steps:
        folder = os.path.join(root, f"step-{step}")
        available = ", ".join(map(str, steps))
        raise ConfigError(f"--step {step}: {folder} is not a complete checkpoint (available steps: {available}).")
    return os.path.join(root, f"step-{step}"), step


def tensor_metadata(checkpoint: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every tensor stored in a DCP folder, read from its metadata only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(checkpoint).read_metadata()
    return {
        key: (item.size, item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def loading_error(flag: str, value: str, loader: str, error: Exception) -> ConfigError:
    """A ``ConfigError`` for a folder/name that a Hugging Face ``from_pretrained`` could not load."""
    if (os.path.isabs(value) or value.startswith((".", "~"))) and not os.path.exists(os.path.expanduser(value)):
        return ConfigError(f"{flag} {value!r} does not exist.")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"{flag} {value!r} cannot be loaded by {loader}: {first}")


def is_nonempty_dir(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """Silence DCP's warnings about running without a process group (intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run ``main``; bad input (``ConfigError``) becomes one message on stderr and exit code 2."""
    try:
        main(argv)
    except ConfigError as e:
        print(f"error: {e.format()}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def flag_names(renames: dict[str, str]) -> Iterator[None]:
    """Re-word ``ConfigError``s raised by training helpers with this CLI's flag names (``--model.config`` ...)."""
    try:
        yield
    except ConfigError as e:
        problems = []
        for problem in e.problems:
            for old, new in renames.items():
                problem = problem.replace(old, new)
            problems.append(problem)
        raise ConfigError(problems) from e
