"""The stdlib demo corpus: splits, tokenizer, caching, and training data built from it."""

from __future__ import annotations

import json
import os

import pytest

from flame.data.demo import _hash_bucket, build_demo, main, split_documents, stdlib_files


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "demo")
    return build_demo(out, vocab_size=512, max_files=50, verbose=False)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_chunks_rebuild_their_file_and_stay_small():
    from flame.data.demo import chunk_documents

    paragraphs = [f"def f{i}():\n    return {i}" for i in range(200)]
    text = "\n\n".join(paragraphs)
    pieces = chunk_documents([{"text": text, "path": "a.py"}], max_chars=300)
    assert len(pieces) > 5
    assert [p["chunk"] for p in pieces] == list(range(len(pieces)))
    assert "\n\n".join(p["text"] for p in pieces) == text
    assert all(len(p["text"]) <= 300 for p in pieces)


def test_demo_builds_both_splits_and_a_loadable_tokenizer(demo):
    from transformers import AutoTokenizer

    assert demo["reused"] is False and demo["file_count"] == 50
    train, val = _read(demo["paths"]["train"]), _read(demo["paths"]["validation"])
    assert len(train) == demo["train_documents"] > 0
    assert len(val) == demo["validation_documents"] > 0
    files = {r["path"] for r in train} | {r["path"] for r in val}
    assert len(files) == demo["train_files"] + demo["validation_files"]
    assert len(files) + demo["skipped_not_utf8"] + demo["skipped_empty"] == 50
    assert len(train) > demo["train_files"]  # files are cut into pieces
    assert {r["path"] for r in train}.isdisjoint(r["path"] for r in val)
    assert all(r["text"] and r["path"].endswith(".py") for r in train + val)
    assert not any("site-packages" in r["path"] for r in train + val)

    tok = AutoTokenizer.from_pretrained(demo["paths"]["tokenizer"])
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert len(tok) == 512
    text = val[0]["text"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round-trips any source file
    assert len(ids) < 0.75 * len(text.encode())  # and it learned real merges


def test_second_build_is_cached_and_force_rebuilds(demo, capsys):
    out = demo["out_dir"]
    mtime = os.path.getmtime(demo["paths"]["train"])
    again = build_demo(out, vocab_size=512, max_files=50, verbose=False)
    assert again["reused"] is True
    assert os.path.getmtime(demo["paths"]["train"]) == mtime
    assert main(["--out", out, "--vocab-size", "512", "--max-files", "50"]) == 0
    assert "reusing" in capsys.readouterr().out
    # another vocab size does not match the manifest: rebuilt
    assert build_demo(out, vocab_size=300, max_files=50, verbose=False)["reused"] is False
    rebuilt = build_demo(out, vocab_size=512, max_files=50, force=True, verbose=False)
    assert rebuilt["reused"] is False
    assert rebuilt["train_documents"] == demo["train_documents"]  # deterministic


def test_validation_split_is_a_stable_two_percent():
    _, files = stdlib_files()
    docs = [{"path": p, "text": ""} for p in files]
    _, val = split_documents(docs)
    assert 0.01 < len(val) / len(docs) < 0.035
    assert {d["path"] for d in val} == {p for p in files if _hash_bucket(p) < 200}
    assert _hash_bucket("json/__init__.py") == _hash_bucket("json/__init__.py") < 10_000
    # tiny corpora still get one validation document
    assert len(split_documents(docs[:3])[1]) == 1


def test_bad_vocab_size_exits_with_code_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--vocab-size", "100"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def test_demo_folder_feeds_the_loader(demo, make_training):
    from transformers import AutoTokenizer

    from flame.data import build_dataloader

    tok = AutoTokenizer.from_pretrained(demo["paths"]["tokenizer"])
    cfg = make_training(dataset=[demo["out_dir"]], seq_len=64, batch_size=2, num_workers=0)
    batch = next(iter(build_dataloader(cfg, tok)))
    assert batch["input_ids"].shape == (2, 64)
    assert int(batch["input_ids"].max()) < len(tok)


def test_the_demo_toml_validates_on_its_file_with_the_default_split(demo):
    """configs/demo.toml's [validation] names json + validation.jsonl and no split: no workaround needed."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from flame.config.loader import parse_args
    from flame.data import build_dataloader

    toml = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
    assert "dataset_split" not in toml.read_text()
    paths = demo["paths"]
    config = parse_args(["--job.config_file", str(toml), "--training.data_files", paths["train"],
                         "--validation.data_files", paths["validation"], "--training.seq_len", "64"])  # fmt: skip
    assert config.validation.dataset_split == ["validation"]
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    batch = next(iter(build_dataloader(config.training, tok, validation=config.validation)))
    assert batch["input_ids"].shape == (config.validation.batch_size, 64)
    start = tok.decode(batch["input_ids"][0][:8])  # the first row starts a validation document
    assert any(r["text"].startswith(start) for r in _read(paths["validation"]))
