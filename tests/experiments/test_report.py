"""The report of a finished toy experiment (fake trainer, recorded metrics): tables match ``status --json``,
every figure is a valid PNG with one artist per trial, the HTML is self-contained, best_<stage>.toml is the
best trial's config, summary.txt names the winners, and the TensorBoard view holds every trial."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from flame.config.loader import load_toml
from flame.experiments import api
from flame.experiments.report import plots
from flame.experiments.report.collect import collect
from tests.experiments.conftest import FAKE
from tests.experiments.report_fixtures import TOY, md_tables, png_size
from tests.helpers import PYTHON, ROOT, env


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def toy(tmp_path_factory, base_toml):
    """The toy experiment, run once; the report is written by the end-of-experiment hook."""
    folder = tmp_path_factory.mktemp("toy")
    spec = folder / "toy.toml"
    spec.write_text(TOY.replace("{base}", base_toml).replace("{root}", str(folder / "exp")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLAME_STAGE_KINDS", FAKE)
        mp.setenv("PYTHONPATH", str(ROOT))
        import tests.experiments.fake_kind  # noqa: F401

        api.run(spec, echo=quiet)
    return spec, folder / "exp"


def status_json(spec) -> dict:
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "status", str(spec), "--json"],
        cwd=ROOT,
        env=env(FLAME_STAGE_KINDS=FAKE),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_end_of_the_experiment_writes_the_report(toy):
    _, root = toy
    report = root / "report"
    for name in ("report.md", "report.html", "best_search.toml", "best_final.toml", "best_probe.toml"):
        assert (report / name).is_file(), name
    assert (root / "summary.txt").is_file()


def test_every_table_row_matches_status_json(toy):
    spec, root = toy
    status = status_json(spec)
    tables = md_tables((root / "report" / "report.md").read_text())
    assert sorted(tables) == ["final", "probe", "search"]
    for stage in status["stages"]:
        rows = tables[stage["name"]]
        assert len(rows) == len(stage["trials"]) == {"search": 12, "final": 4, "probe": 2}[stage["name"]]
        by_id = {t["id"]: t for t in stage["trials"]}
        assert sorted(r[1] for r in rows) == sorted(by_id)
        for row in rows:
            t = by_id[row[1]]
            mark, _, contender, params, metric, steps, tokens, wall, state, rung = row
            assert (mark == "★") == (t["id"] == stage["best"])
            assert contender == (t["contender"] or "-")
            assert state == t["status"]
            assert steps == f"{t['step']}/{t['steps']}"
            for key, value in t["params"].items():
                assert f"{key}=" in params
                shown = params.split(f"{key}=")[1].split(" ")[0]
                assert (
                    (float(shown) == pytest.approx(value, rel=1e-2))
                    if isinstance(value, float)
                    else shown == str(value)
                )
            if t["metric"] is None:
                assert metric == "-"
            else:
                assert float(metric) == pytest.approx(t["metric"], rel=1e-4)
            assert rung == "-"  # no scheduler here
            assert wall != "-" and tokens != "-"  # the records' wall time; tokens from the config
        # sorted by the metric (min), the best first, failed trials (no metric) last
        metrics = [by_id[r[1]]["metric"] for r in rows]
        known = [m for m in metrics if m is not None]
        assert known == sorted(known) and metrics[: len(known)] == known
        assert rows[0][1] == stage["best"]
    probe = next(s for s in status["stages"] if s["name"] == "probe")
    assert sorted(t["status"] for t in probe["trials"]) == ["done", "failed"]


def test_every_figure_is_a_png_with_one_artist_per_trial(toy):
    spec, root = toy
    exp = api._spec(str(spec), None)
    stages = {s.name: s for s in collect(exp, api.status(exp))}
    plot_dir = root / "report" / "plots"
    names = sorted(os.listdir(plot_dir))
    assert names == sorted(
        [
            "search_loss.png",
            "search_box.png",
            "search_params.png",
            "search_importance.png",
            "final_loss.png",
            "final_box.png",
            "final_params.png",
            "probe_loss.png",
            "probe_params.png",
        ]
    ), names
    for name in names:
        width, height = png_size(plot_dir / name)
        assert 500 <= width <= 2000 and 250 <= height <= 2000, (name, width, height)
        assert 5_000 < (plot_dir / name).stat().st_size < 1_000_000
    for stage in stages.values():
        ids = {t.id for t in stage.trials}
        fig = plots.loss_figure(stage)
        train_ax = fig.axes[0]
        assert sorted(line.get_gid() for line in train_ax.get_lines()) == sorted(ids)  # one line per trial
        (best,) = [line for line in train_ax.get_lines() if line.get_gid() == stage.best.id]
        assert best.get_linewidth() > max(line.get_linewidth() for line in train_ax.get_lines() if line is not best)
        val_ax = fig.axes[1]  # validation: every trial that validated (the failed one did not)
        validated = {t.id for t in stage.trials if t.status != "failed"}
        assert {line.get_gid() for line in val_ax.get_lines()} == validated
        for line in train_ax.get_lines():  # x: tokens, batch x seq_len per step
            trial = next(t for t in stage.trials if t.id == line.get_gid())
            assert list(line.get_xdata()) == [s * 4 * 32 for s in trial.curve.steps]
    search = stages["search"]
    fig = plots.box_figure(search)  # a box per contender, a point per finished trial
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]  # the winning contender first
    assert sorted(labels) == ["long", "short"] and labels[0] == search.best.contender
    points = [c for c in fig.axes[0].collections if c.get_gid() in ("short", "long")]
    assert sum(len(c.get_offsets()) for c in points) == 12
    fig = plots.params_figure(search)  # lr (log-sampled: log axis), warmup, seed; a point per trial each
    assert [ax.get_xlabel() for ax in fig.axes if ax.get_visible()] == [
        "optimizer.lr (log)",
        "lr_scheduler.warmup_steps",
        "training.seed",
    ]
    assert [ax.get_xscale() for ax in fig.axes[:3]] == ["log", "linear", "linear"]
    for ax in fig.axes[:3]:
        assert sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == "trials") == 12
    importances, notes = plots.optuna_importances(search)
    assert sorted(importances) == ["optuna-group0", "optuna-group1"] and notes == []
    for values in importances.values():  # fANOVA's shares of the variance: the two sampled keys
        assert sorted(values) == ["lr_scheduler.warmup_steps", "optimizer.lr"]
        assert sum(values.values()) == pytest.approx(1.0) and all(0 <= v <= 1 for v in values.values())
    fig = plots.importance_figure(search, importances)
    assert [len(ax.patches) for ax in fig.axes] == [2, 2]  # a bar per key, a panel per study
    assert plots.rung_figure(search) is None  # no scheduler: no ladder


def test_the_html_is_self_contained(toy):
    _, root = toy
    text = (root / "report" / "report.html").read_text()
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text, flags=re.I)
    assert len(sources) == 9 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"url\(|@import|<link|<iframe|<object|<embed", text, flags=re.I)
    assert re.search(r"<script(?![^>]*src)", text)  # inline only


def test_best_toml_is_the_best_trials_config(toy):
    spec, root = toy
    status = api.status(str(spec))
    for stage in status["stages"]:
        best = next(t for t in stage["trials"] if t["id"] == stage["best"])
        written = root / "report" / f"best_{stage['name']}.toml"
        head = written.read_text().splitlines()[:2]
        assert head[0].startswith(f"# best trial of stage '{stage['name']}': {best['id']}")
        assert head[1] == "# Hugging Face export: none"
        config = load_toml(str(written))  # the resolved training TOML, loadable as it is
        assert config.job.dump_folder == best["dump_folder"]
        for key, value in best["params"].items():
            section, _, name = key.partition(".")
            assert getattr(getattr(config, section), name) == value
        assert config.metrics.enable_tensorboard  # on by default inside experiments


def test_summary_txt_names_the_winners(toy):
    spec, root = toy
    status = api.status(str(spec))
    lines = (root / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("experiment toy (") and "complete" in lines[0]
    for stage in status["stages"]:
        best = next(t for t in stage["trials"] if t["id"] == stage["best"])
        (line,) = [ln for ln in lines if ln.startswith(f"{stage['name']}: best ")]
        assert best["id"] in line and f"validation_loss {best['metric']:.5g}" in line
    search = next(s for s in status["stages"] if s["name"] == "search")
    (line,) = [ln for ln in lines if ln.startswith("search: best ")]
    assert "12 trials: 2 done, 10 masked" in line and "over 2 trials (seeds)" in line
    total = next(ln for ln in lines if ln.startswith("cost: "))
    steps = sum(t["step"] for s in status["stages"] for t in s["trials"])
    assert f"{sum(len(s['trials']) for s in status['stages'])} trials, {steps:,} steps" in total
    assert math.isfinite(search["trials"][0]["metric"])


def test_report_command_rewrites_the_report(toy):
    spec, root = toy
    html = root / "report" / "report.html"
    before = html.stat().st_mtime_ns
    proc = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "report", str(spec)],
        cwd=ROOT,
        env=env(FLAME_STAGE_KINDS=FAKE),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"report: {html}" in proc.stdout
    assert html.stat().st_mtime_ns > before
    bad = subprocess.run(
        [PYTHON, "-m", "flame.experiment", "report", str(spec.parent / "missing.toml")],
        cwd=ROOT,
        env=env(FLAME_STAGE_KINDS=FAKE),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "missing.toml" in bad.stderr


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium; CI installs it)")
    return path


def test_chromium_renders_the_report_with_every_image(toy, tmp_path):
    _, root = toy
    browser = chromium()
    url = (root / "report" / "report.html").as_uri()
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the report's own check, run by the browser after load: every <img> decoded (naturalWidth > 0)
    assert 'data-images-loaded="9/9"' in dom.stdout, re.findall(r"<body[^>]*>", dom.stdout)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--window-size=1000,2600",
            f"--screenshot={shot}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image, ImageStat

    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 2600)
    gray = image.convert("L")
    assert ImageStat.Stat(gray).stddev[0] > 20  # not a blank page
    colors = image.getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 500  # text, tables and plots, not one flat colour
    # the lower part of the page (figures) holds colour: the plots' lines and points were drawn
    lower = image.crop((0, 1300, 1000, 2600))
    pixels = np.asarray(lower, dtype=np.int16)
    saturated = int(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).sum())
    assert saturated > 1000, saturated


def test_tensorboard_finds_every_trial_under_one_logdir(toy):
    """The fake trainer writes no event files: give each trial some (as the trainer's TensorBoard sink
    would), write the report again, and read the one logdir with TensorBoard's own loaders."""
    spec, root = toy
    from torch.utils.tensorboard import SummaryWriter

    status = api.status(str(spec))
    trials = [(s["name"], t) for s in status["stages"] for t in s["trials"]]
    for _, t in trials:
        writer = SummaryWriter(os.path.join(t["dump_folder"], "tb"))
        for step, value in enumerate([3.0, 2.0, 1.5], start=1):
            writer.add_scalar("loss", value, step)
        writer.close()
    from flame.experiments.report import write

    paths = write(api._spec(str(spec), None), status)
    assert paths["tensorboard"]["trials"] == len(trials) == 18
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    logdir = root / "tensorboard"
    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    assert sorted(mux.Runs()) == sorted(f"{stage}/{t['id']}" for stage, t in trials)
    from tensorboard.plugins.hparams import plugin_data_pb2

    for stage, t in trials:
        acc = EventAccumulator(str(logdir / stage / t["id"]))
        acc.Reload()
        assert [e.value for e in acc.Scalars("loss")] == [3.0, 2.0, 1.5]
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hp = start.session_start_info.hparams
        assert hp["stage"].string_value == stage
        for key, value in t["params"].items():
            assert hp[key].number_value == pytest.approx(value)
        if t["contender"]:
            assert hp["contender"].string_value == t["contender"]
        end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
        assert end.session_end_info.status == (2 if t["status"] == "failed" else 1)  # FAILURE / SUCCESS
    for path in (logdir / "search").rglob("*tfevents*"):  # links to the trials' files, not copies
        if not path.name.endswith(".flame-hparams"):
            assert path.is_symlink() and str(path.resolve()).startswith(str(root / "search"))


