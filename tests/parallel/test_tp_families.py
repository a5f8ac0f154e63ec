"""Tensor parallelism, with and without sequence parallelism, for every family that has a TP plan."""

from __future__ import annotations

import json

from tests.helpers import torchrun
from tests.parallel.tp_families import FAMILIES, FLA_FAMILIES


def test_every_tp_family_matches_one_rank():
    """Logits within 1e-5 relative to the largest logit, every parameter's gradient within 1e-5 relative (fp32, 2 ranks); fla's
    GLA and Gated DeltaNet on flame's CPU path for their kernels."""
    out = torchrun(2, [], module="tests.parallel.tp_families", timeout=600).stdout
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {(r["family"], r["sequence_parallel"]) for r in results} == {
        (family, sp) for family in [*FAMILIES, *FLA_FAMILIES] for sp in (True, False)
    }
    for r in results:
        assert r["logits_diff"] <= 1e-5 and r["grad_rel_diff"] <= 1e-5, r
