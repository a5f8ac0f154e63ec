"""The sequence shuffle: windows of rows dealt out in a seeded order (flame.data.sequence_shuffle).

What held before it still holds with it on: every row once, disjoint ranks, each document once per epoch,
the same global batch for 1 rank x 8 and 2 ranks x 4, mixing shares, exact resume, varlen boundaries.
"""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch

from flame.config.errors import ConfigError
from flame.data import build_dataloader
from flame.data.sequence_shuffle import distinct_documents


@pytest.fixture(scope="module")
def byte_tok(byte_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(byte_tokenizer)


def _rows(batches) -> list[tuple[int, ...]]:
    """Each row as one tuple (inputs, labels and positions when there are any)."""
    out = []
    for batch in batches:
        keys = [k for k in ("input_ids", "labels", "position_ids") if k in batch]
        for r in range(batch["input_ids"].shape[0]):
            out.append(tuple(t for k in keys for t in batch[k][r].tolist()))
    return out


def _long_docs(tmp_path, helpers, n: int = 40) -> str:
    """Documents of 100-400 bytes: several 33-token rows each, so stream-order batches hold one or two."""
    docs = [d * (1 + i % 4) for i, d in enumerate(helpers.make_docs(n, seed=12, min_words=20, max_words=25))]
    return helpers.write_jsonl(tmp_path / "long.jsonl", [{"text": d} for d in docs])


def test_a_window_deals_its_rows_once_in_a_seeded_order_and_batches_mix_documents(
    tmp_path, byte_tok, make_training, helpers
):
    path = _long_docs(tmp_path, helpers)
    window, batches = 64, 128  # buffer 64 rows / batch 2 = windows of 32 steps; 4 windows
    stream = _rows(helpers.take(build_dataloader(make_training(dataset=[path]), byte_tok), batches))
    cfg = make_training(dataset=[path], sequence_shuffle_buffer=window)
    loader = build_dataloader(cfg, byte_tok, document_spans=True)
    assert loader.dataset.window_steps == 32
    spans = helpers.take(loader, batches)
    shuffled = _rows(spans)
    assert shuffled != stream
    for w in range(0, len(stream), window):
        ours, theirs = shuffled[w : w + window], stream[w : w + window]
        assert sorted(ours) == sorted(theirs), f"window {w // window}: other rows"  # each row once
        # a row keeps its lane (its place in the batch): it only changes its step
        assert all(theirs.index(row) % 2 == k % 2 for k, row in enumerate(ours))
    plain = helpers.take(build_dataloader(make_training(dataset=[path]), byte_tok, document_spans=True), batches)
    mixed = sum(distinct_documents(b["document_span"]) for b in spans) / batches
    unmixed = sum(distinct_documents(b["document_span"]) for b in plain) / batches
    assert unmixed < 1.5 and mixed > unmixed + 0.4, (mixed, unmixed)
    again = _rows(helpers.take(build_dataloader(cfg, byte_tok), batches))
    other = _rows(helpers.take(build_dataloader(make_training(dataset=[path], sequence_shuffle_buffer=window,
                                                              seed=1), byte_tok), batches))  # fmt: skip
    assert again == shuffled and other != shuffled


@pytest.mark.parametrize("buffer", [None, 64], ids=["automatic", "64-rows"])
def test_the_global_batch_does_not_depend_on_the_layout(fixed_docs, byte_tok, make_training, helpers, buffer):
    """Each fixed document is one row: 1 rank x 8, 2 ranks x 4 and 1 x 4 with 2 accumulation steps see the
    same rows in every step (the layout tests of tests/test_train.py rely on it), shuffled."""
    steps = 60  # more than one window (automatic: the 400 rows form one window of 50 steps)
    one = _rows(helpers.take(build_dataloader(make_training(dataset=[fixed_docs], batch_size=8,
                                                            sequence_shuffle_buffer=buffer), byte_tok), steps))  # fmt: skip
    ranks = [
        _rows(helpers.take(build_dataloader(make_training(dataset=[fixed_docs], batch_size=4,
              sequence_shuffle_buffer=buffer), byte_tok, dp_rank=r, dp_world_size=2), steps))
        for r in range(2)
    ]  # fmt: skip
    accumulated = _rows(helpers.take(build_dataloader(make_training(dataset=[fixed_docs], batch_size=4,
                        gradient_accumulation_steps=2, sequence_shuffle_buffer=buffer), byte_tok), 2 * steps))  # fmt: skip
    stream = _rows(helpers.take(build_dataloader(make_training(dataset=[fixed_docs], batch_size=8), byte_tok), steps))
    for s in range(steps):
        expected = sorted(one[8 * s : 8 * s + 8])
        assert sorted(ranks[0][4 * s : 4 * s + 4] + ranks[1][4 * s : 4 * s + 4]) == expected, s
        assert sorted(accumulated[8 * s : 8 * s + 8]) == expected, s
    assert sum(sorted(one[8 * s : 8 * s + 8]) != sorted(stream[8 * s : 8 * s + 8]) for s in range(steps)) > 50


@pytest.mark.parametrize("buffer", [None, 80], ids=["automatic", "80-rows"])
def test_ranks_read_disjoint_rows_and_every_document_once_per_epoch(fixed_docs, byte_tok, make_training, helpers,
                                                                    buffer):  # fmt: skip
    # 400 one-row documents, 2 ranks x 4: an epoch is 50 steps; 80 rows make windows of 10 steps
    seen = []
    for rank in range(2):
        cfg = make_training(dataset=[fixed_docs], batch_size=4, sequence_shuffle_buffer=buffer)
        loader = build_dataloader(cfg, byte_tok, dp_rank=rank, dp_world_size=2)
        assert loader.dataset.window_steps == (50 if buffer is None else 10)
        seen += _rows(helpers.take(loader, 50))
    texts = [byte_tok.decode(row[:32]) for row in seen]
    with open(fixed_docs) as f:
        docs = [line.split('"text": "')[1].split('"')[0] for line in f]
    assert sorted(texts) == sorted(docs)  # every document once, on one of the ranks


def test_varlen_rows_move_whole_with_their_boundaries(tmp_path, byte_tok, make_training, helpers):
    from flame.data.varlen import cu_seqlens_from_position_ids

    path = _long_docs(tmp_path, helpers)
    cfg = dict(dataset=[path], varlen=True, seq_len=48, context_len=20, batch_size=3)
    stream = helpers.take(build_dataloader(make_training(**cfg), byte_tok), 40)
    shuffled = helpers.take(build_dataloader(make_training(**cfg, sequence_shuffle_buffer=30), byte_tok), 40)
    for batch in shuffled:
        assert torch.equal(batch["cu_seqlens"], cu_seqlens_from_position_ids(batch["position_ids"]))
    a, b = _rows(shuffled), _rows(stream)  # rows with their labels and positions
    assert a != b and all(sorted(a[w : w + 30]) == sorted(b[w : w + 30]) for w in range(0, 120, 30))


def test_mixing_shares_are_those_of_the_stream(tmp_path, byte_tok, make_training, helpers):
    from tests.data.test_data_mixing import _letter_docs

    files = [_letter_docs(tmp_path, "aaa", "a", 3000, 1), _letter_docs(tmp_path, "zzz", "z", 1500, 2)]
    cfg = dict(dataset=["json", "json"], data_files=files, data_probs=[0.8, 0.2], seq_len=64, batch_size=8, seed=5)
    counts = []
    for buffer in (0, 64):  # 64 rows: windows of 8 steps; 200 batches are 25 whole windows
        loader = build_dataloader(make_training(**cfg, sequence_shuffle_buffer=buffer), byte_tok)
        helpers.take(loader, 200)
        counts.append(loader.source_counts())
    documents, tokens = counts[1]
    assert (counts[0] == counts[1]).all()  # a window hands out exactly the rows it holds
    assert abs(documents[0] / documents.sum() - 0.8) <= 0.02 and tokens.sum() == 200 * 8 * 65


def _hash(batch) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode() + batch[key].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_resume_inside_and_across_windows_continues_exactly(tmp_path, tokenizer, make_training, helpers, streaming,
                                                            num_workers):  # fmt: skip
    """Snapshots before, inside and at the end of windows, while the next window is being cut: a loader
    rebuilt from each continues with the very same batches (mixing, varlen, streaming, workers)."""
    from tests.data.test_data_streaming import _write_parts

    docs = helpers.make_docs(90, seed=3, max_words=60)
    glob = _write_parts(tmp_path, helpers, docs[:60], 4)
    other = helpers.write_jsonl(tmp_path / "other.jsonl", [{"text": d} for d in docs[60:]])
    cfg = make_training(dataset=["json", "json"], data_files=[glob, other], data_probs=[0.7, 0.3], varlen=True,
                        seq_len=48, context_len=20, batch_size=3, streaming=streaming, shuffle_buffer_size=4,
                        num_workers=num_workers, seed=11, sequence_shuffle_buffer=6 * 2 * max(1, num_workers) * 3)  # fmt: skip
    rank, world = 1, 2  # windows of 6 steps per shard (2 ranks x workers x 3 rows each)
    per_worker = max(1, num_workers)
    snapshots_at, follow = (1, 4, 6 * per_worker, 8 * per_worker + 1, 13 * per_worker), 14
    total = max(snapshots_at) + follow
    loader = build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world)
    assert loader.dataset.window_steps == 6
    it = iter(loader)
    reference, states = [], {}
    for step in range(total):
        if step in snapshots_at:
            states[step] = loader.state_dict()
        reference.append(_hash(next(it)))
    for step, state in states.items():
        assert len(state[f"dp_rank_{rank}"]) < 60_000  # positions and counters, not buffered rows
        fresh = build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world)
        fresh.load_state_dict(state)
        it = iter(fresh)
        assert [_hash(next(it)) for _ in range(follow)] == reference[step : step + follow], f"resume at {step}"
    unshuffled = build_dataloader(make_training(**{**vars(cfg), "sequence_shuffle_buffer": 0}), tokenizer,
                                  dp_rank=rank, dp_world_size=world)  # fmt: skip
    it = iter(unshuffled)
    assert [_hash(next(it)) for _ in range(total)] != reference


