"""Streaming sources and exact resume of every kind of loader (mixing and varlen on)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from flame.data import build_dataloader


def _write_parts(tmp_path, helpers, docs: list[str], num_files: int) -> str:
    """``docs`` dealt round robin into ``num_files`` jsonl files; returns their glob."""
    folder = tmp_path / f"parts{num_files}"
    folder.mkdir()
    for f in range(num_files):
        helpers.write_jsonl(folder / f"part{f}.jsonl", [{"text": d} for d in docs[f::num_files]])
    return str(folder / "*.jsonl")


@pytest.mark.parametrize("num_files", [4, 3], ids=["files-per-shard", "rows-modulo-shards"])
def test_streaming_ranks_and_workers_read_every_document_once(tmp_path, tokenizer, make_training, helpers, num_files):
    docs = helpers.make_docs(48)
    glob = _write_parts(tmp_path, helpers, docs, num_files)
    world, num_workers = 2, 2
    per_shard = len(docs) // (world * num_workers)
    eos = tokenizer.eos_token_id
    by_text = {d: i for i, d in enumerate(docs)}
    all_tokens = sum(len(tokenizer.backend_tokenizer.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    per_worker_batches = all_tokens // (2 * 33) + 2

    shard_docs = []
    for rank in range(world):
        cfg = make_training(dataset=["json"], data_files=[glob], streaming=True, shuffle_buffer_size=5,
                            num_workers=num_workers, seq_len=32, batch_size=2)  # fmt: skip
        batches = helpers.take(build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world),
                               per_worker_batches * num_workers)  # fmt: skip
        for worker in range(num_workers):
            stream = [t for w in helpers.windows(batches[worker::num_workers]) for t in w]
            texts = [tokenizer.backend_tokenizer.decode(s) for s in helpers.split_on(stream, eos)[:per_shard]]
            assert len(texts) == per_shard and all(t in by_text for t in texts)
            shard_docs.append([by_text[t] for t in texts])
    assert sorted(i for ids in shard_docs for i in ids) == list(range(len(docs)))  # all, none twice
    assert any(ids != sorted(ids) for ids in shard_docs)  # the shuffle buffer reordered them


def test_streaming_shuffle_depends_on_the_seed(tmp_path, tokenizer, make_training, helpers):
    glob = _write_parts(tmp_path, helpers, helpers.make_docs(40), 2)

    def first(seed: int) -> list:
        cfg = make_training(dataset=["json"], data_files=[glob], streaming=True, shuffle_buffer_size=20, seed=seed)
        return helpers.windows(helpers.take(build_dataloader(cfg, tokenizer), 4))

    assert first(1) == first(1) and first(1) != first(2)


def _hash(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode() + batch[key].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_resume_with_mixing_and_varlen_continues_exactly(
    tmp_path, tokenizer, make_training, helpers, streaming, num_workers
):
    docs = helpers.make_docs(60, seed=3, max_words=60)
    glob = _write_parts(tmp_path, helpers, docs[:40], 4)
    other = helpers.write_jsonl(tmp_path / "other.jsonl", [{"text": d} for d in docs[40:]])
    cfg = make_training(dataset=["json", "json"], data_files=[glob, other], data_probs=[0.7, 0.3], varlen=True,
                        seq_len=48, context_len=20, batch_size=3, streaming=streaming, shuffle_buffer_size=4,
                        num_workers=num_workers, seed=11)  # fmt: skip
    rank, world = 1, 2
    snapshots_at, follow, total = (2, 5, 9, 16, 23), 12, 35
    loader = build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world)
    it = iter(loader)
    reference, states = [], {}
    for step in range(total):
        if step in snapshots_at:
            states[step] = loader.state_dict()
        reference.append(_hash(next(it)))
    counts = loader.source_counts()
    assert counts[0].sum() > 2 * 10, "the run should pass several epochs of the smaller source"
    for step, state in states.items():
        assert len(state[f"dp_rank_{rank}"]) < 60_000  # positions, not buffered documents
        fresh = build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world)
        fresh.load_state_dict(state)
        it = iter(fresh)
        resumed = [_hash(next(it)) for _ in range(follow)]
        assert resumed == reference[step : step + follow], f"resume at step {step} differs"
    fresh = build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world)
    it = iter(fresh)
    assert [_hash(next(it)) for _ in range(follow)] != reference[9 : 9 + follow]  # not trivially equal


def test_a_state_from_other_settings_is_rejected(tmp_path, tokenizer, make_training, helpers):
    path = helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in helpers.make_docs(10)])
    plain = build_dataloader(make_training(dataset=[path]), tokenizer)
    varlen = build_dataloader(make_training(dataset=[path], varlen=True, context_len=16), tokenizer)
    with pytest.raises(ValueError, match="packing"):
        varlen.dataset.load_state_dict(plain.dataset.state_dict())
    mixed = build_dataloader(make_training(dataset=[path, path]), tokenizer)
    with pytest.raises(ValueError, match="sources: saved 1, now 2"):
        mixed.dataset.load_state_dict(plain.dataset.state_dict())


def test_a_state_saved_by_the_first_loader_version_resumes(tokenizer, helpers):
    """Checkpoints of flame's first loader (state version 1: chunk start, tokens consumed, carry) still resume."""
    from flame.data.packing import PackedTextDataset

    docs = helpers.make_docs(30, seed=2)
    tok, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id

    def rows(dataset, n: int) -> list[list[int]]:
        it = iter(dataset)
        return [next(it)["input_ids"].tolist() for _ in range(n)]

    reference = rows(PackedTextDataset(docs, tok, eos, 16, seed=1, docs_per_chunk=4), 40)
    # Version 1 meant: the stream is carry + the tokens of the chunk at chunk_start, consumed tokens in.
    old = {"version": 1, "epoch": 0, "chunk_start": 0, "consumed": 3 * 17, "carry": [], "num_docs": 30, "seed": 1,
           "shard": [0, 1], "chunking": [4, 4_000_000]}  # fmt: skip
    resumed = PackedTextDataset(docs, tok, eos, 16, seed=1, docs_per_chunk=4)
    resumed.load_state_dict(old)
    assert rows(resumed, 37) == reference[3:]
