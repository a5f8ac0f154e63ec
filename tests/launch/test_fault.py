"""The trainer's fault handling in one process: a stop signal, the divergence stop, error messages."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess

import pytest
import torch

import flame
from flame.components.checkpoint import os_error_in
from flame.components.errors import RunError
from flame.components.fault import TrainingDiverged, explain_runtime_error, received_signal
from flame.config.loader import parse_args
from tests.helpers import ROOT, env, read_metrics, train
from tests.launch.conftest import STEPS
from tests.launch.procs import wait_for


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def poisoned_trainer(args: list[str], from_step: int):
    """A Trainer whose gradients are NaN from ``from_step`` on; ``good`` gets the weights before that step."""
    trainer = flame.Trainer(parse_args(args))
    good: dict[str, torch.Tensor] = {}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        if trainer.state.step < from_step:
            return grad
        if not good:  # the weights after the last good step
            good.update({n: full(p.detach()).clone() for n, p in trainer.model.named_parameters()})
        return grad * math.nan

    trainer.model.get_input_embeddings().weight.register_hook(poison)
    return trainer, good


def test_consecutive_bad_steps_stop_the_run_with_a_checkpoint_of_the_last_good_state(launch_flags, tmp_path):
    dump = tmp_path / "run"
    args = launch_flags(
        dump, training__steps=8, training__batch_size=4, training__skip_nan_inf="true",
        training__max_consecutive_bad_steps=2, checkpoint__enable_checkpoint="true", checkpoint__interval=100,
    )  # fmt: skip
    trainer, good = poisoned_trainer(args, from_step=3)
    try:
        with pytest.raises(TrainingDiverged) as failure:
            trainer.train()
    finally:
        trainer.close()
    message = str(failure.value)
    assert "steps 3-4" in message and "--training.max_consecutive_bad_steps 2" in message
    assert "after step 2" in message and str(dump / "checkpoint" / "step-4") in message
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2]
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-4"]
    saved = checkpoint_tensors(dump / "checkpoint" / "step-4")
    assert saved["train_state"]["step"] == 4
    assert set(good) <= set(saved)
    for name, weight in good.items():  # exactly the weights after step 2: both bad steps were skipped
        assert torch.equal(saved[name], weight), name
    assert not (dump / "summary.json").exists()


def test_zero_never_stops_on_bad_steps(launch_flags, tmp_path):
    args = launch_flags(
        tmp_path / "run", training__steps=6, training__batch_size=4, training__skip_nan_inf="true",
        training__max_consecutive_bad_steps=0,
    )  # fmt: skip
    trainer, _ = poisoned_trainer(args, from_step=2)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4, 5]


def test_diverging_run_exits_1_with_one_message(launch_flags, tmp_path):
    """A real divergence from the command line: lr 1e30 makes every gradient after step 1 NaN."""
    dump = tmp_path / "run"
    args = launch_flags(
        dump, training__steps=8, training__batch_size=4, training__skip_nan_inf="true",
        training__max_consecutive_bad_steps=2, optimizer__lr=1e30, lr_scheduler__warmup_steps=0,
        checkpoint__enable_checkpoint="true", checkpoint__interval=100,
    )  # fmt: skip
    proc = train(args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("flame: error:") == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "training diverged: steps 2-3" in proc.stderr
    assert (dump / "checkpoint" / "step-3" / ".metadata").exists()
    assert [r["skipped_steps"] for r in read_metrics(dump)] == [0, 1, 2]


def test_sigterm_stops_after_the_step_saves_and_leaves_the_marker(launch_flags, tmp_path):
    dump = tmp_path / "run"
    args = launch_flags(dump, training__batch_size=4, checkpoint__enable_checkpoint="true", checkpoint__interval=100)
    previous = signal.getsignal(signal.SIGTERM)
    trainer = flame.Trainer(parse_args(args))

    def signal_during_step_2(grad: torch.Tensor) -> torch.Tensor:
        if trainer.state.step == 2 and received_signal() is None:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
        return grad

    trainer.model.get_input_embeddings().weight.register_hook(signal_during_step_2)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers given back
    assert received_signal() is None
    assert [r["step"] for r in read_metrics(dump)] == [1, 2]
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-2"]
    marker = json.loads((dump / "preempted.json").read_text())
    assert marker == {"step": 2, "signal": "SIGTERM", "checkpoint": str(dump / "checkpoint" / "step-2")}
    # The next session removes the marker once it trains (a fresh start would not leave a stale one).
    trainer = flame.Trainer(parse_args(args))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert not (dump / "preempted.json").exists()
    assert read_metrics(dump)[-1]["step"] == STEPS


def test_stop_signal_without_checkpointing_is_an_error(launch_flags, tmp_path):
    trainer = flame.Trainer(parse_args(launch_flags(tmp_path / "run", training__batch_size=4)))
    trainer.model.get_input_embeddings().weight.register_hook(lambda grad: os.kill(os.getpid(), signal.SIGUSR1) or grad)
    try:
        with pytest.raises(RunError, match="stopped by SIGUSR1 after step 1; checkpointing is off"):
            trainer.train()
    finally:
        trainer.close()
    assert not (tmp_path / "run" / "preempted.json").exists()


def test_runtime_errors_are_explained_in_one_line(launch_flags, tmp_path):
    config = parse_args(launch_flags(tmp_path / "run", comm__train_timeout_seconds=7))
    gloo = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv operation")
    message = explain_runtime_error(gloo, config)
    assert message is not None and message.startswith("a collective operation timed out (Timed out waiting 7000ms")
    assert "--comm.train_timeout_seconds 7" in message
    lost = RuntimeError("[../pair.cc:553] Connection closed by peer [127.0.0.1]:1234.")
    assert "lost the connection to another rank" in (explain_runtime_error(lost, config) or "")
    assert explain_runtime_error(RuntimeError("shape mismatch in matmul"), config) is None
    assert explain_runtime_error(TrainingDiverged("diverged"), config) == "diverged"


def test_os_error_is_found_inside_dcp_failures():
    full_disk = OSError(errno.ENOSPC, "No space left on device")

    class CheckpointException(BaseException):  # DCP's: per-rank (exception, stack) pairs
        def __init__(self, failures):
            self.failures = failures

    wrapped = CheckpointException({1: (full_disk, None)})
    assert os_error_in(wrapped) is full_disk
    try:
        try:
            raise full_disk
        except OSError as e:
            raise ValueError("save failed") from e
    except ValueError as chained:
        assert os_error_in(chained) is full_disk
    assert os_error_in(ValueError("other")) is None


def test_train_sh_forwards_sigterm_to_torchrun(launch_flags, tmp_path):
    """A user's `kill <train.sh>` reaches the workers through the agent: they save and train.sh exits 75."""
    dump = tmp_path / "run"
    args = launch_flags(dump, training__batch_size=4, training__steps=400, checkpoint__enable_checkpoint="true")
    with open(tmp_path / "train.log", "w+") as log:
        launcher = subprocess.Popen(
            ["bash", str(ROOT / "train.sh"), *args], cwd=ROOT, env=env(NGPU="1"), stdout=log, stderr=subprocess.STDOUT
        )
        metrics = dump / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120, "2 steps")
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=120)
        output = log.seek(0) or log.read()
    assert code == 75, output
    step = json.loads((dump / "preempted.json").read_text())["step"]
    assert 2 <= step < 400 and f"stopped by SIGTERM after step {step}" in output
    assert "Traceback" not in output
