"""The model zoo (configs/models/*.json): every config loads, builds, and is the size its name says.

Families that train on CPU (transformers' Llama, Qwen2 and Mistral, the Ember example, and fla's GLA
through flame's PyTorch path) train a few steps here at a tiny size; fla's other families run Triton
kernels only and train in the GPU tests (``-m gpu`` on a machine with CUDA), while here they must fail
with a clear message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from flame.config.errors import ConfigError
from flame.models.adapters import adapter_for
from flame.models.build import build_meta_model, import_custom_models, load_model_config
from flame.models.families.fla_base import FLA_MODEL_TYPES
from tests.checkpoint.conftest import train_here
from tests.helpers import ROOT

ZOO = sorted((ROOT / "configs" / "models").glob("*.json"))
SIZE_TOL = 0.04  # a name's size, to within 4 % (llama_7b: the usual Llama-2-7B shape, 6.74B)
FLA_ZOO_FAMILIES = ("gla", "delta_net", "gated_deltanet", "mamba", "mamba2", "hgrn2", "gsa", "samba")
FLA_CPU_PATH_FAMILIES = ("gla", "gated_deltanet", "delta_net")  # with flame's PyTorch path for their kernels


def name_size(path: Path) -> float:
    match = re.search(r"_(\d+(?:\.\d+)?)([mb])$", path.stem)
    assert match, f"{path.name}: the name must end in its size, e.g. _340m or _1b"
    return float(match.group(1)) * (1e6 if match.group(2) == "m" else 1e9)


@pytest.fixture(scope="module")
def flash_attn_stub():
    """Build-only stand-in for the flash-attn package, which fla's attention layers ask for at construction.

    Counting parameters on the meta device runs no kernels; the training tests use the real package.
    """
    import fla.layers.attn as attn

    real = attn.flash_attn_func
    attn.flash_attn_func = attn.flash_attn_func or (lambda *a, **k: None)
    yield
    attn.flash_attn_func = real


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_config_builds_and_matches_its_size(path, flash_attn_stub):
    import_custom_models("custom_models")
    config = load_model_config(str(path))
    assert config.model_type == json.loads(path.read_text())["model_type"]
    model = build_meta_model(config, for_device=None)
    count = sum(p.numel() for p in model.parameters())
    print(f"{path.stem}: {count:,} parameters ({type(model).__name__}, {type(model).__module__.split('.')[0]})")
    assert abs(count / name_size(path) - 1) <= SIZE_TOL, (path.name, count)
    assert all(p.is_meta for p in model.parameters())
    family = adapter_for(config.model_type)
    assert len(family.layers(model)) == config.num_hidden_layers
    if config.model_type in FLA_ZOO_FAMILIES:  # fla's implementation, also where transformers has a namesake
        assert type(model).__module__.startswith("fla."), type(model)
        cpu_path = config.model_type in FLA_CPU_PATH_FAMILIES
        assert family.registered_by == "fla" and family.device_types == (("cpu", "cuda") if cpu_path else ("cuda",))


def test_fla_adapters_cover_exactly_the_types_fla_registers():
    import fla.models

    registered = {getattr(fla.models, name).model_type for name in fla.models.__all__ if name.endswith("Config")}
    assert set(FLA_MODEL_TYPES) == registered
    assert set(FLA_ZOO_FAMILIES) <= registered


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_fla_family_on_cpu_is_a_config_error(run_flags, tmp_path):
    from tests.checkpoint.conftest import build_trainer

    config = tiny_config("hgrn2", tmp_path)
    with pytest.raises(ConfigError, match=r"model family 'hgrn2' trains on cuda only .* not on cpu"):
        build_trainer(run_flags(tmp_path / "run", model__config=config))


TINY = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    "mistral": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "sliding_window": 16},
    "ember": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gla": {"hidden_size": 256, "num_heads": 4},
    "delta_net": {"hidden_size": 256, "num_heads": 2},
    "gated_deltanet": {"hidden_size": 256, "num_heads": 2, "head_dim": 64},
    "mamba": {"hidden_size": 256},
    "mamba2": {"hidden_size": 256, "head_dim": 64, "chunk_size": 64},
    "hgrn2": {"hidden_size": 256, "expand_ratio": 64},
    "gsa": {"hidden_size": 256, "num_heads": 4, "num_slots": 16},
    "samba": {"hidden_size": 256, "attn": {"layers": [1], "num_heads": 2, "num_kv_heads": 2, "window_size": 64}},
}  # fmt: skip


def tiny_config(model_type: str, folder: Path) -> str:
    """A two-layer config of ``model_type`` (vocabulary: set to the tokenizer's by flame)."""
    path = folder / f"{model_type}_tiny.json"
    config = {"model_type": model_type, "num_hidden_layers": 2, "vocab_size": 257, "tie_word_embeddings": False}
    path.write_text(json.dumps({**config, **TINY[model_type]}))
    return str(path)


def train_a_few_steps(model_type: str, run_flags, tmp_path, **overrides) -> list[dict]:
    args = run_flags(tmp_path / model_type, model__config=tiny_config(model_type, tmp_path), training__steps=6,
                     experimental__custom_model_path="custom_models", **overrides)  # fmt: skip
    records = train_here(args)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses  # it learns
    return records


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "ember", "gla", "gated_deltanet", "delta_net"])
def test_cpu_family_trains(model_type, run_flags, tmp_path):
    train_a_few_steps(model_type, run_flags, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", FLA_ZOO_FAMILIES)
def test_fla_family_trains_on_gpu(model_type, run_flags, tmp_path):
    """On CUDA (the device machine): each fla family of the zoo trains through flame in bfloat16."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if model_type == "samba":
        pytest.importorskip("flash_attn", reason="fla's Samba attention needs the flash-attn package")
    train_a_few_steps(model_type, run_flags, tmp_path, training__mixed_precision_param="bfloat16",
                      training__seq_len=64)  # fmt: skip
