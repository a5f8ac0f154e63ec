"""Offline preprocessing (``python -m flame.utils.preprocess``) and the data inspector CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from flame.config.errors import ConfigError
from flame.data import build_dataloader
from tests.helpers import PYTHON, run


@pytest.fixture(scope="module")
def corpus_and_tokenized(tmp_path_factory, tokenizer):
    """A corpus with an empty document and one longer than a part, and its preprocessed folder (CLI, 2 procs)."""
    from tests.data.conftest import make_docs, write_jsonl

    folder = tmp_path_factory.mktemp("pre")
    docs = make_docs(80, seed=4)
    docs[7] = ""  # kept as an empty row so the seeded document order stays the online one
    path = write_jsonl(folder / "corpus.jsonl", [{"content": d} for d in docs])
    out = folder / "tokenized"
    proc = run([PYTHON, "-m", "flame.utils.preprocess", "--dataset", "json", "--data_files", path,
                "--tokenizer_path", tokenizer.name_or_path, "--output", str(out), "--num_proc", "2"])  # fmt: skip
    assert "wrote 80 documents" in proc.stdout
    return path, str(out)


def test_preprocessed_folder_gives_the_same_batches_as_online_tokenization(
    corpus_and_tokenized, tokenizer, make_training, helpers
):
    path, tokenized = corpus_and_tokenized
    meta = json.loads((Path(tokenized) / "flame_tokenized.json").read_text())
    assert meta["num_documents"] == 80 and meta["text_column"] == "content"
    for extra in ({}, {"varlen": True, "context_len": 16, "seq_len": 40}):
        online = build_dataloader(make_training(dataset=["json"], data_files=[path], seed=3, **extra), tokenizer)
        offline = build_dataloader(make_training(dataset=[tokenized], seed=3, **extra), tokenizer)
        a, b = helpers.take(online, 40), helpers.take(offline, 40)
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    # mixed with an online source, the preprocessed one draws the very same documents
    cfg = dict(dataset=[tokenized, "json"], data_files=["", path], data_probs=[0.5, 0.5], seed=9)
    online = build_dataloader(
        make_training(**{**cfg, "dataset": ["json", "json"], "data_files": [path, path]}), tokenizer
    )
    mixed = build_dataloader(make_training(**cfg), tokenizer)
    assert helpers.windows(helpers.take(online, 30)) == helpers.windows(helpers.take(mixed, 30))


def test_preprocessed_folder_from_another_tokenizer_is_refused(corpus_and_tokenized, make_training, byte_tokenizer):
    from transformers import AutoTokenizer

    _, tokenized = corpus_and_tokenized
    other = AutoTokenizer.from_pretrained(byte_tokenizer)
    with pytest.raises(ConfigError, match=r"tokenized with another tokenizer.*--model.tokenizer_path"):
        build_dataloader(make_training(dataset=[tokenized]), other)


def test_preprocess_bad_input_exits_2(tmp_path, tokenizer, capsys):
    from flame.utils.preprocess import main

    args = ["--dataset", str(tmp_path / "missing.jsonl"), "--tokenizer_path", tokenizer.name_or_path]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _inspect(args: list[str], **kw):
    return run([PYTHON, "-m", "flame.data.inspect", *args], **kw)


def test_inspector_reports_shares_packing_and_throughput(tmp_path, corpus_and_tokenized, tokenizer, tiny_llama, capsys):
    path, tokenized = corpus_and_tokenized
    toml = tmp_path / "mix.toml"
    toml.write_text(
        f"""[model]
config = "{tiny_llama}"
tokenizer_path = "{tokenizer.name_or_path}"
[training]
dataset = ["{tokenized}", "json"]
data_files = ["", "{path}"]
data_probs = [0.75, 0.25]
seq_len = 48
batch_size = 4
varlen = true
context_len = 16
"""
    )
    proc = _inspect(["--job.config_file", str(toml), "--steps", "30", "--json", "--world_size", "2", "--rank", "1"])
    report = json.loads(proc.stdout)
    assert report["rank"] == 1 and report["dp_world_size"] == 2 and report["batches"] == 30
    sources = report["sources"]
    assert [s["name"] for s in sources] == ["tokenized", "corpus"]
    assert [s["requested"] for s in sources] == [0.75, 0.25]
    assert sum(s["realized_tokens"] for s in sources) == 30 * 4 * 48
    assert sum(s["document_share"] for s in sources) == pytest.approx(1.0)
    assert all(0 < s["token_share"] < 1 for s in sources)
    assert 0.8 < report["packing_efficiency"] < 1.0 and report["padding_fraction"] == 0.0
    assert report["tokens_per_second"] > 0
    assert report["samples"] and all(seg["text"] for row in report["samples"] for seg in row)
    # distinct documents per batch, with the (automatic) sequence shuffle and in stream order
    assert report["sequence_shuffle_window_steps"] >= 2
    assert report["documents_per_batch"] > report["documents_per_batch_stream_order"] >= 1
    from flame.data.inspect import main

    assert main(["--job.config_file", str(toml), "--steps", "3"]) == 0
    human = capsys.readouterr().out
    assert re.search(r"(document|piece) boundary", human)
    assert "packing efficiency" in human and "tokens/s" in human
    assert re.search(r"distinct documents per batch: [\d.]+ \(sequence shuffle: windows of \d+ steps", human)
    assert "in stream order (--training.sequence_shuffle_buffer 0)" in human
    assert "tokenized" in human and "75.0%" in human
    assert main(["--job.config_file", str(toml), "--training.data_probs", "1,-1"]) == 2
    err = capsys.readouterr().err
    assert "--training.data_probs" in err and "Traceback" not in err
