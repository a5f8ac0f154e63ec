"""The demo's helpers: the data-limited subset stage function and the Table 1 numbers from a status record."""

from __future__ import annotations

import json

import pytest

from flame.distill.subset import first_documents
from flame.distill.table import distill_table, markdown


def test_first_documents(tmp_path, fixed_docs):
    target = tmp_path / "sub" / "subset.jsonl"
    result = first_documents(fixed_docs, 7, str(target))
    lines = target.read_text().splitlines()
    assert len(lines) == 7 and lines == open(fixed_docs).read().splitlines()[:7]
    assert result == {"documents": 7, "bytes": sum(len(line) + 1 for line in lines)}
    with pytest.raises(ValueError, match="holds 400 documents, fewer than the 401 asked for"):
        first_documents(fixed_docs, 401, str(target))


def test_table_pairs_seeds_and_computes_the_gap_closed(tmp_path, tiny_llama, byte_tokenizer, teacher_model_json):
    def run(name: str, model: str) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.toml").write_text(f'[model]\nconfig = "{model}"\ntokenizer_path = "{byte_tokenizer}"\n')
        return str(folder)

    def trial(seed: int, metric: float, folder: str, status: str = "done") -> dict:
        return {"params": {"training.seed": seed}, "status": status, "metric": metric, "dump_folder": folder}

    student = run("s", tiny_llama)
    status = {"stages": [
        {"name": "teacher", "trials": [trial(0, 3.0, run("t", teacher_model_json)), trial(1, 9.0, student)]},
        {"name": "scratch", "trials": [trial(0, 5.0, student), trial(1, 4.0, student), trial(2, 4.0, student)]},
        {"name": "distilled", "trials": [trial(0, 4.0, student), trial(1, 3.5, student),
                                         trial(2, 1.0, student, "failed")]},
    ]}  # fmt: skip
    numbers = distill_table(status, "teacher", [("scratch", "distilled")])
    assert numbers["teacher"]["loss"] == 3.0
    (pair,) = numbers["pairs"]
    assert [(r["seed"], r["d"], r["g"]) for r in pair["rows"]] == [(0, 1.0, 0.5), (1, 0.5, 0.5)]
    assert (pair["mean_d"], pair["range_d"], pair["mean_g"]) == (0.75, 0.5, 0.5)
    assert pair["std_d"] == pytest.approx(0.3535534, rel=1e-6)
    assert pair["params"] > numbers["teacher"]["params"] > 0  # each model counted (this "teacher" is smaller)
    text = markdown(numbers)
    assert "| 0 | 3.0000 | 5.0000 | 4.0000 | +1.0000 | 50.0 % |" in text
    assert json.dumps(numbers)  # --json prints it