def test_wandb_group_is_the_experiment_and_job_type_the_stage(tmp_path, monkeypatch):
    from flame.components.metrics import wandb_grouping

    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.delenv("WANDB_JOB_TYPE", raising=False)
    assert wandb_grouping(str(tmp_path)) == {}  # not a trial: no group
    (tmp_path / "trial.json").write_text(json.dumps({"experiment": "toy", "stage": "search", "id": "x"}))
    assert wandb_grouping(str(tmp_path)) == {"group": "toy", "job_type": "search"}
    monkeypatch.setenv("WANDB_RUN_GROUP", "mine")  # the user's own setting wins (wandb reads it)
    assert wandb_grouping(str(tmp_path)) == {"job_type": "search"}


@pytest.mark.parametrize("status", ["done", "masked", "failed", "pruned", "stopped", "running", "pending"])
def test_hparams_session_of_every_trial_status(tmp_path, status):
    """Each trial status gets an HParams session TensorBoard reads back; ended ones with an end status
    TensorBoard has (a stopped or pruned trial once named one it lacks, and the report failed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from flame.experiments.report.tensorboard import write_hparams

    write_hparams(str(tmp_path), {"optimizer.lr": 1e-3}, status)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.PluginTagToContent("hparams")
    assert metadata.SESSION_START_INFO_TAG in tags
    assert (metadata.SESSION_END_INFO_TAG in tags) == (status not in ("running", "pending"))
