"""The [distill] section: flags, TOML, help, and the bad-input matrix (one message each, exit code 2)."""

from __future__ import annotations

import pytest

from flame.config.errors import ConfigError
from flame.config.loader import build_parser, load_toml, parse_args, save_toml
from flame.config.validate import validate
from flame.distill.schedule import alpha_at
from tests.helpers import train

BAD = [
    ("teacher-missing", {"distill.teacher": "/nonexistent/teacher"}, "--distill.teacher: '/nonexistent/teacher' does not exist"),
    ("alpha", {"distill.alpha": "1.5"}, "--distill.alpha must be in [0, 1]"),
    ("alpha-start", {"distill.alpha_schedule": "linear", "distill.alpha_start": "-0.1"}, "--distill.alpha_start must be in [0, 1]"),
    ("temperature", {"distill.temperature": "0"}, "--distill.temperature must be > 0"),
    ("beta", {"distill.loss": "jsd", "distill.beta": "1.2"}, "--distill.beta must be in [0, 1]"),
    ("beta-without-jsd", {"distill.beta": "0.2"}, "--distill.beta only applies with --distill.loss jsd"),
    ("top-k-zero", {"distill.top_k": "0"}, "--distill.top_k must be >= 1"),
    ("top-k-above-vocab", {"distill.top_k": "300"}, "--distill.top_k 300 is larger than the vocabulary of --model.tokenizer_path (257 tokens)"),
    ("schedule-flag", {"distill.alpha_end": "0.2"}, "--distill.alpha_end only applies with --distill.alpha_schedule wsd"),
    ("wsd-overlap", {"distill.alpha_schedule": "wsd", "distill.alpha_warmup_steps": "8", "distill.alpha_decay_ratio": "0.5"}, "overlap: together they exceed --training.steps 10"),
    ("pipeline", {"experimental.pipeline_parallel_degree": "2", "training.data_parallel_shard_degree": "1"}, "--distill with --experimental.pipeline_parallel_degree > 1 is not supported"),
    ("cache-missing", {"distill.teacher": None, "distill.teacher_cache": "/nonexistent/cache", "distill.top_k": "4"}, "does not exist; write it with python -m flame.distill.cache"),
]  # fmt: skip


@pytest.fixture
def flags(train_args, hf_teacher):
    def make(overrides: dict) -> list[str]:
        values = {"distill.teacher": hf_teacher, **overrides}
        base = train_args("run")
        return base + [item for k, v in values.items() if v is not None for item in (f"--{k}", v)]

    return make


@pytest.mark.parametrize(("overrides", "needle"), [(o, n) for _, o, n in BAD], ids=[i for i, _, _ in BAD])
def test_bad_distill_input_is_one_clear_problem(flags, overrides, needle):
    world = 2 if "experimental.pipeline_parallel_degree" in overrides else 1
    with pytest.raises(ConfigError) as e:
        validate(parse_args(flags(overrides)), world_size=world)
    assert any(needle in p for p in e.value.problems), e.value.problems


def test_teacher_with_another_tokenizer_names_both(flags, other_tokenizer, hf_teacher):
    with pytest.raises(ConfigError) as e:
        validate(parse_args(flags({"model.tokenizer_path": other_tokenizer})), world_size=1)
    (problem,) = [p for p in e.value.problems if "distill" in p]
    assert f"its tokenizer {hf_teacher} (257 tokens)" in problem and f"{other_tokenizer} (258 tokens)" in problem


def test_teacher_step_absent(flags, run_teacher):
    with pytest.raises(ConfigError, match=r"--distill.teacher_step 3: .* \(complete steps: 2, 4\)"):
        validate(parse_args(flags({"distill.teacher": run_teacher, "distill.teacher_step": "3"})), world_size=1)
    validate(parse_args(flags({"distill.teacher": run_teacher, "distill.teacher_step": "2"})), world_size=1)


def test_distill_flags_without_a_teacher_are_refused(train_args):
    with pytest.raises(ConfigError, match=r"--distill\.alpha only applies with --distill\.teacher"):
        validate(parse_args([*train_args("run"), "--distill.alpha", "0.3"]), world_size=1)
    validate(parse_args(train_args("run")), world_size=1)  # no [distill]: fine


def test_section_in_toml_help_and_saved_config(tmp_path, hf_teacher):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[distill]\nteacher = "{hf_teacher}"\nloss = "jsd"\nbeta = 0.25\ntemperature = 2.0\ntop_k = 16\n'
        'alpha_schedule = "wsd"\nalpha_warmup_steps = 5\nalpha_decay_ratio = 0.2\nalpha_end = 0.1\n'
    )
    config = parse_args(["--job.config_file", str(toml), "--distill.alpha", "0.7"])
    d = config.distill
    assert (d.loss, d.beta, d.temperature, d.top_k, d.alpha, d.alpha_schedule) == ("jsd", 0.25, 2.0, 16, 0.7, "wsd")
    save_toml(config, str(tmp_path / "saved.toml"))
    assert load_toml(str(tmp_path / "saved.toml")).distill == d
    help_text = build_parser().format_help()
    for flag in (
        "--distill.teacher ",
        "--distill.teacher_cache",
        "--distill.beta",
        "--distill.top_k",
        "--distill.chunk_size",
    ):
        assert flag in help_text
    assert "beta 0 is exactly forward_kl, beta 1 exactly reverse_kl" in " ".join(help_text.split())
    with pytest.raises(ConfigError, match="'kl' is not allowed; choose one of: forward_kl, reverse_kl, jsd, tvd"):
        parse_args(["--distill.loss", "kl"])


def test_alpha_schedules():
    from flame.config.schema import Distill

    steps = 10
    constant = Distill(alpha=0.4)
    assert [alpha_at(s, steps, constant) for s in (1, 5, 10)] == [0.4, 0.4, 0.4]
    linear = Distill(alpha=0.8, alpha_schedule="linear", alpha_start=0.2)
    assert [round(alpha_at(s, steps, linear), 6) for s in (1, 4, 10)] == [0.2, 0.4, 0.8]
    wsd = Distill(
        alpha=0.6, alpha_schedule="wsd", alpha_start=0.0, alpha_warmup_steps=2, alpha_decay_ratio=0.3, alpha_end=0.0
    )
    assert [round(alpha_at(s, steps, wsd), 6) for s in range(1, 11)] == [
        0.3,
        0.6,
        0.6,
        0.6,
        0.6,
        0.6,
        0.6,
        0.4,
        0.2,
        0.0,
    ]


def test_cli_exits_2_before_any_work(train_args, tmp_path):
    proc = train([*train_args("run"), "--distill.teacher", "/nonexistent/teacher"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("flame: error:") == 1 and "Traceback" not in proc.stderr
    assert "--distill.teacher: '/nonexistent/teacher' does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()
