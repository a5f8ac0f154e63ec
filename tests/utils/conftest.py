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
