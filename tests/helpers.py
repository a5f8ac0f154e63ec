"""Shared helpers for tests that launch real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def env(**extra: str) -> dict[str, str]:
    """The environment for child processes: offline, the repo on the path, one thread per process."""
    e = dict(os.environ)
    e.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS=e.get("OMP_NUM_THREADS", "1"),
        PYTHON=PYTHON,
        NO_COLOR="1",
    )
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *, check: bool = True, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected failure, show its whole output."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    return _checked(proc, check)


def _checked(proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def train(args: list[str], *, check: bool = True, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m flame.train args`` in a fresh process (forked from one with the imports done, see
    ``tests.forked``)."""
    from tests.forked import launch

    return _checked(launch("flame.train", args, env(**extra_env), cwd=ROOT, timeout=timeout), check)


def torchrun(
    nproc: int,
    args: list[str],
    *,
    module: str = "flame.train",
    launcher: str = "forked",
    check: bool = True,
    timeout: int = 600,
    **extra_env: str,
) -> subprocess.CompletedProcess:
    """``python -m module args`` on ``nproc`` gloo ranks with torchrun's worker environment, on a free
    port. ``launcher="forked"``: the ranks are forked from a process with the imports done
    (``tests.forked``); ``"torchrun"``: the real ``torchrun`` (where its agent is under test)."""
    if launcher == "forked":
        from tests.forked import launch

        proc = launch(module, args, env(**extra_env), nproc=nproc, port=free_port(), cwd=ROOT, timeout=timeout)
        return _checked(proc, check)
    cmd = [
        PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", module, *args,
    ]  # fmt: skip
    return run(cmd, check=check, timeout=timeout, **extra_env)


def valid_config(folder: Path, model: str = "llama_demo.json"):
    """A JobConfig that passes ``validate``: ``configs/<model>``, ``folder`` as the tokenizer path (it
    exists; nothing loads it) and a one-line JSON-lines file in ``folder`` as the data."""
    from flame.config.schema import JobConfig

    config = JobConfig()
    config.model.config = str(ROOT / "configs" / model)
    config.model.tokenizer_path = str(folder)
    (Path(folder) / "train.jsonl").write_text('{"text": "a"}\n')
    config.training.dataset = ["json"]
    config.training.data_files = [str(Path(folder) / "train.jsonl")]
    return config


def read_metrics(dump_folder: str | Path) -> list[dict]:
    with open(Path(dump_folder) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def slow(*values):
    """One parametrization case in the slow tier: ``pytest.param(*values, marks=pytest.mark.slow)``."""
    import pytest

    return pytest.param(*values, marks=pytest.mark.slow)
