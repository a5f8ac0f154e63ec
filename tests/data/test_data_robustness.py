"""Bad and awkward input: empty documents, missing columns, non-strings, bad UTF-8, huge documents."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from flame.config.errors import ConfigError
from flame.data import build_dataloader


@pytest.fixture(scope="module")
def byte_tok(byte_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(byte_tokenizer)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_empty_and_null_documents_are_skipped(tmp_path, byte_tok, make_training, helpers, streaming):
    records = [{"text": "one"}, {"text": ""}, {"text": None}, {"text": "two"}, {"text": ""}, {"text": "three"}]
    path = helpers.write_jsonl(tmp_path / "e.jsonl", records)
    cfg = make_training(dataset=[path], streaming=streaming, seq_len=8, batch_size=1)
    stream = [t for w in helpers.windows(helpers.take(build_dataloader(cfg, byte_tok), 6)) for t in w]
    docs = [byte_tok.decode(d) for d in helpers.split_on(stream, byte_tok.eos_token_id)]
    assert set(docs) == {"one", "two", "three"}  # no lone EOS from the empty ones


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_missing_or_non_string_text_column_names_file_and_column(tmp_path, byte_tok, make_training, helpers, streaming):
    body = helpers.write_jsonl(tmp_path / "body.jsonl", [{"body": "x"}] * 4)
    with pytest.raises(ConfigError, match=r"body\.jsonl.*'body'.*--training.text_column"):
        build_dataloader(make_training(dataset=[body], streaming=streaming), byte_tok)
    ints = helpers.write_jsonl(tmp_path / "ints.jsonl", [{"text": i} for i in range(4)])
    with pytest.raises(
        ConfigError, match=r"column 'text' of --training.dataset 'json \(.*ints\.jsonl\)' holds non-string"
    ):
        build_dataloader(make_training(dataset=["json"], data_files=[ints], streaming=streaming), byte_tok)


def test_a_non_string_value_deep_in_a_stream_is_named(tmp_path, byte_tok, make_training, helpers):
    # The first file declares strings; a later one holds a list: found only while reading.
    good = helpers.write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}] * 3)
    bad = helpers.write_jsonl(tmp_path / "b.jsonl", [{"text": ["not", "a", "string"]}] * 3)
    cfg = make_training(dataset=["json"], data_files=[f"{good};{bad}"], streaming=True, seq_len=4, batch_size=1)
    with pytest.raises(ConfigError, match=r"a\.jsonl;.*b\.jsonl"):
        helpers.take(build_dataloader(cfg, byte_tok), 20)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("suffix", ["jsonl", "txt"])
def test_non_utf8_text_is_a_clear_error_naming_the_file(tmp_path, byte_tok, make_training, streaming, suffix):
    path = tmp_path / f"latin1.{suffix}"
    line = b'{"text": "caf\xe9"}\n' if suffix == "jsonl" else b"caf\xe9\n"
    path.write_bytes(line * 3)
    with pytest.raises(ConfigError, match=rf"latin1\.{suffix}.*(UTF-8|utf-8)") as err:
        next(iter(build_dataloader(make_training(dataset=[str(path)], streaming=streaming), byte_tok)))
    assert "Traceback" not in str(err.value)


def test_a_huge_document_is_streamed_in_pieces(tmp_path, byte_tok, make_training, monkeypatch, helpers):
    import flame.data.documents as documents

    monkeypatch.setattr(documents, "MAX_PART_CHARS", 200_000)
    huge = "word " * 400_000  # 2M characters and tokens, far beyond seq_len
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": huge}) + "\n" + json.dumps({"text": "tail"}) + "\n")
    cfg = make_training(dataset=[str(path)], streaming=True, seq_len=4096, batch_size=8)
    it = iter(build_dataloader(cfg, byte_tok))
    tracemalloc.start()
    batches = [next(it) for _ in range(len(huge) // (8 * 4097) + 3)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Whole, the document's ids would be a 2M-entry list plus a 16 MB array, and the stream a copy of both.
    assert peak < 30e6, f"peak {peak / 1e6:.0f} MB"
    stream = [t for w in helpers.windows(batches) for t in w]
    docs = [byte_tok.decode(d) for d in helpers.split_on(stream, byte_tok.eos_token_id)]
    assert huge in docs  # the pieces join up to exactly the document
