"""Checkpoint conversion: DCP (as the trainer writes it, any sharding) <-> Hugging Face folders.

Converted models are loaded in a separate interpreter that never imports flame, and their logits are
compared with the original model's: fp32 conversions must agree to max |diff| <= 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

from flame.config.errors import ConfigError
from flame.models.build import load_model_config
from flame.utils._checkpoint_io import run_cli, single_process_dcp, tensor_metadata
from flame.utils.convert_dcp_to_hf import convert_dcp_to_hf
from flame.utils.convert_dcp_to_hf import main as dcp_to_hf_main
from flame.utils.convert_hf_to_dcp import convert_hf_to_dcp

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
FP32_TOL = 1e-5
TEXT = "the quick brown fox checkpoints the lazy dog 42."

# Loads converted folders with transformers only and reports logits/generation/tokenizer facts as JSON.
VERIFY = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
specs, text = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for name, spec in specs.items():
    model = AutoModelForCausalLM.from_pretrained(spec["folder"]).eval()
    tok = AutoTokenizer.from_pretrained(spec["folder"])
    ref = torch.load(spec["reference"])
    with torch.no_grad():
        logits = model(ref["ids"]).logits.float()
        prompt = ref["ids"][:1, :8]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False)
    results[name] = {
        "max_diff": (logits - ref["logits"]).abs().max().item(),
        "dtype": str(model.dtype),
        "new_tokens": out.shape[1] - prompt.shape[1],
        "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
        "ids": tok(text)["input_ids"],
        "eos": model.generation_config.eos_token_id,
    }
results["flame_imported"] = any(m == "flame" or m.startswith("flame.") for m in sys.modules)
print(json.dumps(results))
"""


def tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_model(config_dir: str, tokenizer_dir: str, seed: int):
    """A randomly initialised model, shaped exactly as training builds it (vocab matched to the tokenizer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(load_model_config(config_dir, tokenizer(tokenizer_dir))).eval()


def save_reference(model, path: str) -> str:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits.float()}, path)
    return path


def trainer_save(model, checkpoint: str, step: int) -> None:
    """What the trainer writes: model keys at the top level next to other training state."""
    with single_process_dcp():
        dcp.save(
            {**model.state_dict(), "optimizer.fake": torch.zeros(3), "train_state": {"step": step}},
            checkpoint_id=checkpoint,
        )


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, tied_config, tokenizer_dir):
    """A dump folder with trainer checkpoints at steps 1 and 3 (tied embeddings), an incomplete step 9, run files."""
    dump = tmp_path_factory.mktemp("run")
    trainer_save(build_model(tied_config, tokenizer_dir, seed=1), str(dump / "checkpoint" / "step-1"), 1)
    model = build_model(tied_config, tokenizer_dir, seed=3)
    trainer_save(model, str(dump / "checkpoint" / "step-3"), 3)
    (dump / "checkpoint" / "step-9").mkdir()
    (dump / "checkpoint" / "step-9" / "__0_0.distcp").write_bytes(b"partial")
    (dump / "config.toml").write_text("[job]\n")
    (dump / "metrics.jsonl").write_text("{}\n")
    (dump / "logs").mkdir()
    (dump / "logs" / "rank0.log").write_text("log\n")
    reference = save_reference(model, str(tmp_path_factory.mktemp("reference") / "step3.pt"))
    return {"dump": str(dump), "config": tied_config, "tokenizer": tokenizer_dir, "reference": reference}


@pytest.fixture(scope="module")
def sharded(trained_runs):
    """A checkpoint written by the real trainer on 2 FSDP2 ranks (tests.helpers.torchrun) (untied embeddings)."""
    return trained_runs["fsdp"]


@pytest.fixture(scope="module")
def converted(run, sharded, tmp_path_factory, tokenizer_dir):
    """Every conversion of the module, then one flame-free interpreter that loads them all."""
    out = tmp_path_factory.mktemp("converted")
    checkpoint_files = sorted(os.listdir(os.path.join(run["dump"], "checkpoint", "step-3")))
    cli = run_module(
        "flame.utils.convert_dcp_to_hf", "--path", run["dump"], "--step", "3",
        "--config", run["config"], "--tokenizer", tokenizer_dir,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    folders = {
        "cli": run["dump"],
        "latest": convert_dcp_to_hf(run["dump"], -1, run["config"], tokenizer_dir, output=str(out / "latest")),
        "bf16": convert_dcp_to_hf(run["dump"], 3, run["config"], tokenizer_dir, str(out / "bf16"), "bfloat16"),
        "sharded": convert_dcp_to_hf(sharded["dump"], 4, sharded["config"], sharded["tokenizer"], str(out / "sharded")),
    }
    specs = {name: {"folder": folder, "reference": run["reference"]} for name, folder in folders.items()}
    specs["sharded"]["reference"] = sharded["reference"]
    proc = subprocess.run(
        [sys.executable, "-c", VERIFY, json.dumps(specs), TEXT],
        capture_output=True, text=True, env=ENV, cwd=str(out), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"cli": cli, "folders": folders, "results": results, "checkpoint_files": checkpoint_files}


def test_cli_converts_trainer_checkpoint(converted, run):
    result = converted["results"]["cli"]
    assert not converted["results"]["flame_imported"]
    assert result["max_diff"] <= FP32_TOL, result
    assert result["dtype"] == "torch.float32"
    assert result["tied"], "tied embeddings must survive the conversion"
    assert result["new_tokens"] == 4
    tok = tokenizer(run["tokenizer"])
    assert result["ids"] == tok(TEXT)["input_ids"]
    assert result["eos"] == tok.eos_token_id
    dump = run["dump"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(dump, name)), name
    for name in ("config.toml", "metrics.jsonl", os.path.join("logs", "rank0.log")):
        assert os.path.isfile(os.path.join(dump, name)), f"run file {name} was removed"
    assert sorted(os.listdir(os.path.join(dump, "checkpoint", "step-3"))) == converted["checkpoint_files"]
    stdout = converted["cli"].stdout
    assert dump in stdout and "parameters" in stdout and "float32" in stdout
    with open(os.path.join(dump, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == len(tok) and config["tie_word_embeddings"] and config["use_cache"]


def test_latest_step_in_process(converted):
    result = converted["results"]["latest"]
    assert converted["folders"]["latest"].endswith("latest")
    assert result["max_diff"] <= FP32_TOL, result  # step 3 (the latest complete one), not 1 nor the partial 9
    assert result["tied"] and result["new_tokens"] == 4


def test_bfloat16_export(converted):
    folder = converted["folders"]["bf16"]
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
    result = converted["results"]["bf16"]
    assert result["dtype"] == "torch.bfloat16" and result["new_tokens"] == 4
    assert 0 < result["max_diff"] < 0.1, result  # rounded weights: close to, but not exactly, the fp32 logits


def test_sharded_checkpoint_converts_in_one_process(converted, sharded):
    metadata = dcp.FileSystemReader(sharded["checkpoint"]).read_metadata().state_dict_metadata
    assert len(metadata["model.layers.0.mlp.up_proj.weight"].chunks) == 2, "checkpoint must be sharded by 2 ranks"
    assert set(os.listdir(sharded["checkpoint"])) >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert "dp_shard 2" in sharded["stdout"]
    result = converted["results"]["sharded"]
    assert result["max_diff"] <= FP32_TOL, result
    assert not result["tied"] and result["new_tokens"] == 4


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_hf_to_dcp_to_hf_round_trip(tmp_path, tied_config, tokenizer_dir, dtype):
    model = build_model(tied_config, tokenizer_dir, seed=7)
    model.save_pretrained(tmp_path / "hf")
    step0 = tmp_path / "run" / "checkpoint" / "step-0"
    assert convert_hf_to_dcp(str(tmp_path / "hf"), str(step0), dtype) == str(step0)
    stored = tensor_metadata(str(step0))
    assert set(stored) == set(model.state_dict()), "the DCP keys must be exactly the HF state-dict keys"
    assert not any(key.startswith("model.model.") for key in stored)
    expected_dtype = torch.bfloat16 if dtype else torch.float32
    assert {d for _, d in stored.values()} == {expected_dtype}

    out = convert_dcp_to_hf(str(tmp_path / "run"), 0, str(tmp_path / "hf"), tokenizer_dir, str(tmp_path / "out"))
    original = load_file(tmp_path / "hf" / "model.safetensors")
    converted = load_file(os.path.join(out, "model.safetensors"))
    assert set(converted) == set(original)
    for key, tensor in original.items():
        assert converted[key].dtype == expected_dtype, key  # default dtype: as stored in the checkpoint
        assert torch.equal(converted[key], tensor.to(expected_dtype)), key


def test_missing_step_lists_available_steps(run):
    proc = run_module(
        "flame.utils.convert_dcp_to_hf", "--path", run["dump"], "--step", "7",
        "--config", run["config"], "--tokenizer", run["tokenizer"],
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "step-7" in proc.stderr and "available steps: 1, 3" in proc.stderr


def test_refuses_to_overwrite_dcp_checkpoint(run, tmp_path):
    before = sorted(os.listdir(os.path.join(run["dump"], "checkpoint", "step-3")))
    proc = run_module(
        "flame.utils.convert_hf_to_dcp", "--model", str(tmp_path), "--checkpoint",
        os.path.join(run["dump"], "checkpoint", "step-3"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not empty" in proc.stderr
    assert sorted(os.listdir(os.path.join(run["dump"], "checkpoint", "step-3"))) == before


def test_config_shape_mismatch_names_key_and_shapes(run, tmp_path, capsys, llama_config):
    wrong = llama_config(tmp_path / "wrong", hidden_size=32)
    argv = ["--path", run["dump"], "--step", "3", "--config", wrong, "--tokenizer", run["tokenizer"]]
    argv += ["--output", str(tmp_path / "out")]
    assert run_cli(dcp_to_hf_main, argv) == 2
    err = capsys.readouterr().err
    vocab = len(tokenizer(run["tokenizer"]))
    assert "model.embed_tokens.weight" in err and f"[{vocab}, 64]" in err and f"[{vocab}, 32]" in err
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_config_with_fewer_layers_is_refused(run, tmp_path, llama_config):
    fewer = llama_config(tmp_path / "fewer", num_hidden_layers=1)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\."):
        convert_dcp_to_hf(run["dump"], 3, fewer, run["tokenizer"], output=str(tmp_path / "out"))


def test_untied_checkpoint_with_tied_config_is_refused(sharded, llama_config, tmp_path):
    tied = llama_config(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(ConfigError, match=r"lm_head\.weight and model\.embed_tokens\.weight differ"):
        convert_dcp_to_hf(sharded["dump"], 4, tied, sharded["tokenizer"], output=str(tmp_path / "out"))


def test_bad_inputs_are_config_errors(run, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        convert_dcp_to_hf(str(tmp_path / "nowhere"), 3, run["config"], run["tokenizer"])
    with pytest.raises(ConfigError, match=r"^--config: .*does not exist"):
        convert_dcp_to_hf(run["dump"], 3, str(tmp_path / "no_config"), run["tokenizer"], str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"^--tokenizer .* does not exist"):
        convert_dcp_to_hf(run["dump"], 3, run["config"], str(tmp_path / "no_tokenizer"), str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="checkpoint folder"):
        convert_dcp_to_hf(run["dump"], 3, run["config"], run["tokenizer"], os.path.join(run["dump"], "checkpoint"))
    empty = tmp_path / "empty"
    (empty / "checkpoint").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        convert_dcp_to_hf(str(empty), -1, run["config"], run["tokenizer"])
    with pytest.raises(ConfigError, match=r"^--model .* does not exist"):
        convert_hf_to_dcp(str(tmp_path / "no_model"), str(tmp_path / "step-0"))
    assert not os.path.exists(tmp_path / "step-0")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dcp_to_hf_main(["-h"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--path", "--step", "--config", "--tokenizer", "--output", "--dtype"):
        assert flag in help_text
