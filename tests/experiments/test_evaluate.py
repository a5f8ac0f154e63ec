"""``python -m flame.evaluate`` and evaluate stages: the trainer's validation numbers on the same checkpoint."""

from __future__ import annotations

import json
import math
import os

import pytest

import flame
from flame.evaluate import main as evaluate_main
from tests.helpers import read_metrics, torchrun


@pytest.fixture(scope="module")
def trained(base_toml, tmp_path_factory):
    """A tiny run: 4 steps, validation and a checkpoint at the last step, plus its Hugging Face export."""
    dump = tmp_path_factory.mktemp("trained") / "run"
    result = flame.train(base_toml, job={"dump_folder": str(dump)}, training={"steps": 4})
    from flame.utils.convert_dcp_to_hf import main as convert

    hf = dump / "hf"
    config = flame.load_toml(str(dump / "config.toml"))
    assert convert(
        [
            "--path",
            str(dump),
            "--step",
            "4",
            "--config",
            config.model.config,
            "--tokenizer",
            config.model.tokenizer_path,
            "--output",
            str(hf),
        ]
    ) in (0, None)
    return dump, hf, result


def test_evaluate_equals_the_trainers_validation(trained, tmp_path):
    dump, hf, _ = trained
    logged = [r for r in read_metrics(dump) if "validation_loss" in r][-1]
    assert logged["step"] == 4
    out = tmp_path / "eval_dcp"
    args = ["--job.config_file", str(dump / "config.toml"), "--job.dump_folder", str(out)]
    assert evaluate_main(["--model_path", str(dump / "checkpoint" / "step-4"), *args]) == 0
    got = json.loads((out / "summary.json").read_text())
    assert got["validation_loss"] == pytest.approx(logged["validation_loss"], rel=1e-6)
    assert got["validation_tokens"] == logged["validation_tokens"]
    assert got["validation_perplexity"] == pytest.approx(math.exp(got["validation_loss"]), rel=1e-9)
    # Byte tokenizer: one byte per target token except EOS (no bytes); 33-token documents, 32 bytes each.
    assert 32 / 33 * 0.9 < got["validation_bytes"] / got["validation_tokens"] <= 1
    bpb = got["validation_loss"] * got["validation_tokens"] / got["validation_bytes"] / math.log(2)
    assert got["validation_bits_per_byte"] == pytest.approx(bpb, rel=1e-9)
    # The run folder itself: its newest complete checkpoint; the Hugging Face export: the same weights.
    for source, name in ((dump, "run"), (hf, "hf")):
        target = tmp_path / f"eval_{name}"
        assert evaluate_main(["--model_path", str(source), *args[:2], "--job.dump_folder", str(target)]) == 0
        other = json.loads((target / "summary.json").read_text())
        assert other["validation_loss"] == pytest.approx(got["validation_loss"], rel=1e-5)


@pytest.mark.slow
def test_evaluate_on_two_ranks_equals_one(trained, tmp_path):
    """``torchrun --nproc_per_node 2 -m flame.evaluate`` (what an evaluate stage with ngpu = 2 runs): the
    checkpoint loaded under FSDP2 over 2 ranks, each batch split between them, the sums reduced; with
    half the per-device batch (validation.batch_size is per device) the same tokens as one process, and
    the same numbers up to the summation order."""
    dump, _, _ = trained
    args = ["--model_path", str(dump / "checkpoint" / "step-4"), "--job.config_file", str(dump / "config.toml")]
    assert evaluate_main([*args, "--job.dump_folder", str(tmp_path / "one")]) == 0
    halved = ["--validation.batch_size", "2", "--job.dump_folder", str(tmp_path / "two")]
    torchrun(2, [*args, *halved], module="flame.evaluate")
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["validation_tokens"] == one["validation_tokens"]
    assert two["validation_bytes"] == one["validation_bytes"]
    assert two["validation_loss"] == pytest.approx(one["validation_loss"], rel=1e-5)


def test_evaluate_refuses_to_write_into_the_models_folder(trained, capsys):
    dump, _, _ = trained
    before = sorted(os.listdir(dump))
    assert evaluate_main(["--model_path", str(dump), "--job.config_file", str(dump / "config.toml")]) == 2
    assert "is the folder of the model being evaluated" in capsys.readouterr().err
    assert sorted(os.listdir(dump)) == before


