"""The config schema: precedence, types, lists, booleans, unknown names, validation, shipped files."""

from __future__ import annotations

import glob
import json

import pytest

from flame.config.errors import ConfigError
from flame.config.loader import build_parser, field_specs, load_toml, parse_args, save_toml
from flame.config.schema import JobConfig
from flame.config.validate import validate
from tests.helpers import ROOT, valid_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_cli_beats_toml_beats_defaults(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nbatch_size = 3\n[optimizer]\nlr = 0.5\n")
    config = parse_args(["--job.config_file", path, "--training.steps", "9"])
    assert config.training.steps == 9  # CLI
    assert config.training.batch_size == 3  # TOML
    assert config.optimizer.lr == 0.5  # TOML, int-valued float fine
    assert config.training.seq_len == JobConfig().training.seq_len  # default


def test_lists_from_comma_strings_and_toml_arrays(tmp_path):
    path = write(tmp_path, '[training]\ndataset = ["a", "b"]\ndata_probs = "0.7,0.3"\n')
    config = parse_args(["--job.config_file", path])
    assert config.training.dataset == ["a", "b"]
    assert config.training.data_probs == [0.7, 0.3]
    assert parse_args(["--training.data_probs", "1,2"]).training.data_probs == [1.0, 2.0]
    assert parse_args(["--optimizer.betas", "0.8, 0.9"]).optimizer.betas == [0.8, 0.9]


def test_booleans():
    assert parse_args(["--training.compile"]).training.compile is True
    assert parse_args(["--training.compile", "false"]).training.compile is False
    assert parse_args(["--training.compile=true"]).training.compile is True
    assert parse_args([]).training.compile is False


def test_optional_fields_can_be_unset(tmp_path):
    assert parse_args(["--lr_scheduler.decay_ratio", "0.2"]).lr_scheduler.decay_ratio == 0.2
    assert parse_args(["--lr_scheduler.decay_ratio", "none"]).lr_scheduler.decay_ratio is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--training.step", "3"], "unknown flag --training.step. Did you mean '--training.steps'?"),
        (["--training.steps", "3.5"], "--training.steps: expected integer, got '3.5'"),
        (["--optimizer.lr", "fast"], "--optimizer.lr: expected number, got 'fast'"),
        (["--training.compile", "perhaps"], "--training.compile: expected boolean"),
        (["--lr_scheduler.decay_type", "exp"], "choose one of: linear, sqrt, cosine"),
        (["--job.config_file", "/no/such.toml"], "'/no/such.toml' does not exist"),
    ],
)
def test_cli_errors_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[trainig]\nsteps = 1\n", "unknown section [trainig]. Did you mean 'training'?"),
        ("[training]\nstesp = 1\n", "unknown key 'stesp' in [training]. Did you mean 'steps'?"),
        ('[training]\nsteps = "many"\n', "[training] steps: expected integer, got 'many'"),
        ("[training]\nsteps = 1.5\n", "[training] steps: expected integer, got 1.5"),
        ("[training]\ncompile = 1\n", "[training] compile: expected boolean, got 1"),
        ("[training\nsteps = 1\n", "malformed TOML"),
        ("training = 3\n", "must be a [training] table"),
    ],
)
def test_toml_errors_name_file_section_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        parse_args(["--job.config_file", path])
    assert message in str(e.value)
    assert path in str(e.value)


def test_all_problems_are_reported_together(tmp_path):
    path = write(tmp_path, "[training]\nstesp = 1\n[optimizer]\nlr = 'x'\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--job.config_file", path])
    assert len(e.value.problems) == 2


def _valid(tmp_path) -> JobConfig:
    return valid_config(tmp_path)


def test_validate_accepts_a_good_config(tmp_path):
    validate(_valid(tmp_path), world_size=4)


def test_validate_collects_every_problem(tmp_path):
    config = _valid(tmp_path)
    config.training.steps = 0
    config.optimizer.lr = -1
    config.training.data_parallel_shard_degree = 3
    config.lr_scheduler.decay_ratio = 1.5
    config.optimizer.name = "Adamw"
    with pytest.raises(ConfigError) as e:
        validate(config, world_size=2)
    text = str(e.value)
    assert len(e.value.problems) == 5
    assert "--training.steps must be a positive integer, got 0" in text
    assert "--optimizer.lr must be positive" in text
    assert "multiply to 3" in text and "world size is 2" in text
    assert "--lr_scheduler.decay_ratio must be in (0, 1]" in text
    assert "'Adamw' is not an optimizer in torch.optim" in text and "AdamW" in text


