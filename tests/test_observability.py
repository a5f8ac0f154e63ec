"""Metrics that sweeps rank runs by: validation loss, FLOPs, summary, W&B, plots, rank-0 logging."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import flame
from flame.config.loader import parse_args
from flame.models.build import build_meta_model, load_model_config
from flame.models.flops import flops_per_token, peak_tflops
from tests.conftest import SEQ_LEN
from tests.helpers import read_metrics, torchrun


def test_validation_loss_equals_a_direct_computation(train_args, fixed_docs):
    args = train_args("val", training__steps=2, validation__enable="true", validation__freq=2)
    args += [
        "--validation.dataset",
        "json",
        "--validation.data_files",
        fixed_docs,
        "--validation.dataset_split",
        "train",
    ]
    args += ["--validation.steps", "3", "--validation.batch_size", "2"]
    trainer = flame.Trainer(parse_args(args))
    try:
        trainer.train()
        record = read_metrics(trainer.config.job.dump_folder)[-1]
        # Direct: transformers' own loss on the full rows (inputs + last target), batch by batch.
        from flame.data import build_dataloader

        config = trainer.config
        loader = iter(build_dataloader(config.training, trainer.tokenizer, validation=config.validation))
        losses = []
        with torch.no_grad():
            for _ in range(3):
                batch = next(loader)
                rows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
                losses.append(trainer.model(input_ids=rows, labels=rows).loss.item())
    finally:
        trainer.close()
    direct = sum(losses) / len(losses)  # every row has the same number of targets
    assert record["validation_loss"] == pytest.approx(direct, abs=1e-5)
    assert record["validation_perplexity"] == pytest.approx(torch.tensor(direct).exp().item(), rel=1e-5)
    assert record["validation_tokens"] == 3 * 2 * SEQ_LEN


def _meta(config: dict, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model_config = load_model_config(str(path))
    # FLOP counting needs no kernels: build on meta without the "does this family train here" check.
    return build_meta_model(model_config, for_device=None), model_config


def test_flops_of_a_llama_match_a_hand_count(tmp_path):
    h, i, layers, heads, kv, vocab = 64, 160, 3, 4, 2, 500
    model, config = _meta(
        {"model_type": "llama", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": False},
        tmp_path,
    )  # fmt: skip
    head_dim = h // heads
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * i + 2 * h  # q, o, k, v, mlp, two norms
    matmul_params = layers * per_layer + h + vocab * h  # + final norm + untied output head
    for seq_len in (128, 2048):
        assert flops_per_token(model, config, seq_len) == 6 * matmul_params + 12 * layers * h * seq_len


def test_linear_attention_has_no_quadratic_term(tmp_path):
    pytest.importorskip("fla")
    import fla  # noqa: F401  (registers the fla model types)

    model, config = _meta(
        {"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 500,
         "tie_word_embeddings": False},
        tmp_path,
    )  # fmt: skip
    embedding = model.get_input_embeddings().weight.numel()
    expected = 6 * (sum(p.numel() for p in model.parameters()) - embedding)
    assert flops_per_token(model, config, 128) == flops_per_token(model, config, 8192) == expected


def test_peak_table_knows_common_gpus_and_admits_the_rest():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
    assert peak_tflops("cpu", "bfloat16") is None


def test_records_summary_and_console(train_args, tmp_path):
    config = parse_args(train_args("obs", training__steps=4, metrics__log_freq=2))
    result = flame.train(config)
    last = result.metrics
    records = read_metrics(tmp_path / "obs")
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss_max", "tflops", "mfu", "memory_rss_gib", "data_wait_share", "tokens_seen", "eta_seconds"):
        assert key in records[-1], key
    assert records[-1]["mfu"] is None  # no peak is known for a CPU
    assert records[-1]["tokens_seen"] == 4 * 4 * SEQ_LEN
    assert records[-1]["tflops"] > 0 and records[-1]["memory_rss_gib"] > 0.05
    summary = json.loads((tmp_path / "obs" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * SEQ_LEN
    assert summary["final_loss"] == last["loss"] and summary["checkpoint"] is None


def test_only_rank_0_logs_by_default_and_loss_max_covers_all_ranks(train_args, tmp_path):
    proc = torchrun(2, train_args("ranks", training__batch_size=2, training__steps=2))
    assert "[rank0] INFO flame: step 1/2" in proc.stdout
    assert "[rank1] INFO flame" not in proc.stdout
    assert "done: 2 steps" in proc.stdout
    for record in read_metrics(tmp_path / "ranks"):
        assert record["loss_max"] >= record["loss"] - 1e-6


def test_wandb_offline_run_holds_metrics_and_resumes_the_same_run(train_args, tmp_path):
    pytest.importorskip("wandb")
    os.environ["WANDB_MODE"] = "offline"
    args = train_args("wb", training__steps=2, metrics__enable_wandb="true", checkpoint__enable_checkpoint="true")
    flame.train(parse_args(args))
    run_id = (tmp_path / "wb" / "wandb_run_id").read_text()
    flame.train(parse_args([*args, "--training.steps", "3"]))  # resumes at step 2 into the same W&B run
    runs = sorted(glob.glob(str(tmp_path / "wb" / "wandb" / f"offline-run-*-{run_id}")))
    assert len(runs) == 2
    records = read_metrics(tmp_path / "wb")
    data = open(os.path.join(runs[-1], f"run-{run_id}.wandb"), "rb").read()
    assert b"loss" in data and b"grad_norm" in data and json.dumps(records[-1]["loss"]).encode() in data
    first = open(os.path.join(runs[0], f"run-{run_id}.wandb"), "rb").read()
    assert b"lr_scheduler" in first  # the config was logged


def test_plot_draws_every_run(train_args, tmp_path):
    import matplotlib.image

    from flame.utils.plot import main

    flame.train(parse_args(train_args("a", training__steps=3)))
    flame.train(parse_args(train_args("b", training__steps=3, optimizer__lr="1e-3")))
    out = tmp_path / "runs.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert matplotlib.image.imread(str(out)).shape[:2] == (1000, 1600)
    assert main([str(tmp_path / "missing")]) == 2


def test_console_colour_follows_the_flag(train_args, caplog, monkeypatch):
    """On a terminal (FLAME_COLOR=1, as train.sh sets it for one) the flag alone decides."""
    import logging

    monkeypatch.setenv("FLAME_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)

    from flame.components.metrics import MetricsLogger

    record = {"step": 1, "loss": 2.0, "loss_max": 2.5, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_second": 10.0,
              "tflops": 0.1, "mfu": None, "memory_rss_gib": 1.0, "data_wait_share": 0.0, "skipped_steps": 0,
              "elapsed_seconds": 1.0, "eta_seconds": 2.0}  # fmt: skip
    for disable, coloured in (("false", True), ("true", False)):
        config = parse_args(train_args("colour", metrics__disable_color_printing=disable))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flame"):
            MetricsLogger(config, rank=1, resume_step=0, run_config={})._print(record)
        message = caplog.records[-1].getMessage()  # caplog.text would strip the colour codes
        assert ("\033[" in message) is coloured
        assert "MFU unknown" in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_snapshots_and_mfu(train_args, tmp_path):
    args = train_args("snap", training__steps=4, profiling__enable_memory_snapshot="true", profiling__profile_freq=2)
    flame.train(parse_args([*args, "--training.mixed_precision_param", "bfloat16"]))
    snapshots = sorted(glob.glob(str(tmp_path / "snap" / "memory_snapshot" / "*" / "rank0_memory_snapshot.pickle")))
    assert [s.split("/")[-2] for s in snapshots] == ["iteration_2", "iteration_4"]
    record = read_metrics(tmp_path / "snap")[-1]
    assert record["memory_active_gib"] > 0 and (record["mfu"] is None or 0 < record["mfu"] < 100)


def test_python_api_takes_a_toml_path_and_section_overrides(train_args, tmp_path):
    """flame.train(path, **sections): the same run as the flags, a TrainResult back; bad keys are ConfigErrors."""
    from flame.config.loader import save_toml

    config = parse_args(train_args("base", training__steps=3))
    save_toml(config, str(tmp_path / "base.toml"))
    result = flame.train(tmp_path / "base.toml", job={"dump_folder": str(tmp_path / "api")}, training={"steps": 2})
    assert result.dump_folder == str(tmp_path / "api")
    assert [r["step"] for r in read_metrics(tmp_path / "api")] == [1, 2]
    assert result.metrics["step"] == 2 and result.summary["steps"] == 2 and result.checkpoint is None
    with pytest.raises(flame.ConfigError, match=r"unknown config key 'training.stesp'.*'training.steps'"):
        flame.train(tmp_path / "base.toml", training={"stesp": 2})


def test_importing_the_cli_module_is_refused_and_keeps_the_function():
    import importlib

    with pytest.raises(ImportError, match=r"python -m flame\.train"):
        importlib.import_module("flame.train")
    assert callable(flame.train) and flame.train.__module__ == "flame"