TASK = """task: flame_tiny
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{text[:16]}}}}"
doc_to_choice: "{{{{[text[16:], 'zzzz qqqq zzzz q']}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


@pytest.mark.slow  # CI's slow tier: lm-evaluation-harness start-up and a task, ~18 s
def test_lm_eval_task_from_a_local_file(trained, tmp_path, fixed_docs):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra (pip install flame[eval])")
    dump, hf, _ = trained
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "flame_tiny.yaml").write_text(TASK.format(data=fixed_docs))
    out = tmp_path / "eval_lm"
    args = ["--model_path", str(hf), "--job.config_file", str(dump / "config.toml"), "--job.dump_folder", str(out)]
    args += ["--lm_eval.tasks", "flame_tiny", "--lm_eval.include_path", str(tasks), "--lm_eval.limit", "20"]
    assert evaluate_main(args) == 0
    got = json.loads((out / "summary.json").read_text())
    # the model has seen these documents: it prefers their real continuation over gibberish
    assert got["lm_eval/flame_tiny/acc"] >= 0.8


EVAL_SPEC = """
[experiment]
name = "ev"
root = "{root}"

[[stage]]
name = "train"
kind = "KIND"
config = "{base}"
override = { "training.steps" = 2, "checkpoint.interval" = 2 }
space = { "optimizer.lr" = { grid = [1e-3, 3e-3] } }

[[stage]]
name = "eval"
kind = "evaluate"
checkpoint = { link = "train", field = "checkpoint", pick = "each" }
metric = "validation_bits_per_byte"
override = { "validation.steps" = 3 }
"""


def test_evaluate_stage_expands_per_linked_checkpoint(write_spec):
    """Fast: the fake trainer's checkpoints; the evaluate trials' configs and commands (not run)."""
    from flame.experiments import api
    from flame.experiments.driver import walk
    from flame.experiments.records import Records

    spec = write_spec(EVAL_SPEC.replace("KIND", "fake"))
    exp = api._spec(str(spec), None)
    from flame.experiments.local import write_trial_files

    (train,) = [s for s in walk(exp, Records(exp.root, writable=True), "collect") if s.stage.name == "train"]
    for item in train.to_launch:  # what the driver writes before launching, then what a trial leaves
        write_trial_files(item)
    for trial in api.plan(spec)["stages"][0]["trials"]:
        os.makedirs(os.path.join(trial["dump_folder"], "checkpoint", "step-2"))
        open(os.path.join(trial["dump_folder"], "checkpoint", "step-2", ".metadata"), "w").close()
        json.dump({"steps": 2}, open(os.path.join(trial["dump_folder"], "summary.json"), "w"))
        with open(os.path.join(trial["dump_folder"], "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 2, "validation_loss": trial["params"]["optimizer.lr"]}) + "\n")
    states = walk(exp, Records(exp.root), "readonly")
    evals = states[1].scheduler.trials()
    assert sorted(t.values["checkpoint"] for t in evals) == sorted(
        os.path.join(t["dump_folder"], "checkpoint", "step-2") for t in api.plan(spec)["stages"][0]["trials"]
    )
    for t in evals:
        assert (
            t.config.validation.enable and t.config.validation.steps == 3 and not t.config.checkpoint.enable_checkpoint
        )
        assert t.config.job.dump_folder == t.folder
        command = __import__("flame.experiments.kinds", fromlist=["x"]).stage_kind("evaluate").command(t)
        assert (
            command[1:3] == ["-m", "flame.evaluate"]
            and command[command.index("--model_path") + 1] == t.values["checkpoint"]
        )
        assert t.lineage["train"] in t.values["checkpoint"]


@pytest.mark.slow
def test_evaluate_stage_links_each_checkpoint(write_spec):
    from flame.experiments import api

    spec = write_spec(EVAL_SPEC.replace("KIND", "train"))
    result = api.run(spec, echo=lambda *a, **k: None)
    trained_ = {t["id"]: t for t in result.stage("train")["trials"]}
    evals = result.stage("eval")["trials"]
    assert len(evals) == 2 and all(t["status"] == "done" for t in evals)
    for t in evals:
        summary = json.loads(open(os.path.join(t["dump_folder"], "summary.json")).read())
        origin = trained_[t["lineage"]["train"]]
        assert summary["model_path"] == os.path.join(origin["dump_folder"], "checkpoint", "step-2")
        assert t["metric"] == summary["validation_bits_per_byte"]
        assert summary["validation_tokens"] == 3 * 4 * 32  # validation.steps x batch x seq_len
