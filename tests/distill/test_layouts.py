"""Distillation under the parallel layouts against one process (gloo ranks, tests.helpers.torchrun), with the layout
tests' tolerances (tests/parallel/test_layouts.py): the loss, ce_loss, kd_loss and gradient norm of every
step, and the validation loss, KL to the teacher and top-1 agreement.

The teacher (``hf_teacher``: a padded 300-row vocabulary) is sharded like the student: FSDP x2 shards it over
the two ranks, TP x2 gives vocabulary-sharded logits (the KL with loss parallelism, never gathered), CP x2
gives it each rank's sequence shard. FSDP x2 runs in the default suite; TP x2, CP x2 and CP x2 with varlen
documents are slow-marked (about 25 s each here).
"""

from __future__ import annotations

import pytest

from tests.helpers import read_metrics, torchrun, train
from tests.parallel.test_layouts import GRAD_REL_TOL, LOSS_TOL, STEPS, validation_flags

KD = {"distill__alpha": 0.5, "distill__temperature": 2.0}


def _assert_same(reference: list[dict], other: list[dict]) -> None:
    assert [r["step"] for r in other] == list(range(1, STEPS + 1))
    for a, b in zip(reference, other, strict=True):
        for key in ("loss", "ce_loss", "kd_loss"):
            assert abs(a[key] - b[key]) <= LOSS_TOL, (key, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_REL_TOL * a["grad_norm"], (a, b)
    for key in (
        "validation_loss",
        "validation_kl_to_teacher",
        "validation_teacher_agreement",
        "validation_teacher_loss",
    ):
        assert abs(reference[-1][key] - other[-1][key]) <= LOSS_TOL, key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_args_module):
    """One process, in this one (no interpreter start-up)."""
    from flame import train as train_here
    from flame.config.loader import parse_args

    dump = tmp_path_factory.mktemp("distill_reference")
    train_here(parse_args(train_args_module(str(dump), batch_size=4)))
    return read_metrics(dump)


@pytest.fixture(scope="module")
def train_args_module(byte_tokenizer, fixed_docs, tiny_llama, hf_teacher):
    from tests.conftest import SEQ_LEN

    def make(dump: str, batch_size: int, **flags) -> list[str]:
        values = {
            "job.dump_folder": dump, "model.config": tiny_llama, "model.tokenizer_path": byte_tokenizer,
            "training.dataset": "json", "training.data_files": fixed_docs, "training.seq_len": SEQ_LEN,
            "training.batch_size": batch_size, "training.steps": STEPS, "training.mixed_precision_param": "float32",
            "lr_scheduler.warmup_steps": 2, "optimizer.lr": 3e-3, "metrics.log_freq": 1,
            "distill.teacher": hf_teacher, **{k.replace("__", "."): v for k, v in {**KD, **flags}.items()},
        }  # fmt: skip
        args = [item for k, v in values.items() for item in (f"--{k}", str(v))]
        return args + validation_flags(fixed_docs, batch_size=batch_size)

    return make


def test_fsdp2_matches_one_process(reference, train_args_module, tmp_path):
    proc = torchrun(2, train_args_module(str(tmp_path / "fsdp"), batch_size=2))
    assert "teacher: FSDP2 over mesh axes ('fsdp',)" in proc.stdout + proc.stderr
    _assert_same(reference, read_metrics(tmp_path / "fsdp"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [{"training__tensor_parallel_degree": 2}, {"experimental__context_parallel_degree": 2}],
    ids=["tp2", "cp2"],
)
def test_layout_matches_one_process(reference, train_args_module, tmp_path, flags):
    torchrun(2, train_args_module(str(tmp_path / "layout"), batch_size=4, **flags))
    _assert_same(reference, read_metrics(tmp_path / "layout"))


@pytest.mark.slow
def test_varlen_documents_under_cp2_match_one_process(train_args_module, tmp_path):
    """Packed document pieces (context_len 6): the teacher gets the student's document boundaries, per shard."""
    varlen = {"training__varlen": "true", "training__context_len": 6}
    train(train_args_module(str(tmp_path / "one"), batch_size=4, **varlen))
    torchrun(
        2, train_args_module(str(tmp_path / "two"), batch_size=4, experimental__context_parallel_degree=2, **varlen)
    )
    _assert_same(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"))


def test_compiled_distillation_matches_eager(reference, train_args_module, tmp_path):
    """``--training.compile``: the decoder layers of both models and the fused CE + KD kernel compiled
    (``closed_form.fused_dense_forward_kl``), one process: the eager run's losses within compile's tolerance
    (1e-4, as tests/test_features.py::test_compile_keeps_the_losses: fused float arithmetic)."""
    from flame import train as train_here
    from flame.config.loader import parse_args
    from flame.distill import closed_form

    closed_form.fused_dense_forward_kl.compiled = None
    train_here(parse_args(train_args_module(str(tmp_path / "compiled"), batch_size=4, training__compile="true")))
    assert closed_form.fused_dense_forward_kl.compiled is not None  # the trainer took the compiled kernel
    compiled = read_metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == list(range(1, STEPS + 1))
    for a, b in zip(reference, compiled, strict=True):
        for key in ("loss", "ce_loss", "kd_loss"):
            assert abs(a[key] - b[key]) <= 1e-4, (key, a, b)
    assert abs(reference[-1]["validation_kl_to_teacher"] - compiled[-1]["validation_kl_to_teacher"]) <= 1e-4
