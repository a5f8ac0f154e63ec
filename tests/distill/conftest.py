"""Fixtures of the distillation tests: teachers (a Hugging Face folder with a padded vocabulary, a flame
run), another tokenizer, and a one-rank process group for building teachers in the test process."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_byte_tokenizer
from tests.helpers import train

PADDED_VOCAB = 300  # the byte tokenizer has 257 tokens: 43 padding rows, like Qwen's 152,064 vs 151,936


def llama_config(vocab_size: int, hidden: int = 32, layers: int = 2, **extra) -> dict:
    return {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "vocab_size": vocab_size, "tie_word_embeddings": False, **extra,
    }  # fmt: skip


@pytest.fixture(scope="session")
def hf_teacher(tmp_path_factory, byte_tokenizer) -> str:
    """A randomly initialised Llama saved with save_pretrained, embedding padded to 300 rows, with the
    student's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf_teacher")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_config(PADDED_VOCAB, hidden=48)))
    with torch.no_grad():  # make the padding rows loud: they must never matter
        model.lm_head.weight[257:] *= 50
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(byte_tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> str:
    """A tokenizer with one token more than the byte tokenizer (another vocabulary)."""
    from transformers import AutoTokenizer

    path = make_byte_tokenizer(str(tmp_path_factory.mktemp("other_tokenizer")))
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_model_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher_model") / "teacher.json"
    path.write_text(json.dumps(llama_config(257, hidden=48, layers=3)))
    return str(path)


@pytest.fixture(scope="session")
def run_teacher(tmp_path_factory, byte_tokenizer, fixed_docs, teacher_model_json) -> str:
    """A flame run folder trained for 4 steps with checkpoints at steps 2 and 4."""
    from tests.conftest import SEQ_LEN

    dump = tmp_path_factory.mktemp("run_teacher")
    flags = {
        "job.dump_folder": str(dump), "model.config": teacher_model_json, "model.tokenizer_path": byte_tokenizer,
        "training.dataset": "json", "training.data_files": fixed_docs, "training.seq_len": str(SEQ_LEN),
        "training.batch_size": "4", "training.steps": "4", "training.mixed_precision_param": "float32",
        "lr_scheduler.warmup_steps": "1", "optimizer.lr": "3e-3", "checkpoint.enable_checkpoint": "true",
        "checkpoint.interval": "2",
    }  # fmt: skip
    train([item for k, v in flags.items() for item in (f"--{k}", v)])
    return str(dump)


@pytest.fixture
def one_rank():
    """A one-rank gloo process group and its (trivial) ParallelDims, as the trainer has in one process."""
    import torch.distributed as dist

    import flame.distributed.titan  # noqa: F401
    from flame.distributed.setup import init_distributed

    from torchtitan.distributed.parallel_dims import ParallelDims

    owns = init_distributed(60)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    dims.build_mesh()
    yield dims
    if owns:
        dist.destroy_process_group()
