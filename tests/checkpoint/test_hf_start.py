"""Continue pretraining from a Hugging Face model: a direct initial load, and convert_hf_to_dcp's step-0.

Both must start training with exactly that model's weights: the trainer's tensors equal the folder's
(upcast to float32), and the first logged loss (log_freq 1: the step's mean loss over target tokens)
equals the loss transformers computes for that model on the first batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flame.config.errors import ConfigError
from flame.utils.convert_hf_to_dcp import convert_hf_to_dcp
from tests.checkpoint.conftest import build_trainer
from tests.helpers import read_metrics


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def hf_model(request, tmp_path_factory, llama_json, byte_tokenizer) -> str:
    """A tied tiny Llama saved with save_pretrained (safetensors; lm_head.weight is not stored when tied)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flame.models.build import load_model_config

    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    config = load_model_config(
        llama_json(root / "config.json", tie_word_embeddings=True), AutoTokenizer.from_pretrained(byte_tokenizer)
    )
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, request.param))
    model.save_pretrained(root / "model")
    return str(root / "model")


def transformers_first_loss(folder: str, trainer) -> float:
    """The loss of the HF model (float32) on the first batch the trainer's data loader yields."""
    from transformers import AutoModelForCausalLM

    from flame.data import build_dataloader

    batch = next(iter(build_dataloader(trainer.config.training, trainer.tokenizer)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()


def assert_holds_the_hf_weights(trainer, folder: str) -> None:
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    actual = trainer.model.state_dict()
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key
    assert trainer.model.lm_head.weight is trainer.model.model.embed_tokens.weight  # still tied


def train_and_first_loss(trainer) -> float:
    try:
        trainer.train()
    finally:
        trainer.close()
    return read_metrics(trainer.config.job.dump_folder)[0]["loss"]


def test_initial_load_hf_starts_from_exactly_the_hf_model(hf_model, run_flags, tmp_path):
    args = run_flags(tmp_path / "run", model__config=hf_model, checkpoint__initial_load_hf=hf_model,
                     checkpoint__enable_checkpoint="true", checkpoint__interval=1, training__steps=2)  # fmt: skip
    trainer = build_trainer(args)
    assert trainer.checkpointer.loaded_from == f"initial weights from Hugging Face folder {hf_model}"
    assert_holds_the_hf_weights(trainer, hf_model)
    expected = transformers_first_loss(hf_model, trainer)
    assert abs(train_and_first_loss(trainer) - expected) <= 1e-6

    # With a checkpoint in the folder the Hugging Face weights are not loaded again: the run resumes.
    resumed = build_trainer([*args[:-2], "--training.steps", "3"])
    try:
        assert resumed.checkpointer.loaded_from == "resumed at step 2"
        assert resumed.state.step == 2
    finally:
        resumed.close()


def test_convert_hf_to_dcp_step0_starts_from_exactly_the_hf_model(hf_model, run_flags, tmp_path):
    dump = tmp_path / "run"
    convert_hf_to_dcp(hf_model, str(dump / "checkpoint" / "step-0"))
    trainer = build_trainer(run_flags(dump, model__config=hf_model, checkpoint__enable_checkpoint="true",
                                      training__steps=2))  # fmt: skip
    assert trainer.checkpointer.loaded_from == "initial weights from step-0"
    assert trainer.state.step == 0
    assert_holds_the_hf_weights(trainer, hf_model)
    expected = transformers_first_loss(hf_model, trainer)
    assert abs(train_and_first_loss(trainer) - expected) <= 1e-6


def test_hf_folder_that_does_not_fit_the_model_config_is_a_config_error(hf_model, run_flags, tmp_path, llama_json):
    other = llama_json(tmp_path / "other.json", intermediate_size=96)
    args = run_flags(tmp_path / "run", model__config=other, checkpoint__initial_load_hf=hf_model)
    with pytest.raises(ConfigError, match=r"initial_load_hf .*: model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
                                          r"\[\d+, \d+\] there but .* in the model; use the folder's own config"):  # fmt: skip
        build_trainer(args)
    assert not (tmp_path / "run").exists()  # nothing written
