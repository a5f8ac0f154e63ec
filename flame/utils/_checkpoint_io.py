"""Shared pieces of checkpoint reading: DCP step folders, key/shape matching, dtypes, CLI error reporting.

Used by the conversion CLIs and by the trainer's checkpointer, so that "which steps are complete", "does
this checkpoint fit this model" and the messages saying why not are decided in one place.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flame.config.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STEP_DIR = re.compile(r"step-(\d+)")


def _step_folders(checkpoint_root: str) -> dict[int, bool]:
    """Every ``step-N`` folder under ``checkpoint_root``: step -> whether it is complete."""
    if not os.path.isdir(checkpoint_root):
        return {}
    found = {}
    for name in os.listdir(checkpoint_root):
        match = _STEP_DIR.fullmatch(name)
        if match and os.path.isdir(os.path.join(checkpoint_root, name)):
            found[int(match.group(1))] = os.path.isfile(os.path.join(checkpoint_root, name, ".metadata"))
    return found


def available_steps(checkpoint_root: str) -> list[int]:
    """Steps under ``checkpoint_root`` whose DCP folder is complete.

    DCP writes every rank's data files first and the ``.metadata`` file last (to a temporary name,
    then renamed), so a folder without ``.metadata`` is a save that was interrupted.
    """
    return sorted(step for step, complete in _step_folders(checkpoint_root).items() if complete)


def incomplete_steps(checkpoint_root: str) -> list[int]:
    """Steps whose folder exists but holds no ``.metadata``: saves that were interrupted (or are in flight)."""
    return sorted(step for step, complete in _step_folders(checkpoint_root).items() if not complete)


def is_model_only(checkpoint: str) -> bool:
    """Whether a complete DCP folder holds model weights only (a seed/converted step-0 or a final export).

    A resumable checkpoint also holds ``train_state`` (the step, counters and RNG states).
    """
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    return not any(key == "train_state" or key.startswith("train_state.") for key in keys)


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


def match_keys(
    model: Any, stored: dict[str, tuple[torch.Size, torch.dtype]], source: str, fix: str, allow_extra: bool = False
) -> dict[str, str]:
    """Map each of ``model``'s state-dict keys to its key in a checkpoint, checking that shapes agree.

    ``stored`` is the checkpoint's key -> (shape, dtype) (``tensor_metadata``). Tied tensors (e.g.
    ``lm_head.weight`` and the embedding) need only one of their keys stored; stored keys may carry
    activation-checkpoint/compile wrapper prefixes. Shapes of sharded (DTensor) parameters are their
    global shapes. Raises ``ConfigError`` naming the first differing key (and both shapes), missing
    or extra weights; ``fix`` is the sentence that tells the user what to do. ``allow_extra``: ``model`` is
    one pipeline stage, so the checkpoint's weights of other stages are expected.
    """
    from flame.models.build import canonical_name

    by_name = {canonical_name(key): key for key in stored}
    # keep_vars: tied entries are the same Parameter object, which is how ties are recognised.
    expected = {canonical_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    found: dict[str, str] = {}
    for key, tensor in expected.items():
        if key in by_name:
            shape = tuple(stored[by_name[key]][0])
            if shape != tuple(tensor.shape):
                raise ConfigError(
                    f"{source}: {key} has shape {list(shape)} there but {list(tensor.shape)} in the model; {fix}"
                )
            found[key] = by_name[key]
    if not found:
        sample = ", ".join(sorted(stored)[:5])
        raise ConfigError(f"{source} holds none of the model's weights (it holds: {sample}); {fix}")
    loaded_ids = {id(expected[key]) for key in found}
    missing = [key for key, tensor in expected.items() if key not in found and id(tensor) not in loaded_ids]
    roots = tuple(f"{name}." for name, _ in model.named_children())
    extra = [] if allow_extra else sorted(n for n in by_name if n.startswith(roots) and n not in expected)
    if missing or extra:
        problem = (
            f"lacks {missing[:3]} ({len(missing)} missing)" if missing else f"has {extra[:3]} ({len(extra)} extra)"
        )
        raise ConfigError(f"{source} {problem} compared with the model; {fix}")
    return found


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
