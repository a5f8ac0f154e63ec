"""Checkpoints written by the real trainer: exact resume, retention, intervals, async, exports, bad input.

Every run is the same small fp32 model and data on CPU, so a resumed run must reproduce the
uninterrupted one bit for bit (loss, gradient norm and lr at every step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from flame.config.errors import ConfigError
from flame.config.loader import parse_args
from flame.config.validate import validate
from tests.checkpoint.conftest import build_trainer, cli_main, same_records, steps_on_disk, train_here
from tests.helpers import PYTHON, ROOT, env, read_metrics


@pytest.fixture(scope="module")
def reference(run_flags, tmp_path_factory):
    """An uninterrupted 10-step run with a checkpoint every 2 steps (all kept)."""
    dump = tmp_path_factory.mktemp("reference")
    records = train_here(run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=2))
    assert [r["step"] for r in records] == list(range(1, 11))
    assert steps_on_disk(dump / "checkpoint") == {f"step-{s}": True for s in (2, 4, 6, 8, 10)}
    return {"dump": dump, "records": records}


def reference_config(reference) -> str:
    import tomllib

    return tomllib.loads((reference["dump"] / "config.toml").read_text())["model"]["config"]


def copy_run(reference, tmp_path, keep_steps=None):
    """A copy of the reference dump folder holding only the checkpoints of ``keep_steps``."""
    dump = tmp_path / "run"
    shutil.copytree(reference["dump"], dump)
    for name in os.listdir(dump / "checkpoint"):
        if keep_steps is not None and int(name.split("-")[1]) not in keep_steps:
            shutil.rmtree(dump / "checkpoint" / name)
    return dump


def test_load_step_resumes_that_step_exactly(reference, run_flags, tmp_path, caplog):
    dump = copy_run(reference, tmp_path)  # steps 2..10 all present; load_step picks 4
    records = train_here(run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=2,
                                   checkpoint__load_step=4))  # fmt: skip
    assert [r["step"] for r in records] == list(range(1, 11))  # metrics after step 4 were rewritten
    same_records(reference["records"], records)
    assert "newer checkpoints exist (6, 8, 10)" in caplog.text


def test_load_step_retires_the_newer_checkpoints_of_the_abandoned_run(reference, run_flags, tmp_path):
    """After going back to step 4, a crash must not let the next automatic resume jump to the old step 10."""
    dump = copy_run(reference, tmp_path)
    train_here(run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=2, checkpoint__load_step=4,
                         training__steps=6))  # fmt: skip
    assert steps_on_disk(dump / "checkpoint") == {"step-2": True, "step-4": True, "step-6": True}
    trainer = build_trainer(run_flags(dump, checkpoint__enable_checkpoint="true"))
    try:
        assert trainer.checkpointer.loaded_from == "resumed at step 6"
    finally:
        trainer.close()


def test_load_step_that_is_not_a_complete_checkpoint_is_a_config_error(reference, run_flags, tmp_path):
    dump = copy_run(reference, tmp_path)
    (dump / "checkpoint" / "step-5").mkdir()  # an interrupted save: no .metadata
    before = (dump / "metrics.jsonl").read_text()
    for step in (5, 7):
        with pytest.raises(ConfigError, match=rf"load_step {step}: .*step-{step} is not a complete checkpoint "
                                              r"\(complete steps in .*: 2, 4, 6, 8, 10\)"):  # fmt: skip
            build_trainer(run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__load_step=step))
    assert (dump / "metrics.jsonl").read_text() == before


def test_checkpoint_of_another_model_config_is_a_config_error(reference, run_flags, tmp_path, llama_json):
    dump = copy_run(reference, tmp_path, keep_steps={4})
    before = {p: p.stat().st_mtime_ns for p in dump.rglob("*")}
    wider = llama_json(tmp_path / "wide.json", hidden_size=32)
    args = run_flags(dump, checkpoint__enable_checkpoint="true", model__config=wider)
    with pytest.raises(ConfigError, match=r"step-4: model\.embed_tokens\.weight has shape \[257, 64\] there but "
                                          r"\[257, 32\] in the model; it was written for another model config"):  # fmt: skip
        build_trainer(args)
    layers = json.loads(open(reference_config(reference)).read())["num_hidden_layers"]
    deeper = llama_json(tmp_path / "deep.json", num_hidden_layers=layers + 1)
    with pytest.raises(ConfigError, match=rf"lacks \['model\.layers\.{layers}\."):
        build_trainer(run_flags(dump, checkpoint__enable_checkpoint="true", model__config=deeper))
    assert cli_main(args) == 2  # the CLI: one message, exit code 2
    assert {p: p.stat().st_mtime_ns for p in dump.rglob("*")} == before  # nothing written or touched


@pytest.mark.parametrize(("keep", "async_mode"), [(2, "disabled"), (2, "async"), (1, "disabled")])
def test_keep_latest_k_keeps_exactly_k_with_the_final_step(reference, run_flags, tmp_path, keep, async_mode):
    dump = tmp_path / "run"
    (dump / "checkpoint" / "step-1").mkdir(parents=True)  # leftover of an interrupted save: not counted, removed
    args = run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=3,
                     checkpoint__keep_latest_k=keep, checkpoint__async_mode=async_mode)  # fmt: skip
    records = train_here(args)
    kept = {f"step-{s}": True for s in [3, 6, 9, 10][-keep:]}  # saves at 3, 6, 9 and the last step, 10
    assert steps_on_disk(dump / "checkpoint") == kept
    same_records(reference["records"], records)  # saving (also in the background) never perturbs training
    if keep > 1:  # the kept checkpoints are the real ones: resuming from step 9 reproduces step 10
        shutil.rmtree(dump / "checkpoint" / "step-10")
        resumed = train_here(args)
        same_records(reference["records"], resumed)
        assert steps_on_disk(dump / "checkpoint") == kept


def test_interval_in_seconds_follows_the_clock(run_flags, tmp_path):
    trainer = build_trainer(run_flags(tmp_path / "run", checkpoint__enable_checkpoint="true",
                                      checkpoint__interval_type="seconds", checkpoint__interval=3))  # fmt: skip
    ticks = iter(range(1000))
    trainer.checkpointer.clock = lambda: float(next(ticks))  # one "second" per reading
    trainer.checkpointer._last_save_time = trainer.checkpointer.clock()
    try:
        trainer.train()
    finally:
        trainer.close()
    # Readings: start 0; steps 1-3 read 1, 2, 3 -> save at 3 (and read 4); steps 4-6 read 5, 6, 7 -> save at 6 ...
    assert sorted(steps_on_disk(tmp_path / "run" / "checkpoint"), key=lambda s: int(s[5:])) == [
        "step-3", "step-6", "step-9", "step-10",
    ]  # fmt: skip


def test_pinned_memory_async_is_refused_on_cpu(run_flags, tmp_path):
    config = parse_args(run_flags(tmp_path, checkpoint__enable_checkpoint="true",
                                  checkpoint__async_mode="async_with_pinned_mem"))  # fmt: skip
    with pytest.raises(ConfigError, match="pinned-memory async checkpointing needs a CUDA GPU"):
        validate(config, 1, "cpu")


def test_model_weights_only_exports_the_final_step_in_export_dtype(reference, run_flags, tmp_path, caplog):
    dump = tmp_path / "run"
    args = run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=4,
                     checkpoint__model_weights_only="true", checkpoint__export_dtype="bfloat16")  # fmt: skip
    same_records(reference["records"], train_here(args))
    final = dcp.FileSystemReader(str(dump / "checkpoint" / "step-10")).read_metadata().state_dict_metadata
    full = dcp.FileSystemReader(str(dump / "checkpoint" / "step-8")).read_metadata().state_dict_metadata
    assert all(key.startswith(("model.", "lm_head.")) for key in final), sorted(final)[:5]
    assert {item.properties.dtype for item in final.values()} == {torch.bfloat16}
    assert any(key.startswith("optimizer.") for key in full) and any(key.startswith("train_state") for key in full)
    assert full["model.norm.weight"].properties.dtype == torch.float32
    # The export converts like any checkpoint (what train.sh does at the end), keeping its dtype.
    from safetensors.torch import load_file

    from flame.utils.convert_dcp_to_hf import convert_dcp_to_hf

    flag = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    out = convert_dcp_to_hf(str(dump), -1, flag["--model.config"], flag["--model.tokenizer_path"], str(tmp_path / "hf"))
    assert {t.dtype for t in load_file(os.path.join(out, "model.safetensors")).values()} == {torch.bfloat16}

    # The export is not resumable: a relaunch resumes from step 8 and reproduces steps 9 and 10.
    resumed = train_here(args)
    assert "step-10 holds model weights only" in caplog.text
    same_records(reference["records"], resumed)
    with pytest.raises(ConfigError, match=r"holds model weights only .* cannot be resumed; complete steps: 4, 8, 10"):
        build_trainer(run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__load_step=10))


def test_dependent_checkpoint_flags_are_refused(run_flags, tmp_path, capsys):
    config = parse_args(run_flags(tmp_path, checkpoint__load_step=4, checkpoint__export_dtype="bfloat16",
                                  checkpoint__initial_load_hf=str(tmp_path / "nowhere")))  # fmt: skip
    with pytest.raises(ConfigError) as error:
        validate(config, 1, "cpu")
    text = error.value.format()
    assert "--checkpoint.load_step only applies with --checkpoint.enable_checkpoint" in text
    assert "--checkpoint.export_dtype only applies with --checkpoint.model_weights_only" in text
    assert "--checkpoint.initial_load_hf" in text and "nowhere' does not exist" in text
    (tmp_path / "weights.bin").write_text("")
    for folder, problem in ((tmp_path / "weights.bin", "is not a folder"), (tmp_path, "holds no .safetensors")):
        config = parse_args(run_flags(tmp_path, checkpoint__initial_load_hf=str(folder)))
        with pytest.raises(ConfigError, match=f"--checkpoint.initial_load_hf: .* {problem}"):
            validate(config, 1, "cpu")
    assert cli_main(run_flags(tmp_path / "run", checkpoint__initial_load_hf=str(tmp_path / "nowhere"))) == 2
    err = capsys.readouterr().err
    assert "nowhere' does not exist (a Hugging Face model folder)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_kill_during_a_save_resumes_from_the_newest_complete_checkpoint(reference, run_flags, tmp_path, caplog):
    """SIGKILL a real run while step 6 is being saved (its data files written, .metadata not yet)."""
    dump, marker = tmp_path / "run", tmp_path / "stalled"
    args = run_flags(dump, checkpoint__enable_checkpoint="true", checkpoint__interval=2)
    proc = subprocess.Popen(
        [PYTHON, str(ROOT / "tests" / "checkpoint" / "stall_save.py"), *args],
        cwd=ROOT, env=env(FLAME_TEST_STALL_STEP="6", FLAME_TEST_STALL_MARKER=str(marker)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "the save of step 6 never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    on_disk = steps_on_disk(dump / "checkpoint")
    assert on_disk == {"step-2": True, "step-4": True, "step-6": False}
    assert any(name.endswith(".distcp") for name in os.listdir(dump / "checkpoint" / "step-6"))

    resumed = train_here(args)
    assert "incomplete checkpoint folder(s) in" in caplog.text and ": step-6 (no .metadata" in caplog.text
    assert [r["step"] for r in resumed] == list(range(1, 11))
    same_records(reference["records"], resumed)  # steps 5..10 retrained from step 4, exactly
    assert steps_on_disk(dump / "checkpoint") == {f"step-{s}": True for s in (2, 4, 6, 8, 10)}
    assert read_metrics(dump)[-1]["step"] == 10


def _optimizers(lr: float, betas: tuple[float, float], patterns: list[tuple[str, float]] | None = None):
    from flame.components.optimizer import Optimizers

    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    groups = [
        ParamGroupConfig(pattern=p, optimizer_name="AdamW", optimizer_kwargs={"lr": group_lr, "betas": betas})
        for p, group_lr in (patterns or [(r".*", lr)])
    ]
    optimizers = Optimizers(OptimizersContainer.Config(param_groups=groups), model_parts=[model])
    model(torch.randn(2, 4)).sum().backward()
    optimizers.step()
    return model, optimizers


def test_optimizer_checkpoint_stores_shared_hyper_parameters_once():
    """One ``param_groups.all`` entry instead of eleven per parameter tensor; loading restores the
    hyper-parameters (tuples too) and the per-parameter state; mixed hyper-parameters keep the
    per-parameter entries."""
    from flame.components.optimizer import SHARED_GROUP_KEY

    model, optimizers = _optimizers(1e-3, (0.9, 0.95))
    state = optimizers.state_dict()
    assert SHARED_GROUP_KEY in state and not [k for k in state if k.startswith("param_groups.0.")]
    assert len(state) == 1 + 3 * 4  # exp_avg, exp_avg_sq, step of 4 tensors
    other, loaded = _optimizers(5e-3, (0.5, 0.6))
    loaded.load_state_dict(state)
    group = loaded.optimizers[0].param_groups[0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.95)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(optimizers.optimizers[0].state[a]["exp_avg"], loaded.optimizers[0].state[b]["exp_avg"])

    _, mixed = _optimizers(0, (0.9, 0.95), patterns=[(r"^0\.", 1e-3), (r".*", 2e-3)])
    state = mixed.state_dict()
    assert SHARED_GROUP_KEY not in state and state["param_groups.1.weight.lr"] == 2e-3
