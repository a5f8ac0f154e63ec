"""Fixtures for experiment tests: a valid base training TOML (the session's tiny model and data) and specs.

Most tests run stages of kind ``fake`` (tests/experiments/fake_kind.py): train semantics with a fake
trainer, so the experiment's rules are tested in seconds; the slow tier runs the real train.sh.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import SEQ_LEN
from tests.helpers import ROOT

FAKE = "tests.experiments.fake_kind"


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch):
    monkeypatch.setenv("FLAME_STAGE_KINDS", FAKE)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    import tests.experiments.fake_kind  # noqa: F401  (registers kind "fake" in this process too)


FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(cat "{log}" 2>/dev/null | wc -l) + 100 ))
echo "$@" >> "{log}"
echo "$n"
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """``fake_sbatch(max_array)``: an ``sbatch`` on PATH that logs its arguments and answers job ids 100,
    101, ...; the cluster's MaxArraySize set to ``max_array``; an ``squeue`` that prints the file
    ``tmp_path/queue`` (the state of whatever job is asked about; empty: no such job; UNREACHABLE: squeue's
    error for a controller it cannot contact) and logs its calls to ``tmp_path/squeue.log``. Returns the
    log file of sbatch."""

    def install(max_array: int) -> Path:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        log = tmp_path / "sbatch.log"
        (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(log=log))
        (tmp_path / "queue").write_text("PENDING\n")
        queue, calls = tmp_path / "queue", tmp_path / "squeue.log"
        (bin_dir / "squeue").write_text(
            f'#!/usr/bin/env bash\necho "$@" >> "{calls}"\n'
            f'if grep -q UNREACHABLE "{queue}"; then echo "squeue: error: Unable to contact slurm controller" >&2; exit 1; fi\n'
            f'cat "{queue}"\n'
        )
        for tool in ("sbatch", "squeue"):
            (bin_dir / tool).chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        from flame.experiments import slurm

        monkeypatch.setattr(slurm, "max_array_size", lambda: max_array)
        monkeypatch.setattr("flame.experiments.records._slurm_unreachable_until", 0.0)
        return log

    return install


@pytest.fixture(scope="session")
def base_toml(byte_tokenizer, fixed_docs, tiny_llama, tmp_path_factory) -> str:
    """A complete, valid training TOML: the tiny Llama, byte tokenizer and fixed docs; checkpoints and
    validation on, a few steps."""
    path = tmp_path_factory.mktemp("base") / "base.toml"
    path.write_text(
        f"""[job]
dump_folder = "unused"
[model]
config = "{tiny_llama}"
tokenizer_path = "{byte_tokenizer}"
[optimizer]
lr = 3e-3
[lr_scheduler]
warmup_steps = 2
[training]
batch_size = 4
seq_len = {SEQ_LEN}
steps = 4
dataset = "json"
data_files = "{fixed_docs}"
mixed_precision_param = "float32"
[metrics]
log_freq = 1
[checkpoint]
enable_checkpoint = true
interval = 2
[validation]
enable = true
dataset = "json"
data_files = "{fixed_docs}"
dataset_split = "train"
freq = 2
steps = 2
batch_size = 4
"""
    )
    return str(path)


@pytest.fixture
def write_spec(tmp_path, base_toml):
    """``write_spec(text, name="exp.toml")``: a spec file; ``{base}`` and ``{root}`` are filled in."""

    def make(text: str, name: str = "exp.toml") -> Path:
        path = tmp_path / name
        path.write_text(text.replace("{base}", base_toml).replace("{root}", str(tmp_path / "exp")))
        return path

    return make


def tree(folder: str | Path) -> dict[str, tuple[int, float]]:
    """Every file under ``folder`` with its size and mtime (to show nothing was touched)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out
