"""The custom-model example (custom_models/, model_type "ember") end to end, as the README tells users.

README "Add your own model": 1. a package that registers a config and model classes with the Auto
classes; 2. a JSON config with that model_type; 3. ``train.sh ... --experimental.custom_model_path
custom_models`` (FSDP, activation checkpointing, compile come from the generic adapter), which
exports the last checkpoint; 4. ``import custom_models`` + ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from flame.config.errors import ConfigError
from flame.utils.convert_dcp_to_hf import convert_dcp_to_hf
from tests.checkpoint.conftest import train_here
from tests.conftest import SEQ_LEN
from tests.helpers import ROOT, read_metrics, run

EMBER = {
    "model_type": "ember", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257,
}  # fmt: skip

# README step 4, in an interpreter that imports only the registration package (never flame).
LOAD_BACK = r"""
import json, sys, torch
import custom_models  # registers model_type "ember" with the Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, reference = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
prompt = tok("def value", return_tensors="pt")
with torch.no_grad():
    out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
result = {"class": type(model).__name__, "new_tokens": out.shape[1] - prompt["input_ids"].shape[1],
          "norm": type(model.model.norm).__name__}
if reference:
    ref = torch.load(reference)
    with torch.no_grad():
        result["max_diff"] = (model(ref["ids"]).logits.float() - ref["logits"]).abs().max().item()
result["flame_imported"] = any(m == "flame" or m.startswith("flame.") for m in sys.modules)
print(json.dumps(result))
"""


def load_back(folder: str, reference: str = "") -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_BACK, folder, reference],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result.pop("flame_imported")
    return result


@pytest.fixture(scope="module")
def ember_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ember") / "ember_tiny.json"
    path.write_text(json.dumps(EMBER))
    return str(path)


@pytest.mark.slow  # CI's slow tier: the README steps: 2-rank training, export, load, ~35 s
def test_readme_steps_train_export_and_load_back(ember_json, run_flags, tmp_path):
    """Steps 2-4 of the README with 2 FSDP ranks and activation checkpointing; the losses equal one process."""
    dump = tmp_path / "ember"
    args = run_flags(dump, model__config=ember_json, experimental__custom_model_path="custom_models",
                     checkpoint__enable_checkpoint="true", activation_checkpoint__mode="full",
                     training__batch_size=2, training__steps=6)  # fmt: skip
    proc = run(["bash", str(ROOT / "train.sh"), *args], NGPU="2")
    assert "FSDP2" in proc.stdout and "activation checkpointing: full" in proc.stdout
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (dump / name).is_file(), name
    assert json.loads((dump / "config.json").read_text())["model_type"] == "ember"
    result = load_back(str(dump))
    assert result == {"class": "EmberForCausalLM", "new_tokens": 5, "norm": "EmberRMSNorm"}

    # The same global batch (4 rows) in one process, without activation checkpointing: the same losses.
    single = train_here(run_flags(tmp_path / "single", model__config=ember_json, training__steps=6,
                                  experimental__custom_model_path="custom_models"))  # fmt: skip
    fsdp = read_metrics(dump)
    assert [r["step"] for r in fsdp] == list(range(1, 7))
    for a, b in zip(single, fsdp, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert fsdp[-1]["loss"] < fsdp[0]["loss"] - 0.3


@pytest.mark.slow  # CI's slow tier: a train and an export, ~19 s
def test_norm_type_run_exports_with_the_same_norm_type(ember_json, run_flags, tmp_path):
    """--model.norm_type changes Ember's modules; convert_dcp_to_hf --norm_type rebuilds them, exactly."""
    from tests.utils.train_and_dump import main as train_and_dump

    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 257, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0)), ids)
    dump = tmp_path / "run"
    args = run_flags(dump, model__config=ember_json, model__norm_type="layernorm", training__steps=3,
                     experimental__custom_model_path="custom_models", checkpoint__enable_checkpoint="true")  # fmt: skip
    train_and_dump(str(ids), str(tmp_path / "logits.pt"), args)
    tokenizer = args[args.index("--model.tokenizer_path") + 1]
    convert = functools.partial(convert_dcp_to_hf, step=3, config=ember_json, tokenizer=tokenizer,
                                custom_model_path="custom_models")  # fmt: skip
    explicit = convert(str(dump), output=str(tmp_path / "explicit"), norm_type="layernorm")
    recorded = convert(str(dump), output=str(tmp_path / "recorded"))  # norm_type read from the run's config.toml
    for folder in (explicit, recorded):
        result = load_back(folder, str(tmp_path / "logits.pt"))
        assert result["norm"] == "LayerNorm" and result["new_tokens"] == 5
        assert result["max_diff"] <= 1e-5, result
        print(f"ember layernorm export {folder}: max |exported - trained| logits {result['max_diff']}")
    # A copied checkpoint without the run's config.toml, converted without --norm_type: a clear error.
    shutil.copytree(dump / "checkpoint", tmp_path / "copy" / "checkpoint")
    with pytest.raises(ConfigError, match=r"has \[.model\.layers\.0\.attn_norm\.bias.*--norm_type if training set"):
        convert(str(tmp_path / "copy"), output=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow  # CI's slow tier: two runs, one compiled, ~48 s
def test_compile_keeps_the_losses(ember_json, run_flags, tmp_path):
    flags = {"model__config": ember_json, "experimental__custom_model_path": "custom_models", "training__steps": 3}
    eager = train_here(run_flags(tmp_path / "eager", **flags))
    compiled = train_here(run_flags(tmp_path / "compiled", training__compile="true", **flags))
    # inductor fuses and reorders float arithmetic: agreement to 1e-4 rather than bitwise
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-4)
