"""Exact resume: a loader rebuilt from ``state_dict()`` continues with the very same batches."""

from __future__ import annotations

import pickle

import pytest
import torch

from flame.data import build_dataloader


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_round_trip_continues_exactly(tmp_path, tokenizer, make_training, helpers, num_workers):
    # 12 short documents: one worker's epoch lasts a few batches, so the later snapshot
    # lands after an epoch rollover (the carried-over tokens must survive the resume).
    docs = helpers.make_docs(12, seed=9, max_words=25)
    path = helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    cfg = make_training(dataset=[path], num_workers=num_workers, seq_len=24, batch_size=2)
    snapshots_at, follow = (3, 14), 8

    loader = build_dataloader(cfg, tokenizer, dp_rank=1, dp_world_size=2)
    it = iter(loader)
    reference, states = [], {}
    for step in range(max(snapshots_at) + follow):
        if step in snapshots_at:
            states[step] = loader.state_dict()
        reference.append(next(it))
    assert loader.state_dict().keys() == {"dp_rank_1", "world_size"}
    epochs = [s["epoch"] for s in _dataset_states(states[14])]
    assert len(epochs) == max(1, num_workers) and min(epochs) >= 1, "the test should cross an epoch boundary"

    for step, state in states.items():
        # the saved position stays small: no tokenized chunk inside it
        assert len(state["dp_rank_1"]) < 20_000
        fresh = build_dataloader(cfg, tokenizer, dp_rank=1, dp_world_size=2)
        fresh.load_state_dict(state)
        resumed = helpers.take(fresh, follow)
        assert _same(resumed, reference[step : step + follow]), f"resume at step {step} differs"

    # and without loading, a fresh loader starts over (so the equality above is not trivial)
    fresh = build_dataloader(cfg, tokenizer, dp_rank=1, dp_world_size=2)
    assert not _same(helpers.take(fresh, follow), reference[14 : 14 + follow])


def _dataset_states(loader_state):
    """The packing dataset's state(s) (one per worker) inside a ParallelAwareDataloader state."""
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            if "chunk_start" in obj and "epoch" in obj:
                found.append(obj)
            for value in obj.values():
                walk(value)

    walk(pickle.loads(loader_state["dp_rank_1"]))
    return found


def test_state_from_other_data_is_rejected(tokenizer):
    from flame.data.packing import PackedTextDataset

    a = PackedTextDataset(["x y z"] * 4, tokenizer.backend_tokenizer, tokenizer.eos_token_id, 8)
    b = PackedTextDataset(["x y z"] * 5, tokenizer.backend_tokenizer, tokenizer.eos_token_id, 8)
    with pytest.raises(ValueError, match="num_docs"):
        b.load_state_dict(a.state_dict())


def test_chunk_size_does_not_change_the_stream_and_resume_finds_the_chunk(tokenizer, helpers):
    """Many small tokenizer chunks give the same rows as one big chunk; resume works mid-chunk
    even when the resuming dataset was built with other chunk settings (it adopts the saved ones)."""
    from flame.data.packing import PackedTextDataset

    docs = helpers.make_docs(30, seed=2)
    tok, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id

    def big():
        return PackedTextDataset(docs, tok, eos, 16, seed=1)

    def small():
        return PackedTextDataset(docs, tok, eos, 16, seed=1, docs_per_chunk=3, max_chunk_chars=60)

    def run(ds, n):
        it, rows, states = iter(ds), [], []
        for _ in range(n):
            states.append(ds.state_dict())
            row = next(it)
            rows.append(row["input_ids"].tolist() + row["labels"][-1:].tolist())
        return rows, states

    n = 120  # more than one epoch of rows
    reference, big_states = run(big(), n)
    rows, small_states = run(small(), n)
    assert rows == reference
    assert max(s["epoch"] for s in small_states) >= 1
    for k in (1, 9, 40, 77, 101):
        for states, make in ((small_states, big), (big_states, small)):
            fresh = make()
            fresh.load_state_dict(states[k])
            assert run(fresh, n - k)[0] == reference[k:], k
