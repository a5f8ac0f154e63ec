"""Fixtures for the conversion tests: a tiny byte-level BPE tokenizer and tiny Llama configs."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EOS = "<|endoftext|>"
_WORDS = (
    "the quick brown fox jumps over the lazy dog while a small model learns to predict the next token "
    "from a stream of packed documents and checkpoints are written by every rank of the run"
).split()


def _corpus(lines: int = 200) -> list[str]:
    """A few KB of deterministic text."""
    return [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(12)) + f" {i}." for i in range(lines)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer (about 300 tokens) saved as a PreTrainedTokenizerFast folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    path = str(tmp_path_factory.mktemp("tokenizer"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS).save_pretrained(path)
    return path


def write_llama_config(folder, **overrides) -> str:
    """A tiny Llama config.json in ``folder``; vocab_size is deliberately not the tokenizer's (flame reconciles it)."""
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        **overrides,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.fixture(scope="session")
def llama_config():
    """The ``write_llama_config`` factory, for tests that need a config of their own."""
    return write_llama_config


@pytest.fixture(scope="session")
def tied_config(tmp_path_factory) -> str:
    return write_llama_config(tmp_path_factory.mktemp("tied_config"))


@pytest.fixture(scope="session")
def untied_config(tmp_path_factory) -> str:
    return write_llama_config(tmp_path_factory.mktemp("untied_config"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def hf_start(tmp_path_factory, byte_tokenizer) -> str:
    """A Hugging Face folder holding an untied tiny Llama (vocabulary = the byte tokenizer's): the runs' start."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flame.models.build import load_model_config

    root = tmp_path_factory.mktemp("hf_start")
    config = load_model_config(write_llama_config(root / "config"), AutoTokenizer.from_pretrained(byte_tokenizer))
    config.tie_word_embeddings = False
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    return str(root / "model")


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, hf_start, byte_tokenizer, fixed_docs) -> dict[str, dict]:
    """The real trainer, started from ``hf_start``: 2 FSDP ranks (tests.helpers.torchrun), and one process.

    Each run trains 4 steps, saves ``checkpoint/step-2`` and ``step-4``, and the trained model's logits on
    fixed ids.
    """
    import torch

    from tests.conftest import SEQ_LEN
    from tests.helpers import torchrun
    from tests.utils.train_and_dump import main as train_and_dump

    root = tmp_path_factory.mktemp("trained")
    ids = root / "ids.pt"
    torch.save(torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(3)), ids)
    runs = {}
    for layout, ranks in (("fsdp", 2), ("single", 1)):
        batch_size = 4 // ranks  # the same global batch of 4 rows
        dump = root / layout
        flags = {
            "job.dump_folder": dump, "model.config": hf_start, "model.tokenizer_path": byte_tokenizer,
            "checkpoint.initial_load_hf": hf_start, "checkpoint.enable_checkpoint": "true", "checkpoint.interval": 2,
            "training.dataset": "json", "training.data_files": fixed_docs, "training.seq_len": SEQ_LEN,
            "training.batch_size": batch_size, "training.steps": 4, "training.mixed_precision_param": "float32",
            "lr_scheduler.warmup_steps": 1, "optimizer.lr": "3e-3", "metrics.log_freq": 1,
        }  # fmt: skip
        args = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
        out = root / f"{layout}_logits.pt"
        if layout == "fsdp":
            proc = torchrun(2, [str(ids), str(out), *args], module="tests.utils.train_and_dump")
        else:
            train_and_dump(str(ids), str(out), args)
        runs[layout] = {
            "dump": str(dump), "checkpoint": str(dump / "checkpoint" / "step-4"), "config": hf_start,
            "tokenizer": byte_tokenizer, "reference": str(out), "ranks": ranks,
        }  # fmt: skip
        if layout == "fsdp":
            runs[layout]["stdout"] = proc.stdout
    return runs