def test_validate_rejects_later_features_and_gpu_features_on_cpu(tmp_path):
    config = _valid(tmp_path)
    config.optimizer.early_step_in_backward = True
    config.float8.enable_float8_linear = True
    config.experimental.enable_async_tensor_parallel = True
    with pytest.raises(ConfigError) as e:
        validate(config, world_size=2)
    text = str(e.value)
    assert "--optimizer.early_step_in_backward: optimizer steps in backward is not supported yet" in text
    assert "--float8.enable_float8_linear=True: float8 training needs a CUDA GPU (compute capability 8.9+)" in text
    assert "--float8.emulate runs torchao's emulation" in text
    assert "--experimental.enable_async_tensor_parallel=True: async tensor parallelism needs a CUDA GPU" in text
    assert "enable_async_tensor_parallel needs --training.compile and --training.tensor_parallel_degree > 1" in text


def test_compiled_autograd_is_refused_on_several_ranks(tmp_path):
    config = _valid(tmp_path)
    config.experimental.enable_compiled_autograd = True
    validate(config, world_size=1)
    with pytest.raises(ConfigError, match=r"enable_compiled_autograd runs on one process only \(NGPU=1\), not 2"):
        validate(config, world_size=2)


def test_validate_float8_flag_combinations(tmp_path):
    config = _valid(tmp_path)
    config.float8.enable_fsdp_float8_all_gather = True
    with pytest.raises(
        ConfigError, match=r"enable_fsdp_float8_all_gather only applies with --float8\.enable_float8_linear"
    ):
        validate(config, world_size=2)
    config.float8.enable_float8_linear = config.float8.emulate = True
    config.float8.enable_fsdp_float8_all_gather = False
    config.float8.precompute_float8_dynamic_scale_for_fsdp = True
    config.float8.scaling_type_weight = "delayed"
    config.training.compile = True
    with pytest.raises(ConfigError) as e:
        validate(config, world_size=2)
    text = str(e.value)
    assert "precompute_float8_dynamic_scale_for_fsdp only applies with --float8.enable_fsdp_float8_all_gather" in text
    assert "--float8.scaling_type_weight delayed: torchao's float8 training has dynamic scaling only" in text
    assert "--float8.emulate does not work with --training.compile" in text


def test_dp_shard_minus_one_takes_the_ranks_left_over(tmp_path):
    from flame.config.validate import resolve_dp_shard

    config = _valid(tmp_path)
    config.training.data_parallel_replicate_degree = 2
    assert resolve_dp_shard(config, 8) == 4
    validate(config, world_size=8)


def test_saved_config_reloads_equal(tmp_path):
    config = parse_args(["--training.steps", "5", "--training.dataset", "a,b", "--lr_scheduler.decay_ratio", "0.1"])
    save_toml(config, str(tmp_path / "config.toml"))
    assert load_toml(str(tmp_path / "config.toml")) == config


def test_help_lists_every_flag_with_its_default():
    text = build_parser().format_help()
    for section, fields in field_specs().items():
        assert f"[{section}]" in text
        for spec in fields.values():
            assert spec.flag in text
    assert "(default: 'AdamW'" in text


def test_every_shipped_config_loads():
    experiments = ROOT / "configs" / "experiments"  # experiment specs: tests/experiments/test_configs.py
    tomls = sorted(glob.glob(str(ROOT / "configs" / "**" / "*.toml"), recursive=True))
    tomls = [p for p in tomls if not p.startswith(str(experiments))]
    jsons = sorted(glob.glob(str(ROOT / "configs" / "**" / "*.json"), recursive=True))
    assert tomls and jsons
    for path in tomls:
        load_toml(path)
    import fla  # noqa: F401  (registers the flash-linear-attention model types)
    from transformers import AutoConfig

    import custom_models  # noqa: F401  (registers flame's example architecture)

    for path in jsons:
        assert AutoConfig.from_pretrained(path).model_type == json.load(open(path))["model_type"]
