"""Every shipped experiment spec loads and checks; `import flame` stays light (flame.experiment is lazy)."""

from __future__ import annotations

import subprocess

import pytest

from flame.experiments.spec import load_spec
from tests.helpers import PYTHON, ROOT, env

SPECS = sorted((ROOT / "configs" / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_spec_loads(path):
    exp = load_spec(path)
    assert exp.stages and all(s.name for s in exp.stages)


def test_demo_spec_shape():
    exp = load_spec(ROOT / "configs" / "experiments" / "demo.toml")
    assert [s.name for s in exp.stages] == ["search", "long", "eval"]
    assert [s.kind for s in exp.stages] == ["train", "train", "evaluate"]
    assert exp.stages[0].top_k == 1 and exp.max_parallel == 2


def test_flame_experiment_is_lazy():
    code = "import sys, flame; assert 'flame.experiments' not in sys.modules; flame.experiment.run; print('ok')"
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
