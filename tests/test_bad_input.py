"""The bad-input matrix: wrong invocations fail with one clear message, the right exit code, no traceback.

Every row runs in a fresh process against a dump folder that already holds a file, and checks that
no file there was added, removed or changed. Config errors exit 2 (flame.train, or train.sh before
it launches anything); runtime failures exit 1. Rows for a resumed dump folder of another model shape
and for a disk that fills up during a checkpoint save are separate tests below the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import SEQ_LEN
from tests.helpers import PYTHON, ROOT, read_metrics, run, train


@dataclass(frozen=True)
class Case:
    """One wrong invocation: flag overrides (None removes a flag), extra argv, an optional TOML file."""

    id: str
    needles: tuple[str, ...]
    overrides: dict = field(default_factory=dict)
    argv: tuple[str, ...] = ()
    toml: str | None = None
    launcher: str = "flame.train"  # or "train.sh", or "dry-run" (train.sh --job.dry_run, NGPU=2)
    code: int = 2
    first_pass: bool = False  # caught by the command's check before torch is imported (check_static)
    ngpu: str = "2"  # NGPU for train.sh


CASES = [
    Case("unknown-flag", ("unknown flag --training.stesp", "Did you mean '--training.steps'"), argv=("--training.stesp", "3")),
    Case("unknown-flag-train.sh", ("unknown flag --training.nope",), argv=("--training.nope", "1"), launcher="train.sh"),
    # refused by the workers (it needs the world size): train.sh still exits 2 with their one message
    Case("compiled-autograd-2-ranks", ("enable_compiled_autograd runs on one process only (NGPU=1), not 2",), {"experimental.enable_compiled_autograd": "true"}, launcher="train.sh"),
    Case("toml-section", ("unknown section [trainng]", "Did you mean 'training'"), toml="[trainng]\nsteps = 3\n"),
    Case("toml-key", ("unknown key 'stpes' in [training]", "Did you mean 'steps'"), toml="[training]\nstpes = 3\n"),
    Case("toml-type", ("[optimizer] lr: expected number, got 'fast'",), toml='[optimizer]\nlr = "fast"\n'),
    Case("toml-malformed", ("malformed TOML",), toml="[training\nsteps = 3\n"),
    Case("toml-missing", ("--job.config_file: '/nonexistent.toml' does not exist",), argv=("--job.config_file", "/nonexistent.toml")),
    Case("cli-type", ("--training.steps: expected integer, got 'ten'",), {"training.steps": "ten"}),
    Case("bool-type", ("--training.skip_nan_inf: expected boolean, got 'maybe'",), {"training.skip_nan_inf": "maybe"}),
    Case("choice", ("'exp' is not allowed; choose one of: linear, sqrt, cosine",), {"lr_scheduler.decay_type": "exp"}),
    Case("steps-zero", ("--training.steps must be a positive integer, got 0",), {"training.steps": "0"}, first_pass=True),
    Case("lr-negative", ("--optimizer.lr must be positive, got -0.001",), argv=("--optimizer.lr=-0.001",), first_pass=True),
    Case("batch-zero", ("--training.batch_size must be a positive integer, got 0",), {"training.batch_size": "0"}, first_pass=True),
    Case("probs-length", ("--training.data_probs has 2 entries but --training.dataset has 1",), {"training.data_probs": "0.5,0.5"}, first_pass=True),
    Case("probs-negative", ("--training.data_probs must all be positive", "-1.0"), argv=("--training.data_probs=-1",), first_pass=True),
    Case("no-dataset", ("--training.dataset is required",), {"training.dataset": None}, first_pass=True),
    Case("data-files-missing", ("--training.data_files '/nonexistent/*.jsonl'", "matches no files"), {"training.data_files": "/nonexistent/*.jsonl"}, first_pass=True),
    Case("tokenizer-missing", ("--model.tokenizer_path: '/nonexistent/tok' does not exist",), {"model.tokenizer_path": "/nonexistent/tok"}, first_pass=True),
    Case("model-config-missing", ("--model.config: '/nonexistent/model.json' does not exist",), {"model.config": "/nonexistent/model.json"}, first_pass=True),
    Case("degrees", ("parallel degrees multiply to 3", "the world size is 1"), {"training.data_parallel_shard_degree": "3"}, first_pass=True),
    # a dry run for 3 ranks: on 1 rank the first pass stops at the degrees' product before the model is read
    Case("tp-heads", ("num_attention_heads (4) is not divisible",), {"training.tensor_parallel_degree": "3", "training.seq_len": "33"}, launcher="dry-run", ngpu="3"),
    Case("tp-seq-len", ("--training.seq_len 33 is not divisible by --training.tensor_parallel_degree 2",), {"training.tensor_parallel_degree": "2", "training.seq_len": "33"}, launcher="dry-run"),
    Case("cp-seq-len", ("--training.seq_len 34 is not divisible by 2 x --experimental.context_parallel_degree = 4",), {"experimental.context_parallel_degree": "2", "training.seq_len": "34"}, launcher="dry-run"),
    Case("cp-alltoall-cpu", ("--experimental.context_parallel_rotate_method alltoall is torch's ring attention", "use allgather"), {"experimental.context_parallel_degree": "2", "experimental.context_parallel_rotate_method": "alltoall"}, launcher="train.sh"),
    Case("pp-split-point", ("--experimental.pipeline_parallel_split_points ['model.layers.99']", "layers.0 .. layers.3"), {"experimental.pipeline_parallel_degree": "2", "experimental.pipeline_parallel_split_points": "model.layers.99"}, launcher="dry-run"),
    Case("gpu-float8", ("--float8.enable_float8_linear=True: float8 training needs a CUDA GPU",), {"float8.enable_float8_linear": "true"}),
    Case("gpu-memory-snapshot", ("CUDA memory snapshots needs a CUDA GPU",), {"profiling.enable_memory_snapshot": "true"}),
    Case("bad-steps-without-skip", ("--training.max_consecutive_bad_steps only applies with --training.skip_nan_inf",), {"training.max_consecutive_bad_steps": "3"}, first_pass=True),
    Case("bad-steps-negative", ("--training.max_consecutive_bad_steps must be >= 0", "got -1"), {"training.skip_nan_inf": "true"}, argv=("--training.max_consecutive_bad_steps=-1",), first_pass=True),
    Case("timeout-zero", ("--comm.init_timeout_seconds must be a positive integer, got 0",), {"comm.init_timeout_seconds": "0"}, first_pass=True),
]  # fmt: skip


@pytest.fixture(scope="module")
def flags(byte_tokenizer, fixed_docs, tiny_llama):
    """``flags(dump, overrides)``: a small, complete single-process run; None in overrides drops a flag."""

    def make(dump: Path, overrides: dict | None = None) -> list[str]:
        values: dict[str, str | None] = {
            "job.dump_folder": str(dump),
            "model.config": tiny_llama,
            "model.tokenizer_path": byte_tokenizer,
            "training.dataset": "json",
            "training.data_files": fixed_docs,
            "training.seq_len": str(SEQ_LEN),
            "training.batch_size": "4",
            "training.steps": "6",
            "training.mixed_precision_param": "float32",
            "lr_scheduler.warmup_steps": "2",
            "optimizer.lr": "3e-3",
            "metrics.log_freq": "1",
        }
        values.update(overrides or {})
        return [item for key, value in values.items() if value is not None for item in (f"--{key}", value)]

    return make


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` and the hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def assert_one_clean_message(proc, code: int, needles) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output
    assert proc.stderr.count("flame: error:") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert "Traceback" not in output


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_invocation_fails_clearly_and_changes_nothing(case, flags, tmp_path):
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(dump)
    argv = [*flags(dump, case.overrides), *case.argv]
    if case.toml is not None:
        (tmp_path / "bad.toml").write_text(case.toml)
        argv += ["--job.config_file", str(tmp_path / "bad.toml")]
    if case.launcher == "flame.train":
        proc = train(argv, check=False)
    else:
        dry = ["--job.dry_run"] if case.launcher == "dry-run" else []
        proc = run(["bash", str(ROOT / "train.sh"), *argv, *dry], check=False, NGPU=case.ngpu)
    assert_one_clean_message(proc, case.code, case.needles)
    after = snapshot(dump)
    if case.launcher == "train.sh":  # torchrun's per-rank log files of this attempt are added, nothing else
        after = {name: digest for name, digest in after.items() if not name.startswith("logs/")}
    assert after == before


def test_value_mistakes_fail_before_torch_is_imported(flags, tmp_path):
    """The first-pass rows, run by ``flame.cli.main`` in one fresh process: each returns 2 and torch is
    never imported (a value mistake costs a fraction of a second, not the seconds of torch and the model)."""
    cases = [c for c in CASES if c.first_pass]
    argvs = [[*flags(tmp_path / c.id, c.overrides), *c.argv] for c in cases]
    script = (
        "import json, sys\nfrom flame.cli import main\n"
        f"codes = [main(argv) for argv in {argvs!r}]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))"
    )
    proc = run([PYTHON, "-c", script])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(cases), "torch": False}, proc.stderr
    assert proc.stderr.count("flame: error:") == len(cases)


@pytest.fixture(scope="module")
def finished_run(flags, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints step-2, step-4 and step-6 (the uninterrupted reference)."""
    dump = tmp_path_factory.mktemp("finished") / "run"
    train(flags(dump, {"checkpoint.enable_checkpoint": "true", "checkpoint.interval": "2"}))
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-2", "step-4", "step-6"]
    return dump


