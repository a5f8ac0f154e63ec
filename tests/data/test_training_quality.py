"""benchmarks/training_quality.py in its quick mode: the three loops run, share one schedule, and report."""

from __future__ import annotations

import json

import pytest

from tests.helpers import PYTHON, run


@pytest.mark.slow  # 3 x 30 training steps plus a corpus and tokenizer build: about a minute on 2 cores
def test_the_quick_benchmark_trains_every_loop_on_one_schedule(tmp_path):
    out = tmp_path / "results.json"
    proc = run([PYTHON, "benchmarks/training_quality.py", "--quick", "--corpora", "stdlib",
                "--cache", str(tmp_path / "cache"), "--json-out", str(out)], timeout=1200)  # fmt: skip
    (result,) = json.loads(out.read_text())
    runs = result["runs"]
    assert set(runs) == {"flame", "flame, stream order", "reference"}
    # the reference's lr equals flame's at every step (the script asserts it), and it learned
    assert all(2.0 < r["validation_loss"][0] < 7.7 for r in runs.values())  # ln(2048) = 7.62 at the start
    assert runs["flame"]["distinct_documents"][0] > runs["flame, stream order"]["distinct_documents"][0] + 2
    assert result["ratio_flame_vs_reference"] == pytest.approx(
        runs["flame"]["validation_loss"][0] / runs["reference"]["validation_loss"][0]
    )
    assert "| stdlib |" in proc.stdout and "Target flame / reference <= 1.02" in proc.stdout
