"""Real torchrun ranks: shards cover the data once; training data resumes exactly (mixing + varlen)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.data.conftest import make_docs, write_jsonl
from tests.helpers import read_metrics, torchrun


def _hashes(dump, rank: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    with open(dump / f"batches_rank{rank}.jsonl") as f:
        for line in f:
            record = json.loads(line)
            out.setdefault(record["step"], []).append(record["hash"])
    return out


@pytest.mark.parametrize(
    ("streaming", "num_workers"),
    # map-style without workers is also covered in one process by test_data_streaming (fast); here slow
    [pytest.param(False, 0, marks=pytest.mark.slow), pytest.param(True, 2, marks=pytest.mark.slow)],  # ~46 s
    ids=["map-0-workers", "stream-2-workers"],
)
def test_resumed_training_sees_the_same_batches_on_every_rank(train_args, tmp_path, streaming, num_workers):
    docs = make_docs(120, seed=8, max_words=30)
    parts = tmp_path / "parts"
    parts.mkdir()
    for f in range(4):
        write_jsonl(parts / f"part{f}.jsonl", [{"text": d} for d in docs[f:80:4]])
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": d} for d in docs[80:]])
    args = train_args(
        "run", training__dataset="json,json", training__data_files=f"{parts}/*.jsonl,{other}",
        training__data_probs="0.7,0.3", training__varlen="true", training__context_len=16,
        training__batch_size=2, training__gradient_accumulation_steps=2, training__steps=6,
        training__streaming=str(streaming).lower(), training__shuffle_buffer_size=8,
        training__num_workers=num_workers, checkpoint__enable_checkpoint="true", checkpoint__interval=3,
    )  # fmt: skip
    dump = tmp_path / "run"
    torchrun(2, args, module="tests.data.record_batches")
    first = [_hashes(dump, r) for r in range(2)]
    uninterrupted = read_metrics(dump)
    assert sorted(first[0]) == list(range(1, 7)) and first[0] != first[1]  # ranks see different data

    shutil.rmtree(dump / "checkpoint" / "step-6")  # as if the job died after step 5: resume at step 3
    torchrun(2, args, module="tests.data.record_batches")
    for rank in range(2):
        both = _hashes(dump, rank)
        for step in (4, 5, 6):
            assert both[step][0] == both[step][1], f"rank {rank}, step {step}: another batch after the resume"
        assert len(both[1]) == 1  # steps 1-3 were not run again
    resumed = read_metrics(dump)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert a["loss"] == b["loss"], (a, b)
        # realized per-source counts live in the checkpointed data state: they continue too
        shares = {k: v for k, v in a.items() if k.startswith("source_")}
        assert shares and shares == {k: v for k, v in b.items() if k.startswith("source_")}
    last = resumed[-1]
    # every token of every row, summed over the ranks: steps x ranks x micro-batches x rows x seq_len
    assert last["source_tokens/parts"] + last["source_tokens/other"] == 6 * 2 * 2 * 2 * 32


def test_two_ranks_by_two_workers_read_every_document_once_per_epoch(tmp_path, tokenizer):
    docs = make_docs(48, seed=6)
    folder = tmp_path / "files"
    folder.mkdir()
    for f in range(4):
        write_jsonl(folder / f"p{f}.jsonl", [{"text": d} for d in docs[f::4]])
    three = tmp_path / "three"
    three.mkdir()
    for f in range(3):
        write_jsonl(three / f"p{f}.jsonl", [{"text": d} for d in docs[f::3]])
    tokens = sum(len(tokenizer.backend_tokenizer.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    spec = {
        "tokenizer": tokenizer.name_or_path,
        "out": str(tmp_path),
        "num_docs": len(docs),
        "num_workers": 2,
        "batches_per_worker": tokens // (2 * 33) + 2,  # a shard's epoch never holds more than all tokens
        "cases": {
            "map": {"dataset": ["json"], "data_files": [f"{folder}/*.jsonl"]},
            "stream_files": {"dataset": ["json"], "data_files": [f"{folder}/*.jsonl"], "streaming": True,
                             "shuffle_buffer_size": 5},
            "stream_rows": {"dataset": ["json"], "data_files": [f"{three}/*.jsonl"], "streaming": True,
                            "shuffle_buffer_size": 5},
        },
    }  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(2, [str(tmp_path / "spec.json")], module="tests.data.probe_shards")
    for case in spec["cases"]:
        shards = [w for r in range(2) for w in json.loads((tmp_path / f"{case}_rank{r}.json").read_text())]
        assert len(shards) == 4 and all(len(w) == 12 for w in shards), case
        seen = [text for w in shards for text in w]
        assert sorted(seen) == sorted(docs), f"{case}: documents missing or read twice"