def test_a_state_of_another_window_is_rejected_in_mid_window_and_old_states_resume(tmp_path, tokenizer,
                                                                                     make_training, helpers):  # fmt: skip
    path = _long_docs(tmp_path, helpers)
    loader = build_dataloader(make_training(dataset=[path], sequence_shuffle_buffer=16), tokenizer)
    helpers.take(loader, 3)
    other = build_dataloader(make_training(dataset=[path], sequence_shuffle_buffer=32), tokenizer)
    with pytest.raises(ValueError, match=r"window_shape: saved \[8, 2\], now \[16, 2\]"):
        other.dataset.load_state_dict(loader.dataset.state_dict())
    # a state saved before the shuffle existed (version 2) resumes at its position, in a new window
    plain = build_dataloader(make_training(dataset=[path]), tokenizer)
    helpers.take(plain, 5)
    old = {k: v for k, v in plain.dataset.state_dict().items() if k not in ("documents_cut", "window", "taken")}
    old["version"] = 2
    expected = _rows(helpers.take(plain, 4))
    plain_again = build_dataloader(make_training(dataset=[path]), tokenizer)
    plain_again.dataset.load_state_dict(old)
    assert _rows(helpers.take(plain_again, 4)) == expected


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_buffers_are_config_errors_naming_the_flag(train_args):
    from flame.config.loader import parse_args
    from flame.config.validate import validate

    def problems(value: str, world: int = 1) -> list[str]:
        try:
            validate(parse_args(train_args("v", training__sequence_shuffle_buffer=value)), world)
        except ConfigError as e:
            return [p for p in e.problems if "sequence_shuffle_buffer" in p]
        return []

    assert problems("0") == problems("1") == problems("8") == []  # batch 4: two steps are 8 rows
    assert problems("-3") == [
        "--training.sequence_shuffle_buffer must be >= 0 packed rows (0 or 1: rows in stream order; unset: "
        "automatic), got -3"
    ]
    (small,) = problems("12", world=2)  # 2 ranks x 4 rows: one step is 8 rows
    assert "12 holds fewer rows than two steps (2 data-parallel rank(s) x --training.batch_size x" in small
    assert "give at least 16, or 0 for the stream order" in small


