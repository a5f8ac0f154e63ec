"""Context parallelism: the layout, config validation, the attention function under torchrun, and GPU paths.

The end-to-end layouts (CP x2, TP x CP, FSDP x CP, PP x CP, varlen, resume) are in test_layouts.py.
"""

from __future__ import annotations

import pytest
import torch

from flame.config.errors import ConfigError
from flame.config.schema import JobConfig
from flame.config.validate import validate
from flame.parallel.context_parallel import choose_path, gathered_order, shard_indices
from tests.helpers import read_metrics, torchrun, train, valid_config


def test_shards_are_head_and_tail_chunks_and_cover_the_sequence():
    assert shard_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    order = gathered_order(24, 3)
    assert sorted(order.tolist()) == list(range(24))
    assert order[:8].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


def _config(tmp_path, model: str = "llama_demo.json", **experimental) -> JobConfig:
    config = valid_config(tmp_path, model)
    config.training.seq_len = 64
    config.experimental.context_parallel_degree = 2
    for key, value in experimental.items():
        setattr(config.experimental, key, value)
    return config


def test_validation_accepts_cp_alone_and_with_tp_fsdp_pp(tmp_path):
    validate(_config(tmp_path), world_size=2)
    config = _config(tmp_path, pipeline_parallel_degree=2)
    config.training.tensor_parallel_degree = 2
    validate(config, world_size=16)  # dp_shard 2 x tp 2 x pp 2 x cp 2


def test_validation_names_every_context_parallel_problem(tmp_path):
    config = _config(tmp_path, context_parallel_rotate_method="alltoall")
    config.training.seq_len = 66
    config.training.varlen = True
    with pytest.raises(ConfigError) as e:
        validate(config, world_size=2)
    text = str(e.value)
    assert "--training.seq_len 66 is not divisible by 2 x --experimental.context_parallel_degree = 4" in text
    assert "alltoall is torch's ring attention" in text and "use allgather" in text

    config = _config(tmp_path)
    config.training.seq_len = 68  # 34 tokens per CP rank: not divisible by tp 4
    config.training.tensor_parallel_degree = 4
    with pytest.raises(ConfigError, match="each context-parallel rank holds 34 tokens"):
        validate(config, world_size=8)

    with pytest.raises(
        ConfigError, match=r"fla model family 'hgrn2' has no context-parallel path.*: delta_net, gated_deltanet, gla"
    ):
        validate(_config(tmp_path, "models/hgrn2_340m.json"), world_size=2, device_type="cuda")
    validate(_config(tmp_path, "models/gla_340m.json"), world_size=2, device_type="cuda")  # state passing
    config = _config(tmp_path, "models/gla_340m.json", context_parallel_rotate_method="alltoall")
    config.training.varlen = True
    with pytest.raises(ConfigError) as e:
        validate(config, world_size=2, device_type="cuda")
    assert "fla models pass recurrent states between the chunks" in str(e.value)
    assert "--training.varlen with --experimental.context_parallel_degree 2" in str(e.value)
    with pytest.raises(ConfigError, match="model family 'ember' is not known to route its attention"):
        validate(_config(tmp_path, "models/ember_5m.json"), world_size=2)


def test_the_path_is_ring_only_for_plain_causal_attention_on_cuda():
    assert choose_path("cuda", varlen=False, sliding_window=False, rotate_method="alltoall")[0] == "ring"
    assert choose_path("cpu", varlen=False, sliding_window=False, rotate_method="allgather")[0] == "allgather"
    assert choose_path("cuda", varlen=True, sliding_window=False, rotate_method="allgather")[0] == "allgather"
    path, why = choose_path("cuda", varlen=False, sliding_window=True, rotate_method="allgather")
    assert path == "allgather" and "sliding-window" in why
    with pytest.raises(ConfigError, match=r"alltoall.*applies to plain causal attention on CUDA only"):
        choose_path("cuda", varlen=True, sliding_window=False, rotate_method="alltoall")


def test_allgather_attention_equals_full_sequence_sdpa_under_torchrun():
    """Forward and q/k/v gradients of each rank's shard against sdpa over the whole sequence (2 ranks):
    causal with GQA, sliding window, packed documents; within 1e-5 absolute in fp32."""
    proc = torchrun(2, [], module="tests.parallel.cp_attention_check")
    assert "CP ATTENTION OK" in proc.stdout, proc.stdout
    assert proc.stdout.count('"ok": true') == 10


@pytest.mark.gpu
@pytest.mark.parametrize("rotate", ["allgather", "alltoall"])
def test_ring_attention_on_two_gpus_matches_one_gpu(train_args, tmp_path, rotate):
    """torch's ring attention (CUDA, NCCL): CP x2 against one GPU, per-step loss and grad norm."""
    if torch.cuda.device_count() < 2:
        pytest.skip("context parallelism on GPUs needs two of them")
    train(train_args("one", training__steps=5))
    proc = torchrun(
        2,
        train_args(
            "cp", training__steps=5, experimental__context_parallel_degree=2,
            experimental__context_parallel_rotate_method=rotate,
        ),
    )  # fmt: skip
    assert "attention path ring" in proc.stdout
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "cp"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"], (a, b)


def test_state_passing_chunks_must_hold_the_convolution_halo(tmp_path):
    """Gated DeltaNet has short convolutions by default (conv_size 4): each of the 2cp chunks must hold the
    3 tokens the next chunk's convolution reads."""
    config = _config(tmp_path, "models/gated_deltanet_340m.json")
    config.training.seq_len = 8  # 2 ranks: 4 chunks of 2 tokens
    with pytest.raises(ConfigError, match="chunks of 2 tokens are shorter than the model's short convolution"):
        validate(config, world_size=2)
    config.training.seq_len = 12
    validate(config, world_size=2)
