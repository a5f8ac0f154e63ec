"""Fixtures for launch tests: flags of a small 2-rank run, its uninterrupted reference, a Slurm cluster.

Every launch test trains the same job (``STEPS`` steps, 2 ranks x ``BATCH_PER_RANK`` sequences) in
some way (two "nodes", a restart, a preemption and requeue) and compares its losses with one
uninterrupted ``NGPU=2 bash train.sh`` run: on the same layout they must be identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SEQ_LEN
from tests.helpers import ROOT, read_metrics, run

STEPS = 24
BATCH_PER_RANK = 2
LOCAL_SLURM = Path(os.environ.get("LOCAL_SLURM_SCRIPT", "/work/shared/slurm/local_slurm.sh"))


@pytest.fixture(scope="session")
def launch_flags(byte_tokenizer, fixed_docs, tiny_llama):
    """``launch_flags(dump, **overrides)``: flags of the launch tests' job, writing to ``dump``."""

    def make(dump: str | Path, **overrides) -> list[str]:
        flags = {
            "job.dump_folder": str(dump),
            "model.config": tiny_llama,
            "model.tokenizer_path": byte_tokenizer,
            "training.dataset": "json",
            "training.data_files": fixed_docs,
            "training.seq_len": str(SEQ_LEN),
            "training.batch_size": str(BATCH_PER_RANK),
            "training.steps": str(STEPS),
            "training.mixed_precision_param": "float32",
            "lr_scheduler.warmup_steps": "2",
            "optimizer.lr": "3e-3",
            "metrics.log_freq": "1",
        }
        flags.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
        return [item for key, value in flags.items() for item in (f"--{key}", value)]

    return make


def train_sh(args: list[str]) -> list[str]:
    """The command line of ``bash train.sh args`` (environment variables go to ``run``/``Popen``)."""
    return ["bash", str(ROOT / "train.sh"), *args]


@pytest.fixture(scope="session")
def reference(launch_flags, tmp_path_factory) -> list[dict]:
    """Metrics of the uninterrupted job: ``NGPU=2 bash train.sh`` on one node."""
    dump = tmp_path_factory.mktemp("reference") / "run"
    run(train_sh(launch_flags(dump)), NGPU="2")
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return records


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def _slurm_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm cluster: the one already up, or the local test cluster started (and stopped) here."""
    if _slurm_up():
        yield
        return
    if os.geteuid() != 0 or not LOCAL_SLURM.is_file():
        pytest.skip(
            f"no Slurm cluster: `scontrol ping` fails, and starting the local one ({LOCAL_SLURM}) needs root "
            "and that script (CI runs as root)"
        )
    subprocess.run(["bash", str(LOCAL_SLURM), "start"], check=True, capture_output=True, timeout=300)
    try:
        yield
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=300)
