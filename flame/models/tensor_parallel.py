"""Tensor parallelism (DTensor) for Hugging Face decoders, with loss parallelism.

The family adapter supplies the plan (which projections are split by columns or rows). Norm weights,
which no plan splits, become replicated DTensors whose inputs and outputs are converted at the
module boundary: otherwise foreach AdamW and gradient clipping meet a mix of plain tensors and
DTensors. With loss parallelism the output head keeps the logits sharded over the vocabulary and
the cross entropy runs on the shards (``torch.distributed.tensor.parallel.loss_parallel``), so the
full logits never exist on one rank.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from flame.config.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger("flame.models")

# Llama-style decoder layer: attention q/k/v split by heads (columns), o by rows; the gated MLP the same.
LLAMA_LAYER_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def check_tp_divisibility(model_config: Any, tp: int) -> list[str]:
    """Problems that make ``tp`` impossible for this config (heads, KV heads, MLP width)."""
    problems = []
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(model_config, name, None)
        if value is not None and value % tp:
            problems.append(
                f"--training.tensor_parallel_degree {tp}: the model's {name} ({value}) is not divisible by it"
            )
    return problems


def _replicate_norm(module: nn.Module, mesh: DeviceMesh) -> None:
    def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
        for key, param in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

    def to_dtensor(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(
            DTensor.from_local(x, mesh, [Replicate()], run_check=False) if isinstance(x, torch.Tensor) else x
            for x in inputs
        )

    def to_local(mod: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, mesh, partition, input_fn=to_dtensor, output_fn=to_local)  # type: ignore[arg-type]


def apply_tensor_parallel(
    model: PreTrainedModel, layers: list[nn.Module], layer_plan: dict[str, str], mesh: DeviceMesh, loss_parallel: bool
) -> None:
    """Split every decoder layer by ``layer_plan``, the embedding by vocabulary rows and the output head
    by vocabulary columns; replicate the norms."""
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in layers:
        parallelize_module(layer, mesh, {name: styles[style]() for name, style in layer_plan.items()})
    # A pipeline stage may own neither (middle stages) or only one of them.
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embedding is not None:
        parallelize_module(embedding, mesh, RowwiseParallel(input_layouts=Replicate()))
    if head is not None:
        head_style = (
            ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
            if loss_parallel
            else ColwiseParallel(output_layouts=Replicate())
        )
        parallelize_module(head, mesh, head_style)
    for module in model.modules():
        if "Norm" in type(module).__name__ and any(
            not isinstance(p, DTensor) for p in module.parameters(recurse=False)
        ):
            _replicate_norm(module, mesh)
    leftover = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if leftover:
        raise ConfigError(f"tensor parallelism: no plan covers these parameters: {leftover[:4]}")
    logger.info(
        "tensor parallel: degree %d over mesh axis %s, loss parallel %s",
        mesh.size(),
        mesh.mesh_dim_names,
        loss_parallel,
    )
