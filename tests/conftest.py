"""Session fixtures: a byte-level tokenizer, fixed-length documents, and a tiny Llama config.

The tokenizer has no merges, so every byte is one token: a document of ``SEQ_LEN`` ASCII bytes is
exactly one packed row with its EOS, which makes the global batch identical for any number of
data-parallel ranks (documents are dealt to ranks in turn).
"""

from __future__ import annotations

import json
import os
import random

import pytest

import flame.models.families  # noqa: F401  (registers the model families, as the trainer and the CLI do)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

SEQ_LEN = 32
NUM_DOCS = 400


def make_byte_tokenizer(path: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory) -> str:
    return make_byte_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def write_fixed_docs(path: str | os.PathLike) -> str:
    """NUM_DOCS documents of SEQ_LEN lowercase letters/spaces: each is one row of SEQ_LEN + EOS tokens."""
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "value"]
    with open(path, "w") as f:
        for _ in range(NUM_DOCS):
            text = ""
            while len(text) < SEQ_LEN:
                text += rng.choice(words) + " "
            f.write(json.dumps({"text": text[:SEQ_LEN]}) + "\n")
    return str(path)


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 257,
    "tie_word_embeddings": False,
}


def write_tiny_llama(path: str | os.PathLike, **overrides) -> str:
    with open(path, "w") as f:
        json.dump({**TINY_LLAMA, **overrides}, f)
    return str(path)


@pytest.fixture(scope="session")
def fixed_docs(tmp_path_factory) -> str:
    return write_fixed_docs(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "llama_tiny.json")


@pytest.fixture
def train_args(byte_tokenizer, fixed_docs, tiny_llama, tmp_path):
    """Flags for a small, fast, fully specified training run in a fresh dump folder."""

    def make(dump: str = "run", **overrides) -> list[str]:
        flags = {
            "job.dump_folder": str(tmp_path / dump),
            "model.config": tiny_llama,
            "model.tokenizer_path": byte_tokenizer,
            "training.dataset": "json",
            "training.data_files": fixed_docs,
            "training.seq_len": str(SEQ_LEN),
            "training.batch_size": "4",
            "training.steps": "10",
            "training.mixed_precision_param": "float32",
            "lr_scheduler.warmup_steps": "2",
            "optimizer.lr": "3e-3",
            "metrics.log_freq": "1",
        }
        flags.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
        args = []
        for key, value in flags.items():
            args += [f"--{key}", value]
        return args

    return make


# pytest-timeout: a hung test (a rank waiting on a dead peer, a Slurm job that never starts) fails with
# its stack instead of stalling CI. The default (pyproject's `timeout`) fits the default suite's longest
# test several times over; the slow tier's scenarios (kill-and-resume of whole experiments, Slurm requeue)
# get SLOW_TIMEOUT unless they set their own.
SLOW_TIMEOUT = 1800


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