def test_resuming_a_checkpoint_of_another_model_shape_is_a_config_error(finished_run, flags, tiny_llama, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(finished_run, dump)
    before = snapshot(dump)
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**json.loads(Path(tiny_llama).read_text()), "hidden_size": 96}))
    proc = train(flags(dump, {"model.config": str(wider), "checkpoint.enable_checkpoint": "true"}), check=False)
    assert_one_clean_message(proc, 2, ("step-6", "has shape", "--model.config"))
    assert snapshot(dump) == before


def test_full_disk_during_a_save_keeps_the_previous_checkpoint_resumable(finished_run, flags, tmp_path):
    """The disk fills up while step-4 is written: exit 1 with one message, step-2 untouched, the
    partial step-4 removed; once there is space the same command resumes from step-2 and ends with
    exactly the uninterrupted run's losses."""
    dump = tmp_path / "run"
    shutil.copytree(finished_run, dump)
    for step in ("step-4", "step-6"):  # as if the job had died during step 3
        shutil.rmtree(dump / "checkpoint" / step)
    step_2 = snapshot(dump / "checkpoint" / "step-2")
    args = flags(dump, {"checkpoint.enable_checkpoint": "true", "checkpoint.interval": "2"})
    proc = run([PYTHON, "-m", "tests.launch.full_disk", *args], check=False, FLAME_TEST_FULL_DISK_STEP="4")
    assert_one_clean_message(
        proc, 1, ("checkpoint step-4 could not be written", "No space left on device", "step-2", "is intact")
    )
    assert "resumed at step 2" in proc.stdout
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-2"]
    assert snapshot(dump / "checkpoint" / "step-2") == step_2
    assert not os.path.exists(dump / "preempted.json")

    resumed = train(args)
    assert "resumed at step 2" in resumed.stdout
    records, reference = read_metrics(dump), read_metrics(finished_run)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
