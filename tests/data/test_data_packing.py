"""Packing, determinism and epoch rollover of the training data loader."""

from __future__ import annotations

import logging
import math

import torch

from flame.data import build_dataloader


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _epoch_tokens(tokenizer, docs) -> int:
    return sum(len(_encode(tokenizer, d)) + 1 for d in docs if d)


def test_rows_are_shifted_windows_of_the_document_stream(corpus, tokenizer, make_training, helpers):
    path, docs = corpus
    seq_len, batch_size = 32, 2
    cfg = make_training(dataset=[path], seq_len=seq_len, batch_size=batch_size)
    loader = build_dataloader(cfg, tokenizer)
    epoch = _epoch_tokens(tokenizer, docs)
    n_batches = math.ceil(epoch / (batch_size * (seq_len + 1))) + 1
    batches = helpers.take(loader, n_batches)

    for batch in batches:
        assert batch["input_ids"].shape == (batch_size, seq_len)
        assert batch["labels"].shape == (batch_size, seq_len)
        assert batch["input_ids"].dtype == torch.int64 == batch["labels"].dtype
        # labels are the inputs shifted left by one token
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])

    eos = tokenizer.eos_token_id
    stream = [t for w in helpers.windows(batches) for t in w]
    first_epoch = stream[:epoch]
    assert first_epoch[-1] == eos  # the epoch ends exactly at a document boundary
    segments = helpers.split_on(first_epoch, eos)
    assert all(segments), "an empty document produced a lone EOS"
    by_text = {d: i for i, d in enumerate(docs)}
    seen = []
    for seg in segments:
        text = tokenizer.backend_tokenizer.decode(seg, skip_special_tokens=False)
        assert text in by_text, f"decoded segment is no document: {text[:40]!r}"
        # the packed tokens are exactly the document's own tokenization
        assert seg == _encode(tokenizer, text)
        seen.append(by_text[text])
    assert sorted(seen) == list(range(len(docs)))  # every document once, none twice
    assert seen != list(range(len(docs)))  # and shuffled


def test_same_seed_same_batches_other_seed_differs(corpus, tokenizer, make_training, helpers):
    path, _ = corpus

    def run(seed):
        loader = build_dataloader(make_training(dataset=[path], seed=seed), tokenizer)
        return torch.cat([b["input_ids"] for b in helpers.take(loader, 12)])

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_same_seed_same_batches_with_workers(corpus, tokenizer, make_training, helpers):
    path, _ = corpus
    cfg = make_training(dataset=[path], num_workers=2, seed=3)
    a = helpers.take(build_dataloader(cfg, tokenizer), 6)
    b = helpers.take(build_dataloader(cfg, tokenizer), 6)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))


def test_epochs_roll_over_with_reshuffle(tmp_path, tokenizer, make_training, helpers, caplog):
    docs = helpers.make_docs(6, seed=5)
    path = helpers.write_jsonl(tmp_path / "small.jsonl", [{"content": d} for d in docs])  # auto column
    cfg = make_training(dataset=[path], seq_len=16, batch_size=2)
    loader = build_dataloader(cfg, tokenizer)
    per_epoch = _epoch_tokens(tokenizer, docs)
    n = math.ceil(4 * per_epoch / (2 * 17)) + 1  # enough batches for more than four epochs
    with caplog.at_level(logging.INFO, logger="flame.data"):
        batches = helpers.take(loader, n)
    assert len(batches) == n and all(b["input_ids"].shape == (2, 16) for b in batches)
    rollovers = [r for r in caplog.records if r.name == "flame.data" and "epoch" in r.message]
    assert len(rollovers) >= 4
    assert loader.dataset.state_dict()["epoch"] >= 4

    # each epoch holds every document once, in a fresh order
    eos = tokenizer.eos_token_id
    stream = [t for w in helpers.windows(batches) for t in w]
    segments = helpers.split_on(stream, eos)
    texts = [tokenizer.backend_tokenizer.decode(s) for s in segments]
    epochs = [texts[i : i + len(docs)] for i in range(0, 4 * len(docs), len(docs))]
    assert all(sorted(e) == sorted(docs) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
