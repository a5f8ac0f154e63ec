"""Parallel layouts against one process: per-step loss and gradient norm, gloo ranks (tests.helpers.torchrun).

Tolerances (fp32 on CPU): losses within 1e-5 absolute, gradient norms within 1e-4 relative: the
layouts differ only in the order of floating-point sums (all-reduces, sharded matmuls). Measured:
context-parallel layouts (CP x2, TP x CP, FSDP x CP, PP x CP, CP with varlen) differ from one process
by at most 5e-7 in the loss (1e-7 relative) and 3.4e-7 relative in the gradient norm.

The default suite runs one layout per kind of parallelism (TP x2, CP x2, PP x2 with 1F1B, a TP-to-one
checkpoint switch); the compositions (4 ranks), the other schedules and switches and varlen are `slow`
(20-65 s each here), run by CI's slow tier.
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import read_metrics, slow, torchrun, train

LOSS_TOL = 1e-5
GRAD_REL_TOL = 1e-4
STEPS = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory, byte_tokenizer, fixed_docs, tiny_llama):
    """One process, global batch 4, 5 steps."""
    from tests.conftest import SEQ_LEN

    dump = tmp_path_factory.mktemp("reference")
    args = [
        "--job.dump_folder", str(dump), "--model.config", tiny_llama, "--model.tokenizer_path", byte_tokenizer,
        "--training.dataset", "json", "--training.data_files", fixed_docs, "--training.seq_len", str(SEQ_LEN),
        "--training.batch_size", "4", "--training.steps", str(STEPS), "--training.mixed_precision_param", "float32",
        "--lr_scheduler.warmup_steps", "2", "--optimizer.lr", "3e-3", "--metrics.log_freq", "1",
        *validation_flags(fixed_docs, batch_size=4),
    ]  # fmt: skip
    train(args)
    return read_metrics(dump)


def validation_flags(data: str, batch_size: int) -> list[str]:
    """Validation at the last step on 2 fixed batches (the same documents for every layout)."""
    return [
        "--validation.enable", "true", "--validation.freq", str(STEPS), "--validation.steps", "2",
        "--validation.dataset", "json", "--validation.data_files", data, "--validation.dataset_split", "train",
        "--validation.batch_size", str(batch_size),
    ]  # fmt: skip


def data_parallel_degree(nproc: int, flags: dict) -> int:
    """The ranks left for data parallelism once TP, PP and CP took theirs."""
    others = 1
    for name in ("training__tensor_parallel_degree", "experimental__pipeline_parallel_degree",
                 "experimental__context_parallel_degree"):  # fmt: skip
        others *= int(flags.get(name, 1))
    return nproc // others


def assert_same(reference: list[dict], other: list[dict]) -> None:
    assert [r["step"] for r in other] == list(range(1, STEPS + 1))
    for a, b in zip(reference, other, strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_REL_TOL * a["grad_norm"], (a, b)
    if "validation_loss" in other[-1]:
        assert abs(reference[-1]["validation_loss"] - other[-1]["validation_loss"]) <= LOSS_TOL


@pytest.mark.parametrize(
    ("nproc", "flags"),
    [
        (2, {"training__tensor_parallel_degree": 2}),
        slow(2, {"training__tensor_parallel_degree": 2, "training__disable_loss_parallel": "true"}),
        slow(4, {"training__tensor_parallel_degree": 2, "training__data_parallel_shard_degree": 2}),
        (2, {"experimental__context_parallel_degree": 2}),
        slow(4, {"training__tensor_parallel_degree": 2, "experimental__context_parallel_degree": 2}),
        slow(4, {"training__data_parallel_shard_degree": 2, "experimental__context_parallel_degree": 2}),
    ],
    ids=["tp2", "tp2-no-loss-parallel", "fsdp2xtp2", "cp2", "tp2xcp2", "fsdp2xcp2"],
)
def test_layout_matches_one_process(reference, train_args, tmp_path, fixed_docs, nproc, flags):
    dp = data_parallel_degree(nproc, flags)
    args = train_args("layout", training__batch_size=4 // dp, training__steps=STEPS, **flags)
    proc = torchrun(nproc, [*args, *validation_flags(fixed_docs, batch_size=4 // dp)])
    if "experimental__context_parallel_degree" in flags:
        assert "context parallel: degree 2 over mesh axis ('cp',)" in proc.stdout
        assert "attention path allgather" in proc.stdout
    assert_same(reference, read_metrics(tmp_path / "layout"))


@pytest.mark.parametrize(
    "flags",
    [
        slow({"experimental__context_parallel_degree": 2}),
        slow({"training__tensor_parallel_degree": 2}),
    ],
    ids=["cp2", "tp2"],
)
def test_varlen_documents_match_one_process(train_args, tmp_path, flags):
    """Packed rows of document pieces (context_len 6 on seq_len 32: boundaries inside the CP chunks and
    the sequence-parallel shards): CP x2 with the document mask, and TP x2 with sequence parallelism,
    against one process with varlen."""
    varlen = {"training__varlen": "true", "training__context_len": 6, "training__steps": STEPS}
    train(train_args("one", **varlen))
    torchrun(2, train_args("two", **flags, **varlen))
    assert_same(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"))


@pytest.mark.parametrize(
    ("nproc", "flags"),
    [
        slow(2, {"experimental__pipeline_parallel_degree": 2, "experimental__pipeline_parallel_schedule": "GPipe"}),
        (2, {"experimental__pipeline_parallel_degree": 2, "experimental__pipeline_parallel_schedule": "1F1B"}),
        slow(
            2,
            {
                "experimental__pipeline_parallel_degree": 2,
                "experimental__pipeline_parallel_schedule": "Interleaved1F1B",
            },
        ),
        slow(4, {"experimental__pipeline_parallel_degree": 2, "training__data_parallel_shard_degree": 2}),
        slow(4, {"experimental__pipeline_parallel_degree": 2, "training__tensor_parallel_degree": 2}),
        slow(4, {"experimental__pipeline_parallel_degree": 2, "experimental__context_parallel_degree": 2}),
    ],
    ids=["pp2-gpipe", "pp2-1f1b", "pp2-interleaved", "fsdp2xpp2", "tp2xpp2", "pp2xcp2"],
)
def test_pipeline_layout_matches_one_process(reference, train_args, tmp_path, fixed_docs, nproc, flags):
    dp = data_parallel_degree(nproc, flags)
    args = train_args("pp", training__batch_size=4 // dp, training__steps=STEPS, **flags)
    proc = torchrun(nproc, [*args, *validation_flags(fixed_docs, batch_size=4 // dp)])
    assert "pipeline parallel:" in proc.stdout
    assert_same(reference, read_metrics(tmp_path / "pp"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        slow((2, {"experimental__pipeline_parallel_degree": 2}), (1, {})),
        ((2, {"training__tensor_parallel_degree": 2}), (1, {})),
        slow((2, {}), (4, {"training__tensor_parallel_degree": 2})),
        slow((2, {"experimental__context_parallel_degree": 2}), (1, {})),
    ],
    ids=["pp2-to-1", "tp2-to-1", "fsdp2-to-fsdp2xtp2", "cp2-to-1"],
)
def test_checkpoint_resumes_under_another_layout(reference, train_args, tmp_path, first, second):
    """Steps 1-3 under one layout, steps 4-5 under another (same data-parallel degree, so the data
    position carries over): the losses are the uninterrupted single-process run's."""

    def launch(nproc: int, flags: dict) -> None:
        args = train_args(
            "switch", training__batch_size=4 // data_parallel_degree(nproc, flags), training__steps=STEPS,
            checkpoint__enable_checkpoint="true", checkpoint__interval=3, **flags,
        )  # fmt: skip
        if nproc == 1:
            train(args)
        else:
            torchrun(nproc, args)

    launch(*first)
    shutil.rmtree(tmp_path / "switch" / "checkpoint" / "step-5")  # the second layout resumes from step 3
    launch(*second)
    assert_same(reference, read_metrics(tmp_path / "switch"))
