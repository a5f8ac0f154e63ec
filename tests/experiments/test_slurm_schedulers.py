"""Trial schedulers on the local Slurm cluster (slow): Hyperband as one array per (bracket, rung) with the
controller deciding, ASHA with array tasks as workers claiming pieces; both end with the decisions of
the local launcher on the same (fake trainer) metrics. A fast test checks the arrays a Hyperband stage
submits with a recording sbatch."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from flame.experiments import api
from tests.experiments.test_schedulers import spec_text
from tests.helpers import PYTHON, ROOT, env
from tests.launch.conftest import slurm_cluster  # noqa: F401  (the fixture)

SPACE = '{ "optimizer.lr" = { grid = [1e-3, 3e-3, 1e-2, 3e-2] }, "training.seed" = { grid = [0, 1, 2] } }'


def lines(root) -> list[dict]:
    with open(os.path.join(root, "search", "decisions.jsonl")) as f:
        return [json.loads(x) for x in f]


def events(root) -> list[dict]:
    with open(os.path.join(root, "records.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_hyperband_submits_one_array_per_bracket_and_rung(write_spec, fake_sbatch, tmp_path):
    log = fake_sbatch(1000)
    text = spec_text("hyperband", space=SPACE).replace('"{root}"', f'"{tmp_path / "exp"}"')
    api.run(write_spec(text), launcher="slurm", echo=lambda *a, **k: None)
    calls = log.read_text().splitlines()
    # bracket s=2 starts 9 trials at 1 step, s=1 starts 3 at 3 steps: two arrays, then the controller
    assert [c.split("--array=")[1].split()[0] for c in calls[:2]] == ["0-8%2", "0-2%2"]
    assert "flame.experiments.slurm controller" in calls[2] and "afterany:100:101" in calls[2]


def run_on_slurm(spec, root, timeout: float) -> None:
    extra = {"FLAME_STAGE_KINDS": "tests.experiments.fake_kind"}
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "run", str(spec), "--launcher", "slurm"],
        cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    end = time.monotonic() + timeout
    while not any(e["event"] == "experiment" for e in events(root)):
        if time.monotonic() > end:
            subprocess.run(["scancel", "--name", f"flame-{root.name}-controller"], capture_output=True)
            raise AssertionError(f"not done after {timeout} s: {(root / 'records.jsonl').read_text()[-3000:]}")
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.parametrize("kind,parallel", [("hyperband", 2), ("asha", 1)])
def test_slurm_decisions_equal_the_local_launchers(slurm_cluster, write_spec, tmp_path, kind, parallel):  # noqa: F811
    text = spec_text(kind, space=SPACE).replace("max_parallel = 2", f"max_parallel = {parallel}")
    spec = write_spec(text.replace('"{root}"', f'"{tmp_path / "slurm"}"'), "slurm.toml")
    run_on_slurm(spec, tmp_path / "slurm", 600)
    os.environ["FLAME_STAGE_KINDS"] = "tests.experiments.fake_kind"
    local = write_spec(text.replace('"{root}"', f'"{tmp_path / "local"}"'), "local.toml")
    api.run(local, echo=lambda *a, **k: None)
    assert lines(tmp_path / "slurm") == lines(tmp_path / "local")
    got, want = api.status(spec)["stages"][0], api.status(local)["stages"][0]
    assert got["best"] == want["best"]
    assert sorted((t["id"], t["status"], t.get("rung")) for t in got["trials"]) == sorted(
        (t["id"], t["status"], t.get("rung")) for t in want["trials"]
    )
    submitted = [e for e in events(tmp_path / "slurm") if e["event"] in ("submit", "workers")]
    if kind == "asha":
        assert all(e["event"] == "workers" for e in submitted)  # workers only: no per-trial arrays
    else:
        assert all(len({t.split("@")[1] for t in e["trials"]}) == 1 for e in submitted)  # one rung per array


@pytest.mark.slow
def test_asha_workers_never_take_the_same_piece(slurm_cluster, write_spec, tmp_path):  # noqa: F811
    text = spec_text("asha", space=SPACE).replace("max_parallel = 2", "max_parallel = 3")
    spec = write_spec(text.replace('"{root}"', f'"{tmp_path / "slurm"}"'), "slurm.toml")
    run_on_slurm(spec, tmp_path / "slurm", 600)
    claims_dir = tmp_path / "slurm" / "search" / "claims"
    claims = [json.loads((claims_dir / n).read_text()) for n in sorted(os.listdir(claims_dir))]
    keys = [c["key"] for c in claims if not c.get("retake")]
    assert len(keys) == len(set(keys))  # no piece claimed twice (a retake names a dead worker's piece)
    assert len({c["worker"] for c in claims}) >= 2  # the pieces went to several workers
    status = api.status(spec)["stages"][0]
    assert len(status["trials"]) == 12 and status["best"] is not None
    assert lines(tmp_path / "slurm")[-1]["end"] is True


@pytest.mark.slow
def test_a_cancelled_asha_workers_piece_is_taken_again(slurm_cluster, write_spec, tmp_path):  # noqa: F811
    """scancel the worker running a long piece (a promotion to the top rung): the piece is claimed again
    (by the other worker or the next array) and resumes from its checkpoint; the stage still ends with the
    local launcher's best."""
    text = spec_text("asha", space=SPACE)
    root = tmp_path / "slurm"
    spec = write_spec(text.replace('"{root}"', f'"{root}"'), "slurm.toml")
    extra = {"FLAME_STAGE_KINDS": "tests.experiments.fake_kind", "FAKE_STEP_SECONDS": "0.7"}
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "run", str(spec), "--launcher", "slurm"],
        cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    claims_dir = root / "search" / "claims"

    def long_piece():
        for n in sorted(os.listdir(claims_dir)) if claims_dir.is_dir() else []:
            c = json.loads((claims_dir / n).read_text())
            ck = root / "search" / c["key"].split("@")[0] / "checkpoint"
            if c["key"].endswith("@rung2") and ck.is_dir() and any(p.name == "step-4" for p in ck.iterdir()):
                return c
        return None

    end = time.monotonic() + 300
    while long_piece() is None:
        assert time.monotonic() < end, "no promotion to the top rung started"
        time.sleep(0.2)
    piece = long_piece()
    subprocess.run(["scancel", piece["worker"]], check=True)
    end = time.monotonic() + 600
    while not any(e["event"] == "experiment" for e in events(root)):
        assert time.monotonic() < end, (root / "records.jsonl").read_text()[-3000:]
        time.sleep(1)
    claims = [json.loads((claims_dir / n).read_text()) for n in sorted(os.listdir(claims_dir))]
    assert any(c["key"] == piece["key"] and c.get("retake") for c in claims)
    trunk = root / "search" / piece["key"].split("@")[0]
    assert "resumed at step" in (trunk / "train.log").read_text()
    os.environ["FLAME_STAGE_KINDS"] = extra["FLAME_STAGE_KINDS"]
    local = write_spec(text.replace('"{root}"', f'"{tmp_path / "local"}"'), "local.toml")
    api.run(local, echo=lambda *a, **k: None)
    assert api.status(spec)["stages"][0]["best"] == api.status(local)["stages"][0]["best"]
