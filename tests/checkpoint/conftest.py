"""Helpers for checkpoint tests: flags for small runs in any folder, and training in this process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from tests.conftest import SEQ_LEN
from tests.helpers import read_metrics


@pytest.fixture(scope="session")
def run_flags(byte_tokenizer, fixed_docs, tiny_llama):
    """``run_flags(dump, **overrides)``: the flags of a small, fully specified run writing to ``dump``."""

    def make(dump: str | Path, **overrides) -> list[str]:
        flags = {
            "job.dump_folder": str(dump),
            "model.config": tiny_llama,
            "model.tokenizer_path": byte_tokenizer,
            "training.dataset": "json",
            "training.data_files": fixed_docs,
            "training.seq_len": str(SEQ_LEN),
            "training.batch_size": "4",
            "training.steps": "10",
            "training.mixed_precision_param": "float32",
            "lr_scheduler.warmup_steps": "2",
            "optimizer.lr": "3e-3",
            "metrics.log_freq": "1",
        }
        flags.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
        return [item for key, value in flags.items() for item in (f"--{key}", value)]

    return make


def train_here(args: list[str]) -> list[dict]:
    """Train in this process (a one-rank group flame sets up and tears down); the run's metrics."""
    import flame
    from flame.config.loader import parse_args

    config = parse_args(args)
    flame.train(config)
    assert not dist.is_initialized()
    return read_metrics(config.job.dump_folder)


def build_trainer(args: list[str]):
    """A Trainer in this process; a failed construction leaves no process group behind."""
    from flame.config.loader import parse_args
    from flame.trainer import Trainer

    try:
        return Trainer(parse_args(args))
    except BaseException:
        # Trainer.__init__ created the group before failing; a later in-process run must not inherit it.
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


def steps_on_disk(folder: str | Path) -> dict[str, bool]:
    """``step-N`` folder name -> complete (has .metadata)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: (p / ".metadata").is_file() for p in folder.iterdir() if p.name.startswith("step-")}


def same_records(a: list[dict], b: list[dict]) -> None:
    """Bitwise-equal loss, gradient norm and lr at every common step (CPU, fp32, same layout)."""
    by_step = {r["step"]: r for r in a}
    assert b, "no records"
    for record in b:
        ref = by_step[record["step"]]
        assert (record["loss"], record["grad_norm"], record["lr"]) == (ref["loss"], ref["grad_norm"], ref["lr"]), (
            record,
            ref,
        )


@pytest.fixture(scope="session")
def llama_json(tiny_llama):
    """``llama_json(path, **overrides)``: the session's tiny Llama config (tests/conftest.py), changed."""
    import json

    def make(path: Path, **overrides) -> str:
        config = {**json.loads(Path(tiny_llama).read_text()), **overrides}
        Path(path).write_text(json.dumps(config))
        return str(path)

    return make


def cli_main(args: list[str]) -> int:
    """``python -m flame.train``'s ``main(args)`` (``flame.cli.main``) in this process; its exit code.

    A group left by a failed start is torn down (main() is meant to end the process).
    """
    from flame.cli import main

    try:
        return main(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
