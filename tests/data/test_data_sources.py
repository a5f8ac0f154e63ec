"""Loading the supported kinds of sources, and clear ConfigErrors for bad ones."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from flame.config.errors import ConfigError
from flame.data import build_dataloader
from flame.data.flags import training_flags
from flame.data.sources import load_source, resolve_source, split_data_files


def _rows(cfg) -> int:
    return len(load_source(resolve_source(training_flags(cfg))))


# ------------------------------------------------------------------------------ errors


def test_missing_file_names_the_file(tmp_path, tokenizer, make_training):
    missing = str(tmp_path / "nope.jsonl")
    for cfg in (
        make_training(dataset=["json"], data_files=[missing]),
        make_training(dataset=[missing]),
    ):
        with pytest.raises(ConfigError, match=r"nope.jsonl"):
            build_dataloader(cfg, tokenizer)


def test_glob_matching_nothing_names_the_glob(tmp_path, tokenizer, make_training, helpers):
    helpers.write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    cfg = make_training(dataset=["parquet"], data_files=[str(tmp_path / "*.parquet")])
    with pytest.raises(ConfigError, match=r"\*\.parquet.*matches no files"):
        build_dataloader(cfg, tokenizer)


def test_missing_text_column_names_dataset_columns_and_flag(tmp_path, tokenizer, make_training, helpers):
    path = helpers.write_jsonl(tmp_path / "body.jsonl", [{"body": "x", "id": 1}] * 4)
    with pytest.raises(ConfigError) as err:
        build_dataloader(make_training(dataset=[path]), tokenizer)
    message = str(err.value)
    assert "body.jsonl" in message and "'body'" in message and "--training.text_column" in message

    with pytest.raises(ConfigError, match=r"'article'.*no such column"):
        build_dataloader(make_training(dataset=[path], text_column="article"), tokenizer)


def test_non_string_text_column(tmp_path, tokenizer, make_training, helpers):
    path = helpers.write_jsonl(tmp_path / "ints.jsonl", [{"text": i} for i in range(4)])
    with pytest.raises(ConfigError, match=r"non-string"):
        build_dataloader(make_training(dataset=[path]), tokenizer)


def test_builder_error_becomes_config_error(tmp_path, tokenizer, make_training):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(ConfigError, match=r"broken.jsonl.*could not load") as err:
        build_dataloader(make_training(dataset=[str(bad)]), tokenizer)
    assert err.value.__cause__ is not None  # the datasets error stays chained for debugging


def test_unknown_split_and_unknown_hub_name(tmp_path, tokenizer, make_training, helpers):
    folder = tmp_path / "splits"
    folder.mkdir()
    helpers.write_jsonl(folder / "train.jsonl", [{"text": "t"}] * 4)
    helpers.write_jsonl(folder / "validation.jsonl", [{"text": "v"}] * 4)
    with pytest.raises(ConfigError, match=r"could not load.*--training.dataset_split"):
        build_dataloader(make_training(dataset=[str(folder)], dataset_split=["test"]), tokenizer)
    with pytest.raises(ConfigError, match=r"no-such-owner/no-such-dataset"):
        build_dataloader(make_training(dataset=["no-such-owner/no-such-dataset"]), tokenizer)


def test_data_files_form_one_split_read_for_any_split_name(corpus, make_training, caplog):
    """datasets puts data_files into a split named "train"; asking them for another split reads that one."""
    path, docs = corpus
    with caplog.at_level(logging.INFO, logger="flame.data"):
        assert _rows(make_training(dataset=["json"], data_files=[path], dataset_split=["test"])) == len(docs) + 1
    assert any("form the one split 'train'; reading it for --training.dataset_split 'test'" in r.message
               for r in caplog.records)  # fmt: skip


def test_validation_section_json_with_data_files_reads_them_and_errors_name_the_section(
    corpus, tmp_path, tokenizer, make_training, helpers
):
    from flame.config.schema import Validation

    path, _ = corpus
    valid = helpers.write_jsonl(tmp_path / "valid.jsonl", [{"text": d} for d in helpers.make_docs(8, seed=4)])
    training = make_training(dataset=["json"], data_files=[path])
    # [validation] dataset = "json", data_files = "valid.jsonl": the natural way, with the default split
    validation = dataclasses.replace(Validation(), dataset=["json"], data_files=[valid], batch_size=3)
    assert Validation().dataset_split == ["validation"]
    batch = next(iter(build_dataloader(training, tokenizer, validation=validation)))
    tokens = {t for d in helpers.make_docs(8, seed=4) for t in tokenizer.backend_tokenizer.encode(d).ids}
    assert batch["input_ids"].shape == (3, 32) and set(batch["input_ids"].flatten().tolist()) <= tokens | {
        tokenizer.eos_token_id
    }

    def message(**overrides) -> str:
        with pytest.raises(ConfigError) as err:
            build_dataloader(training, tokenizer, validation=dataclasses.replace(validation, **overrides))
        return str(err.value)

    missing = message(data_files=[str(tmp_path / "nope.jsonl")])
    assert missing.startswith("--validation.data_files") and "nope.jsonl" in missing
    assert message(data_files=[]).startswith(
        "--validation.dataset 'json' is a datasets builder and needs --validation.data_files"
    )
    assert "--validation.data_files has 2 entries but --validation.dataset has 1" in message(data_files=[valid, valid])
    ints = helpers.write_jsonl(tmp_path / "ints.jsonl", [{"text": i} for i in range(4)])
    assert "of --validation.dataset 'json (" in message(data_files=[ints])
    # no --validation.dataset: the training data read with split "validation", which its data files lack
    borrowed = message(dataset=[], data_files=[])
    assert borrowed.startswith("--validation.dataset_split 'validation': --training.dataset 'json (")
    assert "read for validation: --validation.dataset is empty" in borrowed and "['train']" in borrowed
    assert "give held-out data with --validation.dataset and --validation.data_files" in borrowed


def test_builder_without_files_and_missing_data_dir(tmp_path, tokenizer, make_training):
    with pytest.raises(ConfigError, match=r"--training.data_files"):
        build_dataloader(make_training(dataset=["json"]), tokenizer)
    with pytest.raises(ConfigError, match=r"--training.data_dir 'nowhere'"):
        build_dataloader(make_training(dataset=["json"], data_dir=["nowhere"]), tokenizer)


def test_several_datasets_streaming_and_varlen_build(corpus, tokenizer, make_training):
    """Once refused as "not supported yet"; now each builds a loader whose batches have the right shape."""
    path, _ = corpus
    for overrides in ({"dataset": [path, path]}, {"streaming": True}, {"varlen": True, "context_len": 16}):
        batch = next(iter(build_dataloader(make_training(**{"dataset": [path], **overrides}), tokenizer)))
        assert batch["input_ids"].shape == (2, 32)


# ----------------------------------------------------------------------------- sources


def test_split_data_files():
    assert split_data_files(" a.jsonl ; dir/*.jsonl;;") == ["a.jsonl", "dir/*.jsonl"]


def test_builder_with_several_files_glob_and_data_dir(tmp_path, make_training, helpers):
    (tmp_path / "part").mkdir()
    helpers.write_jsonl(tmp_path / "part" / "a.jsonl", [{"text": "a"}] * 3)
    helpers.write_jsonl(tmp_path / "part" / "b.jsonl", [{"text": "b"}] * 4)
    helpers.write_jsonl(tmp_path / "c.jsonl", [{"text": "c"}] * 5)
    files = f"{tmp_path}/part/*.jsonl;{tmp_path}/c.jsonl"
    assert _rows(make_training(dataset=["json"], data_files=[files])) == 12
    # relative data_files resolve against data_dir, as in datasets
    cfg = make_training(dataset=["json"], data_dir=[str(tmp_path)], data_files=["part/a.jsonl"])
    assert _rows(cfg) == 3
    cfg = make_training(dataset=["json"], data_dir=[str(tmp_path)], data_files=["part/z.jsonl"])
    with pytest.raises(ConfigError, match=r"part/z.jsonl"):
        resolve_source(training_flags(cfg))


def test_local_folder_and_save_to_disk(tmp_path, make_training, helpers):
    import datasets

    folder = tmp_path / "corpus"
    folder.mkdir()
    helpers.write_jsonl(folder / "train.jsonl", [{"text": "t"}] * 6)
    helpers.write_jsonl(folder / "validation.jsonl", [{"text": "v"}] * 2)
    assert _rows(make_training(dataset=[str(folder)])) == 6
    assert _rows(make_training(dataset=[str(folder)], dataset_split=["validation"])) == 2

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["a", "b", "c"]}).save_to_disk(str(saved))
    src = resolve_source(training_flags(make_training(dataset=[str(saved)])))
    assert src.kind == "disk" and len(load_source(src)) == 3

    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"] * 4})}).save_to_disk(str(saved_dict))
    assert _rows(make_training(dataset=[str(saved_dict)])) == 4
    with pytest.raises(ConfigError, match=r"'validation'.*split\(s\) \['train'\]"):
        _rows(make_training(dataset=[str(saved_dict)], dataset_split=["validation"]))


def test_parquet_and_text_builders(tmp_path, tokenizer, make_training, helpers):
    import datasets

    datasets.Dataset.from_dict({"text": helpers.make_docs(8)}).to_parquet(str(tmp_path / "d.parquet"))
    assert _rows(make_training(dataset=["parquet"], data_files=[str(tmp_path / "*.parquet")])) == 8
    lines = tmp_path / "lines.txt"
    lines.write_text("one line\nanother line\nthird\n")
    cfg = make_training(dataset=[str(lines)], seq_len=4, batch_size=1)
    batch = next(iter(build_dataloader(cfg, tokenizer)))
    assert batch["input_ids"].shape == (1, 4)


def test_relative_paths_resolve_against_the_working_directory(tmp_path, make_training, helpers, monkeypatch):
    helpers.write_jsonl(tmp_path / "rel.jsonl", [{"text": "r"}] * 2)
    monkeypatch.chdir(tmp_path)
    assert _rows(make_training(dataset=["json"], data_files=["rel.jsonl"])) == 2
    assert _rows(make_training(dataset=[os.path.join(".", "rel.jsonl")])) == 2
