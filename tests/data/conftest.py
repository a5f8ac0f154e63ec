"""Shared fixtures for the data tests: a tiny BPE tokenizer, tiny jsonl corpora, small training configs.

Everything is local (no hub access) and small, so the whole data suite runs in seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flame.config.schema import Training

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = (
    "alpha beta gamma delta def return lambda class import yield tensor token über naïve "
    "shard worker epoch pack window seed 42 7 (x) [y] {z} == += -> # 😀"
).split()


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    """``n`` distinct documents; each starts with a unique marker ``doc <i>:``."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        sep = rng.choice([" ", "\n", "  "])
        docs.append(f"doc {i}:" + sep + " ".join(words) + rng.choice(["", "\n"]))
    return docs


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """Keep the Arrow caches that load_dataset writes out of the user's ~/.cache."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE (vocab 320) trained with the demo's own trainer, loaded back."""
    from transformers import AutoTokenizer

    from flame.data.demo import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(make_docs(300, seed=123), 320, str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.eos_token_id is not None
    return tok


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """48 distinct documents plus one empty one, as ``train.jsonl``; returns (path, docs)."""
    docs = make_docs(48)
    records = [{"text": d, "id": i} for i, d in enumerate(docs)]
    records.insert(5, {"text": "", "id": -1})  # empty documents must be skipped
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "train.jsonl", records)
    return path, docs


def training_config(**overrides) -> Training:
    """flame's ``[training]`` section with small rows and batches (and seed 0), plus ``overrides``.

    Rows come in stream order (``sequence_shuffle_buffer`` 0) unless a test sets it, so that a test can
    read the document stream back from the rows; the shuffle's own tests (test_data_shuffle.py) turn it on."""
    from flame.config.schema import Training

    small = {"batch_size": 2, "seq_len": 32, "context_len": 32, "seed": 0, "sequence_shuffle_buffer": 0}
    return dataclasses.replace(Training(), **{**small, **overrides})


@pytest.fixture
def make_training():
    return training_config


def take(loader, n: int) -> list[dict]:
    """The next ``n`` batches of a fresh iterator over ``loader``."""
    return list(itertools.islice(iter(loader), n))


def windows(batches) -> list[list[int]]:
    """Each row back as its ``seq_len + 1`` token window (inputs plus the last label)."""
    out = []
    for batch in batches:
        for inp, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            out.append(inp + lab[-1:])
    return out


def split_on(stream: list[int], eos: int) -> list[list[int]]:
    """Complete documents (tokens before each EOS) in a token stream; a tail is dropped."""
    docs, current = [], []
    for token in stream:
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs


@pytest.fixture
def helpers():
    return SimpleNamespace(take=take, windows=windows, split_on=split_on, make_docs=make_docs, write_jsonl=write_jsonl)
