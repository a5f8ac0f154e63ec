"""The vocabulary-sharded KD loss (tensor parallel with loss parallel) on 2 gloo ranks equals the dense loss."""

from __future__ import annotations

import json

from tests.helpers import torchrun


def test_vocab_sharded_loss_and_gradient_equal_the_dense_ones():
    proc = torchrun(2, [], module="tests.distill.sharded_check", timeout=300)
    records = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    # 4 losses x (dense at 2 sizes + top-3 at 2 sizes + top-7 at 2 sizes)
    assert len(records) == 24, proc.stdout
    for r in records:
        assert r["dense"] > 0, r
        assert r["ranks_agree"], r
        assert r["value_diff"] <= 1e-5 * max(1.0, r["dense"]), r
        assert r["grad_diff"] <= 1e-6 * max(1.0, r["grad_scale"]), r
        assert r["agreement_diff"] <= 1e-5, r
