"""Varlen packing: rows, labels and positions per document; attention isolation; the training loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flame.data import build_dataloader
from flame.data.varlen import IGNORE_INDEX, cu_seqlens_from_position_ids


@pytest.fixture(scope="module")
def byte_tok(byte_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(byte_tokenizer)


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = [int(i) for i in torch.nonzero(position_ids == 0).flatten()]
    return list(zip(starts, [*starts[1:], len(position_ids)], strict=True))


def test_varlen_rows_split_long_documents_and_never_cross_a_boundary(tmp_path, byte_tok, make_training, helpers):
    # Documents of known lengths (one token per character), some longer than context_len.
    lengths = [5, 40, 17, 3, 70, 16, 9, 33, 1, 12] * 3
    docs = [chr(ord("a") + i % 26) * n for i, n in enumerate(lengths)]
    path = helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    seq_len, context_len, batch_size = 48, 16, 3
    cfg = make_training(dataset=[path], varlen=True, seq_len=seq_len, context_len=context_len, batch_size=batch_size)
    batches = helpers.take(build_dataloader(cfg, byte_tok), 8)
    eos = byte_tok.eos_token_id

    stream, piece_lengths = [], []
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seqlens"}
        assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, seq_len)
        assert torch.equal(batch["cu_seqlens"], cu_seqlens_from_position_ids(batch["position_ids"]))
        assert batch["cu_seqlens"].dtype == torch.int32 and int(batch["cu_seqlens"][-1]) == batch_size * seq_len
        for r in range(batch_size):
            ids, labels, pos = batch["input_ids"][r], batch["labels"][r], batch["position_ids"][r]
            for a, b in _segments(pos):
                assert b - a <= context_len
                assert torch.equal(pos[a:b], torch.arange(b - a))
                assert torch.equal(labels[a : b - 1], ids[a + 1 : b])  # next token inside the segment ...
                assert int(labels[b - 1]) == IGNORE_INDEX  # ... and no target across its end
                piece_lengths.append(b - a)
            stream += ids.tolist()
    # Nothing lost or reordered: the rows are the documents (+EOS) end to end, in one shuffled order.
    texts = [byte_tok.decode(d) for d in helpers.split_on(stream, eos)]
    assert all(t in docs for t in texts) and len(texts) > len(docs)  # more than one epoch, whole documents
    assert {len(docs[0]), len(docs[1])} <= {len(t) for t in texts}
    assert max(piece_lengths) == context_len  # long documents were cut at context_len
    # labels carry a target everywhere but at the segment ends
    total = sum(b["labels"].numel() for b in batches)
    masked = sum(int((b["labels"] == IGNORE_INDEX).sum()) for b in batches)
    assert masked == len(piece_lengths) and masked < total / 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(attn, tiny_llama, tmp_path, byte_tok, make_training, helpers):
    from transformers import AutoConfig, AutoModelForCausalLM

    from flame.models.adapters import adapter_for

    config = AutoConfig.from_pretrained(tiny_llama)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = adapter_for("llama").with_model(model)
    assert adapter.varlen_route() == attn

    docs = [("abcdefghij" * 5)[: 4 + 7 * i] for i in range(12)]
    path = helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    cfg = make_training(dataset=[path], varlen=True, seq_len=64, context_len=24, batch_size=2)
    batch = helpers.take(build_dataloader(cfg, byte_tok), 1)[0]
    with torch.no_grad():
        packed = model(**adapter.model_inputs(batch, torch.device("cpu"))).logits
        worst, count = 0.0, 0
        for r in range(2):
            for a, b in _segments(batch["position_ids"][r]):
                alone = model(input_ids=batch["input_ids"][r : r + 1, a:b]).logits[0]
                worst = max(worst, (alone - packed[r, a:b]).abs().max().item())
                count += 1
        # position_ids alone do not isolate documents: the same batch without the mask differs
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert count > 4
    assert worst <= 1e-5
    assert (leaky - packed).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["gla", "gated_deltanet", "delta_net"])
def test_fla_packed_logits_equal_each_document_alone(family, tmp_path, byte_tok, make_training, helpers):
    """fla's GLA and Gated DeltaNet on flame's CPU path with the "fla" route (cu_seqlens on the flattened
    batch): the recurrent state and the short convolutions restart at every document."""
    from transformers import AutoModelForCausalLM

    from flame.models.adapters import adapter_for
    from flame.models.build import load_model_config
    from tests.parallel.test_fla_parallel import GDN_TINY, GLA_TINY

    path = tmp_path / f"{family}.json"
    tiny = {"gla": GLA_TINY, "gated_deltanet": GDN_TINY}.get(family)
    if tiny is None:  # DeltaNet: Gated DeltaNet's sizes without its gate options
        tiny = {**GDN_TINY, "model_type": family, "num_v_heads": None, "head_dim": None, "expand_k": 1, "expand_v": 1}
        tiny = {key: value for key, value in tiny.items() if value is not None}
    path.write_text(json.dumps(tiny))
    config = load_model_config(str(path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = adapter_for(family).with_model(model)
    docs = [("abcdefghij" * 5)[: 4 + 7 * i] for i in range(12)]
    data = helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    cfg = make_training(dataset=[data], varlen=True, seq_len=64, context_len=24, batch_size=2)
    batch = helpers.take(build_dataloader(cfg, byte_tok), 1)[0]
    with torch.no_grad():
        packed = model(**adapter.model_inputs(batch, torch.device("cpu"))).logits.view(2, 64, -1)
        worst, count = 0.0, 0
        for r in range(2):
            for a, b in _segments(batch["position_ids"][r]):
                alone = model(input_ids=batch["input_ids"][r : r + 1, a:b]).logits[0]
                worst = max(worst, (alone - packed[r, a:b]).abs().max().item())
                count += 1
        leaky = model(input_ids=batch["input_ids"]).logits
    assert count > 4
    assert worst <= 1e-5
    assert (leaky - packed).abs().max().item() > 1e-2


def test_varlen_training_step_loss_is_the_token_weighted_document_loss(train_args, tmp_path):
    import flame
    from flame.config.loader import parse_args
    from tests.helpers import read_metrics

    args = train_args("varlen", training__steps=1, training__varlen="true", training__context_len=12,
                      training__batch_size=3)  # fmt: skip
    config = parse_args(args)
    trainer = flame.Trainer(config)
    try:
        batch = next(iter(build_dataloader(config.training, trainer.tokenizer)))  # the step's batch
        loss_sum, targets = 0.0, 0
        with torch.no_grad():
            for r in range(batch["input_ids"].shape[0]):
                for a, b in _segments(batch["position_ids"][r]):
                    ids = batch["input_ids"][r : r + 1, a:b]
                    logits = trainer.model(input_ids=ids).logits[0, :-1]
                    loss_sum += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                    targets += b - a - 1
        assert targets == int((batch["labels"] != IGNORE_INDEX).sum())
        trainer.train()
    finally:
        trainer.close()
    record = read_metrics(config.job.dump_folder)[-1]
    assert record["step"] == 1
    assert record["loss"] == pytest.approx(loss_sum / targets, abs=1e-5)


def test_flash_and_fla_routes_get_flattened_varlen_kwargs(caplog):
    import logging

    from flame.data.varlen import collate_varlen, varlen_row
    from flame.models.adapters import ModelAdapter, adapter_for

    starts = np.zeros(8, dtype=bool)
    starts[[0, 3]] = True
    rows = [varlen_row(np.arange(8) + 10 * r, starts) for r in range(2)]
    batch = collate_varlen(rows)
    cpu = torch.device("cpu")
    flash = ModelAdapter(family="llama", attn_implementation="flash_attention_2")
    with caplog.at_level(logging.INFO, logger="flame.models"):
        kwargs = flash.model_inputs(batch, cpu)
        flash.model_inputs(batch, cpu)
    assert kwargs["input_ids"].shape == (1, 16) and kwargs["position_ids"].shape == (1, 16)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 8, 11, 16] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 5
    assert [r.message for r in caplog.records].count(
        "varlen attention route: flash-attention varlen (cu_seq_lens_q/k, max_length_q/k) on the flattened batch "
        "(model family llama)"
    ) == 1  # logged once

    fla = adapter_for("gla")
    assert fla.varlen_route() == "fla"
    kwargs = fla.model_inputs(batch, cpu)
    assert set(kwargs) == {"input_ids", "cu_seqlens"} and kwargs["cu_seqlens"].tolist() == [0, 3, 8, 11, 16]

    eager = ModelAdapter(family="llama", attn_implementation="eager").model_inputs(batch, cpu)["attention_mask"]
    assert eager.dtype == torch.float32 and eager[0, 0, 4, 3] == 0 and eager[0, 0, 4, 2] < -1e30
    plain = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    assert set(flash.model_inputs(plain, cpu)) == {"input_ids"}  # without varlen: a plain pass-through

    from flame.config.errors import ConfigError

    with pytest.raises(ConfigError, match="flex_attention"):
        ModelAdapter(family="llama", attn_implementation="flex_attention").varlen_route()


def test_varlen_row_labels_and_cu_seqlens():
    """A hand-checked row: targets inside each segment, -100 at its end, offsets over the flat batch."""
    from flame.data.varlen import collate_varlen, varlen_row

    row = varlen_row(np.arange(6), np.array([1, 0, 0, 1, 0, 0], dtype=bool))
    batch = collate_varlen([row, row])
    assert batch["labels"].tolist()[0] == [1, 2, IGNORE_INDEX, 4, 5, IGNORE_INDEX]
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 0, 1, 2]
    assert batch["cu_seqlens"].tolist() == [0, 3, 6, 9, 12]