def test_a_buffer_larger_than_a_ranks_data_is_refused_with_a_size_that_fits(fixed_docs, byte_tok, make_training,
                                                                              caplog):  # fmt: skip
    # 400 one-row documents on 2 ranks x batch 4: 200 rows, 50 steps per rank and epoch
    def build(buffer):
        cfg = make_training(dataset=[fixed_docs], batch_size=4, sequence_shuffle_buffer=buffer)
        return build_dataloader(cfg, byte_tok, dp_rank=1, dp_world_size=2)

    with pytest.raises(ConfigError) as err:
        build(408)
    assert str(err.value) == (
        "--training.sequence_shuffle_buffer 408 cannot be filled: its windows of 51 steps hold 204 rows per data "
        "shard (data-parallel rank x worker), but shard 1 holds only 200 rows in one epoch of its share of the "
        "data (a window would repeat documents); use at most 400, or leave it unset to fit the data"
    )
    assert build(400).dataset.window_steps == 50
    with caplog.at_level(logging.INFO, logger="flame.data"):
        assert build(None).dataset.window_steps == 50  # unset: the automatic size, fitted to the data
    assert "fitted to one epoch of this rank's data" in caplog.text


def test_the_cli_refuses_an_unfillable_buffer_before_training(train_args, tmp_path):
    from tests.helpers import train

    proc = train(train_args("big", training__sequence_shuffle_buffer=100_000), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("flame: error:") == 1 and "Traceback" not in proc.stderr
    assert "--training.sequence_shuffle_buffer 100000 cannot be filled" in proc.stderr
    assert "use at most 400" in proc.stderr
    assert not (tmp_path / "big" / "metrics.jsonl").exists()
