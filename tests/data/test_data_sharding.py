"""Data-parallel ranks x dataloader workers read disjoint documents that cover the dataset."""

from __future__ import annotations

import pytest

from flame.data import build_dataloader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_read_disjoint_documents(corpus, tokenizer, make_training, helpers, num_workers):
    path, docs = corpus  # 48 non-empty documents: divisible by every shard count used here
    world = 2
    shards = world * max(1, num_workers)
    per_shard = len(docs) // shards
    eos = tokenizer.eos_token_id
    all_tokens = sum(len(tokenizer.backend_tokenizer.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    # A shard's epoch never holds more tokens than the whole dataset: enough batches per worker.
    per_worker_batches = all_tokens // (2 * 33) + 2
    by_text = {d: i for i, d in enumerate(docs)}

    shard_docs = []  # one list of document ids per (rank, worker), first epoch only
    for rank in range(world):
        cfg = make_training(dataset=[path], num_workers=num_workers, seq_len=32, batch_size=2)
        loader = build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world)
        n_streams = max(1, num_workers)
        batches = helpers.take(loader, per_worker_batches * n_streams)
        for worker in range(n_streams):
            # StatefulDataLoader hands out the workers' batches round robin.
            mine = batches[worker::n_streams]
            stream = [t for w in helpers.windows(mine) for t in w]
            segments = helpers.split_on(stream, eos)[:per_shard]
            assert len(segments) == per_shard
            texts = [tokenizer.backend_tokenizer.decode(s) for s in segments]
            assert all(t in by_text for t in texts)
            ids = [by_text[t] for t in texts]
            assert len(set(ids)) == per_shard  # no document twice within one shard's epoch
            shard_docs.append(set(ids))

    assert len(shard_docs) == shards
    union = set().union(*shard_docs)
    assert union == set(range(len(docs)))  # every document is read ...
    assert sum(len(s) for s in shard_docs) == len(docs)  # ... by exactly one rank/worker


def test_too_few_documents_for_the_shards_is_a_config_error(tmp_path, tokenizer, make_training, helpers):
    from flame.config.errors import ConfigError

    path = helpers.write_jsonl(tmp_path / "three.jsonl", [{"text": "a b"}] * 3)
    cfg = make_training(dataset=[path], num_workers=2)
    with pytest.raises(ConfigError, match=r"--training.num_workers"):
        build_dataloader(cfg, tokenizer, dp_rank=0, dp_world_size=2)
