"""Checkpoints of the real trainer: conversion exactness, starting from a Hugging Face model, cross-layout resume.

Both runs of ``trained_runs`` start from the Hugging Face folder ``hf_start`` through
``--checkpoint.initial_load_hf`` (one under 2 FSDP ranks, one in a single process), train 4 steps and
save steps 2 and 4. The first logged loss must be the loss ``transformers`` computes for ``hf_start``
on the first global batch, the exported step-4 model must give the trained model's logits, and the
FSDP checkpoint must resume under another layout (DDP) with the same losses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flame.utils.convert_dcp_to_hf import convert_dcp_to_hf
from tests.helpers import read_metrics, torchrun

FP32_TOL = 1e-5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}

# Runs without flame: loads each exported folder with transformers only, reports max |logits - trained logits|.
VERIFY = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
specs, results = json.loads(sys.argv[1]), {}
for name, spec in specs.items():
    model = AutoModelForCausalLM.from_pretrained(spec["folder"]).eval()
    ref = torch.load(spec["reference"])
    with torch.no_grad():
        results[name] = (model(ref["ids"]).logits.float() - ref["logits"]).abs().max().item()
results["flame_imported"] = any(m == "flame" or m.startswith("flame.") for m in sys.modules)
print(json.dumps(results))
"""


def first_global_batch(run: dict) -> dict[str, torch.Tensor]:
    """The rows every data-parallel rank trained on at step 1, together (the global batch)."""
    from transformers import AutoTokenizer

    from flame.config.loader import parse_args
    from flame.data import build_dataloader

    training = parse_args(["--job.config_file", os.path.join(run["dump"], "config.toml")]).training
    tokenizer = AutoTokenizer.from_pretrained(run["tokenizer"])
    ranks = run["ranks"]
    batches = [
        next(iter(build_dataloader(training, tokenizer, dp_rank=rank, dp_world_size=ranks))) for rank in range(ranks)
    ]
    return {key: torch.cat([b[key] for b in batches]) for key in ("input_ids", "labels")}


@pytest.mark.parametrize("layout", ["single", "fsdp"])
def test_first_loss_is_the_loss_transformers_computes_for_the_start_model(trained_runs, layout):
    from transformers import AutoModelForCausalLM

    run = trained_runs[layout]
    batch = first_global_batch(run)
    model = AutoModelForCausalLM.from_pretrained(run["config"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()
    first = read_metrics(run["dump"])[0]
    assert first["step"] == 1
    print(f"{layout}: first logged loss {first['loss']!r}, transformers {expected!r}")
    # One process: the same fp32 operations as transformers'. FSDP: only the order of the sums differs.
    assert abs(first["loss"] - expected) <= (1e-6 if layout == "single" else FP32_TOL), (first["loss"], expected)
    if layout == "fsdp":
        assert f"initial weights from Hugging Face folder {run['config']}" in run["stdout"]


def test_exported_models_give_the_trained_models_logits(trained_runs, tmp_path):
    specs = {}
    for layout, run in trained_runs.items():
        folder = convert_dcp_to_hf(run["dump"], -1, run["config"], run["tokenizer"], output=str(tmp_path / layout))
        specs[layout] = {"folder": folder, "reference": run["reference"]}
    proc = subprocess.run(
        [sys.executable, "-c", VERIFY, json.dumps(specs)], capture_output=True, text=True, env=ENV, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not results.pop("flame_imported")
    assert set(results) == {"single", "fsdp"}
    for layout, max_diff in results.items():
        assert max_diff <= FP32_TOL, (layout, max_diff)
    # The two layouts trained the same model: their exports agree too (to fp32 summation order).
    single, fsdp = (torch.load(trained_runs[k]["reference"])["logits"] for k in ("single", "fsdp"))
    assert (single - fsdp).abs().max().item() <= 1e-4
    print("max |exported - trained| logits:", results)


def test_fsdp_checkpoint_resumes_under_ddp(trained_runs, tmp_path):
    """Step 2 of the FSDP run (parameters and AdamW state sharded over 2 ranks) resumed with both replicated."""
    fsdp = trained_runs["fsdp"]
    dump = tmp_path / "ddp"
    shutil.copytree(fsdp["dump"], dump)
    shutil.rmtree(dump / "checkpoint" / "step-4")
    proc = torchrun(2, ["--job.config_file", str(dump / "config.toml"), "--job.dump_folder", str(dump),
                        "--training.data_parallel_replicate_degree", "2"])  # fmt: skip
    assert "resumed at step 2" in proc.stdout and "dp_replicate 2, dp_shard 1" in proc.stdout
    original, resumed = read_metrics(fsdp["dump"]), read_metrics(dump)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(original[2:], resumed[2:], strict=True):
        print(f"step {a['step']}: FSDP loss {a['loss']!r}, resumed under DDP {b['loss']!r}")
        assert abs(a["loss"] - b["loss"]) <= FP32_TOL, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a, b)
