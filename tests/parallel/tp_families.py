"""Run under torchrun: tensor (+ sequence) parallel forward and backward of each family with a TP plan,
against the same model on one rank. Prints one JSON line per family and variant on rank 0.

    torchrun --nproc_per_node=2 -m tests.parallel.tp_families
"""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

import flame.models.families  # noqa: F401  (registers the model families)
from flame.models.adapters import adapter_for
from flame.parallel.tensor_parallel import apply_tensor_parallel

COMMON = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 96, "tie_word_embeddings": False, "use_cache": False,
}  # fmt: skip
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "olmo2": {},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                "logits_scaling": 4.0},
}  # fmt: skip


# fla families (flame's CPU path for their kernels), with every optional part their plans cover.
FLA_FAMILIES = {
    "gla": {"hidden_size": 64, "num_heads": 4, "expand_k": 0.5, "expand_v": 1, "use_short_conv": True,
            "conv_size": 4, "use_output_gate": True, "initializer_range": 0.2},
    "gated_deltanet": {"hidden_size": 64, "num_heads": 2, "num_v_heads": 4, "head_dim": 16, "expand_v": 1,
                       "use_short_conv": True, "conv_size": 4, "use_gate": True, "allow_neg_eigval": True,
                       "initializer_range": 0.2},
    "delta_net": {"hidden_size": 64, "num_heads": 4, "expand_k": 1, "expand_v": 1, "use_short_conv": True,
                  "conv_size": 4, "use_gate": True, "use_beta": True, "initializer_range": 0.2},
}  # fmt: skip
FLA_COMMON = {"num_hidden_layers": 2, "vocab_size": 96, "tie_word_embeddings": False, "use_cache": False,
              "fuse_norm": True, "fuse_swiglu": True}  # fmt: skip


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def compare(family: str, sequence_parallel: bool, use_loss_parallel: bool, mesh) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    if family in FLA_FAMILIES:
        from flame.models.build import import_family

        import_family(family)  # registers fla's classes and flame's CPU path for their kernels
        config = AutoConfig.for_model(family, **FLA_COMMON, **FLA_FAMILIES[family])
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(config).float()
    else:
        config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    model = copy.deepcopy(reference)
    adapter = adapter_for(family)
    layers = list(adapter.layers(model).children())
    if adapter.prepare_layer is not None:  # as parallelize() does before tensor parallelism
        for layer in layers:
            adapter.prepare_layer(layer)
    apply_tensor_parallel(
        model,
        layers,
        adapter.tp_plan,
        mesh,
        use_loss_parallel,
        sequence_parallel,
        local_kernels=adapter.tp_local_kernels,
    )
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, COMMON["vocab_size"], (2, 16), generator=generator)
    labels = torch.randint(0, COMMON["vocab_size"], (2, 16), generator=generator)

    ref_logits = reference(input_ids=input_ids).logits
    torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
    logits = model(input_ids=input_ids).logits
    if use_loss_parallel:
        with loss_parallel():
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss.backward()
    else:
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    grads = dict(model.named_parameters())
    grad_diff = max(
        float((full(grads[name].grad) - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12))
        for name, p in reference.named_parameters()
    )
    return {
        "family": family,
        "sequence_parallel": sequence_parallel,
        "loss_parallel": use_loss_parallel,
        "logits_diff": float((full(logits) - ref_logits).abs().max() / ref_logits.abs().max()),
        "grad_rel_diff": grad_diff,
    }


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    for family in [*FAMILIES, *FLA_FAMILIES]:
        for sequence_parallel, use_loss_parallel in ((True, True), (False, False)):
            result = compare(family, sequence_parallel, use_loss_parallel, mesh)
            if dist.get_rank() == 0:
                print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
