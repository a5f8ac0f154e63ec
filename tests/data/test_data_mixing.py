"""Mixing several datasets by probability: realized shares, exact token accounting, epochs, errors."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from flame.config.errors import ConfigError
from flame.data import build_dataloader
from flame.data.mixing import describe_sources


@pytest.fixture(scope="module")
def byte_tok(byte_tokenizer):
    """One token per byte (no merges): token counts can be checked against characters."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(byte_tokenizer)


def _letter_docs(tmp_path, name: str, letter: str, n: int, seed: int) -> str:
    """``n`` documents made of one letter only (lengths 3..30), as a jsonl file."""
    from tests.data.conftest import write_jsonl

    rng = random.Random(seed)
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"text": letter * rng.randint(3, 30)} for _ in range(n)])


def test_realized_shares_match_the_probabilities_and_tokens_add_up(tmp_path, byte_tok, make_training, helpers):
    a = _letter_docs(tmp_path, "aaa", "a", 6000, 1)
    z = _letter_docs(tmp_path, "zzz", "z", 3000, 2)
    seq_len, batch_size = 64, 8
    cfg = make_training(dataset=["json", "json"], data_files=[a, z], data_probs=[0.8, 0.2], seq_len=seq_len,
                        batch_size=batch_size, seed=5)  # fmt: skip
    loader = build_dataloader(cfg, byte_tok)
    batches = helpers.take(loader, 400)
    documents, tokens = loader.source_counts()
    assert documents.sum() >= 10_000, "the test must see at least 10k documents"
    share = documents / documents.sum()
    assert abs(share[0] - 0.8) <= 0.02 and abs(share[1] - 0.2) <= 0.02, share

    # Token accounting is exact: every token of every row belongs to one source, and the letters say which.
    rows = np.concatenate([np.asarray(w) for w in helpers.windows(batches)])
    assert tokens.sum() == len(rows) == 400 * batch_size * (seq_len + 1)
    a_id, z_id = byte_tok.convert_tokens_to_ids("a"), byte_tok.convert_tokens_to_ids("z")
    eos = byte_tok.eos_token_id
    # EOS tokens count for the document they end: attribute them to the letter before them
    owner = np.where(rows == eos, np.roll(rows, 1), rows)
    first_row_start = rows[0]  # the first token's owner is its own letter (the stream starts at a document)
    assert first_row_start in (a_id, z_id)
    assert int((owner == a_id).sum()) == tokens[0] and int((owner == z_id).sum()) == tokens[1]

    # the loader reports the same facts as metric fields, next to the requested shares
    metrics = loader.source_metrics()
    assert metrics["source_requested/aaa"] == pytest.approx(0.8)
    assert metrics["source_documents/aaa"] + metrics["source_documents/zzz"] == documents.sum()
    assert metrics["source_token_share/zzz"] == pytest.approx(tokens[1] / tokens.sum())
    line = describe_sources(metrics)
    assert "aaa" in line and "requested 80.0%" in line and "requested 20.0%" in line


def test_mixing_is_seeded_per_rank(tmp_path, byte_tok, make_training, helpers):
    a = _letter_docs(tmp_path, "a", "a", 300, 1)
    z = _letter_docs(tmp_path, "z", "z", 300, 2)

    def first(rank: int, seed: int) -> list:
        cfg = make_training(dataset=["json", "json"], data_files=[a, z], data_probs=[1, 1], seq_len=32, seed=seed)
        return helpers.windows(helpers.take(build_dataloader(cfg, byte_tok, dp_rank=rank, dp_world_size=2), 6))

    assert first(0, 1) == first(0, 1)
    assert first(0, 1) != first(1, 1)  # ranks draw their own documents and sources
    assert first(0, 1) != first(0, 2)


def test_an_exhausted_source_restarts_with_a_new_epoch(tmp_path, byte_tok, make_training, helpers, caplog):
    small = _letter_docs(tmp_path, "small", "s", 5, 3)
    big = _letter_docs(tmp_path, "big", "b", 2000, 4)
    cfg = make_training(dataset=["json", "json"], data_files=[small, big], data_probs=[0.5, 0.5], seq_len=32)
    loader = build_dataloader(cfg, byte_tok)
    with caplog.at_level(logging.INFO, logger="flame.data"):
        helpers.take(loader, 60)
    rolled = [r.message for r in caplog.records if "'small'" in r.message and "reshuffling for epoch" in r.message]
    assert len(rolled) >= 5  # the small source went round many times ...
    documents, _ = loader.source_counts()
    assert abs(documents[0] / documents.sum() - 0.5) < 0.1  # ... and kept its share of the mixture
    assert not any("'big'" in r.message and "reshuffling" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"data_files": ["x.jsonl"]}, r"--training.data_files has 1 entries but --training.dataset has 2"),
        ({"data_probs": [0.5, 0.0]}, r"--training.data_probs must all be positive"),
        ({"data_probs": [0.5]}, r"--training.data_probs has 1 entries"),
        ({"dataset_name": ["a", "b", "c"]}, r"--training.dataset_name has 3 entries"),
        ({"dataset_split": ["train", "train", "x"]}, r"--training.dataset_split has 3 entries"),
    ],
)
def test_bad_mixing_settings_name_the_flag(byte_tok, make_training, overrides, needle):
    cfg = make_training(**{"dataset": ["json", "json"], "data_files": ["a.jsonl", "b.jsonl"], **overrides})
    with pytest.raises(ConfigError, match=needle):
        build_dataloader(cfg, byte_tok)


def test_validate_checks_the_data_settings_of_a_whole_config(train_args):
    from flame.config.loader import parse_args
    from flame.config.validate import validate

    def problems(**overrides) -> list[str]:
        try:
            validate(parse_args(train_args("v", **overrides)), 1)
        except ConfigError as e:
            return e.problems
        return []

    assert problems(training__dataset="json,json", training__data_probs="0.7,0.3") != []  # data_files: 1 for 2
    assert problems(training__varlen="true", training__context_len=16) == []
    assert any("--training.context_len must be in 2..seq_len" in p for p in problems(
        training__varlen="true", training__context_len=64))  # fmt: skip
    assert any("only applies with --training.varlen" in p for p in problems(training__context_len=16))
    assert problems(training__streaming="true", training__shuffle_buffer_size=4) == []
    assert any("--training.shuffle_buffer_size" in p for p in problems(training__shuffle_buffer_size=0))
    bad_validation = problems(validation__enable="true", validation__dataset="json,json", validation__data_files="v")
    assert bad_validation == [
        "--validation.data_files has 1 entries but --validation.dataset has 2: give one per dataset"
    ]
    pipelined = problems(training__varlen="true", training__context_len=16, experimental__pipeline_parallel_degree=2)
    assert any("--training.varlen does not work with --experimental.pipeline_parallel_degree" in p for p in pipelined)
