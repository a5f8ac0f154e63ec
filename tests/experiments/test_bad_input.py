"""Bad experiment specs: exit code 2, one message naming the file, the stage and the key; nothing started and
nothing in an existing experiment folder touched."""

from __future__ import annotations

import subprocess

import pytest

from flame.experiments.cli import main
from tests.experiments.conftest import tree
from tests.helpers import PYTHON, ROOT, env

GOOD = """
[experiment]
name = "bad"
root = "{root}"
EXPERIMENT_EXTRA

[[stage]]
name = "search"
kind = "fake"
config = "{base}"
space = { "optimizer.lr" = { grid = [1e-3, 3e-3] } }
SEARCH_EXTRA

[[stage]]
name = "next"
kind = "fake"
config = "{base}"
override = { "optimizer.lr" = { link = "search", field = "optimizer.lr", pick = "best" } }
"""

CASES = {
    "unknown experiment key": (
        "EXPERIMENT_EXTRA",
        "maxparallel = 2",
        ["[experiment]", "'maxparallel'", "Did you mean 'max_parallel'"],
    ),
    "unknown stage key": (
        "SEARCH_EXTRA",
        "overide = { 'training.steps' = 3 }",
        ["'search'", "'overide'", "'override'"],
    ),
    "space over a key the schema lacks": (
        "SEARCH_EXTRA",
        "override = { 'optimizer.lrr' = 0.1 }",
        ["'search'", "'optimizer.lrr'", "'optimizer.lr'"],
    ),
    "loguniform <= 0": (
        "SEARCH_EXTRA",
        "search = { kind = 'random', samples = 2 }\nspace = { 'optimizer.eps' = { loguniform = [0.0, 1e-2] } }",
        ["'search'", "'optimizer.eps'", "bounds must be > 0"],
    ),
    "low >= high": (
        "SEARCH_EXTRA",
        "search = { kind = 'random', samples = 2 }\nspace = { 'optimizer.weight_decay' = { uniform = [0.2, 0.1] } }",
        ["'search'", "'optimizer.weight_decay'", "low must be below high"],
    ),
    "empty grid": (
        "SEARCH_EXTRA",
        "space = { 'training.seed' = { grid = [] } }",
        ["'search'", "'training.seed'", "non-empty list"],
    ),
    "top_k < 1": ("SEARCH_EXTRA", "reduce = { top_k = 0 }", ["'search'", "reduce", "top_k must be an integer >= 1"]),
    "link to an unknown stage": (
        "SEARCH_EXTRA",
        "",
        ["'next'", "'optimizer.lr'", "unknown stage 'serch'", "Did you mean 'search'"],
    ),
    "link to a later stage": (
        "SEARCH_EXTRA",
        "override = { 'training.seed' = { link = 'next', field = 'training.seed' } }",
        ["'search'", "'training.seed'", "not earlier"],
    ),
    "a field that does not exist": (
        "SEARCH_EXTRA",
        "",
        ["'next'", "field 'optimizer.lrr'", "Did you mean 'optimizer.lr'"],
    ),
    "samples missing for random": (
        "SEARCH_EXTRA",
        "search = { kind = 'random' }",
        ["'search'", "search", "needs samples"],
    ),
    "samples missing for tpe": (
        "SEARCH_EXTRA",
        "search = { kind = 'tpe' }",
        ["'search'", "search", "'tpe' needs samples"],
    ),
    "a distribution without search": (
        "SEARCH_EXTRA",
        "space = { 'optimizer.eps' = { loguniform = [1e-9, 1e-7] } }",
        ["'search'", "optimizer.eps", "sampled; set search"],
    ),
    "a base config training refuses": (
        "SEARCH_EXTRA",
        "override = { 'training.steps' = 0 }",
        ["'search'", "--training.steps must be a positive integer"],
    ),
    "an unknown stage kind": ("SEARCH_EXTRA", "kind = 'trian'", ["'search'", "kind 'trian' is not allowed"]),
}


def _spec(case: str) -> str:
    slot, text, _ = CASES[case]
    spec = GOOD
    if text.startswith("space") or "\nspace" in text:
        spec = spec.replace('space = { "optimizer.lr" = { grid = [1e-3, 3e-3] } }\n', "")
    spec = spec.replace(slot, text).replace("EXPERIMENT_EXTRA", "").replace("SEARCH_EXTRA", "")
    if case == "link to an unknown stage":
        spec = spec.replace('link = "search"', 'link = "serch"')
    if case == "a field that does not exist":
        spec = spec.replace('field = "optimizer.lr"', 'field = "optimizer.lrr"')
    if case == "an unknown stage kind":
        spec = spec.replace('kind = "fake"\nconfig = "{base}"\nspace', 'config = "{base}"\nspace', 1)
    return spec


@pytest.mark.parametrize("case", list(CASES))
def test_bad_spec_exits_2_naming_file_stage_and_key(case, write_spec, tmp_path, capsys):
    root = tmp_path / "exp"
    (root / "search" / "old").mkdir(parents=True)
    (root / "search" / "old" / "metrics.jsonl").write_text('{"step": 1}\n')
    before = tree(root)
    path = write_spec(_spec(case))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flame: error: ") and str(path) in err, err
    for needle in CASES[case][2]:
        assert needle in err, (needle, err)
    assert tree(root) == before  # nothing written, nothing started


def test_good_spec_is_accepted(write_spec, capsys):
    assert main(["plan", str(write_spec(_spec("top_k < 1").replace("reduce = { top_k = 0 }", "")))]) == 0
    assert "stage search: 2 trials" in capsys.readouterr().out


def test_slurm_launcher_without_sbatch(write_spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere on it
    path = write_spec(_spec("top_k < 1").replace("reduce = { top_k = 0 }", ""))
    assert main(["run", str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'slurm' needs Slurm's sbatch" in err
    assert not (tmp_path / "exp").exists()


def test_command_line_exit_code(write_spec):
    path = write_spec(_spec("top_k < 1"))
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "run", str(path)], cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "top_k must be an integer >= 1" in proc.stderr and "Traceback" not in proc.stderr
