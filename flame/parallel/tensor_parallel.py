"""Tensor parallelism (DTensor) for Hugging Face decoders, with sequence and loss parallelism.

The family adapter supplies the plan (which projections are split by columns or rows; the plans live
with their families in ``flame/models/families/``).

Sequence parallelism: between the sublayers the residual stream is sharded over the sequence
(``Shard(1)``): the embedding reduce-scatters into it, the norms on the residual stream
(``SequenceParallel``) work on a sequence shard, each attention/MLP block all-gathers its input
on entry, and its row-wise output projection reduce-scatters back, so activations outside the
blocks take 1/tp of the memory. The final norm runs on the shard and the output head gathers.
The model is given explicit ``position_ids`` (Hugging Face would derive them from the local,
sharded length).

Other norms (per-head q/k norms inside attention) become replicated DTensors whose inputs and
outputs are converted at the module boundary: otherwise foreach AdamW and gradient clipping meet a
mix of plain tensors and DTensors. With loss parallelism the output head keeps the logits sharded
over the vocabulary and the cross entropy runs on the shards
(``torch.distributed.tensor.parallel.loss_parallel``), so the full logits never exist on one rank.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from flame.config.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger("flame.parallel")

# Set on a model under sequence parallelism: the number of sequence shards of its residual stream (pipeline
# stage forwards compute the full length from it).
SEQUENCE_SHARDS_ATTR = "_flame_sequence_shards"

# Config fields whose sizes tensor parallelism splits (heads, KV heads, MLP width), when present.
TP_DIM_FIELDS = (
    "num_attention_heads",
    "num_key_value_heads",
    "num_heads",
    "num_kv_heads",
    "num_v_heads",
    "intermediate_size",
)


def check_tp_divisibility(dims: dict[str, int | None], tp: int) -> list[str]:
    """Problems that make ``tp`` impossible for a model whose split sizes are ``dims`` (config field name ->
    size, None when the config has no such field): heads, KV heads, MLP width."""
    return [
        f"--training.tensor_parallel_degree {tp}: the model's {name} ({value}) is not divisible by it"
        for name, value in dims.items()
        if value is not None and value % tp
    ]


def tp_dims(model_config: Any) -> dict[str, int | None]:
    """The generic split sizes of a config (``TP_DIM_FIELDS``)."""
    return {name: getattr(model_config, name, None) for name in TP_DIM_FIELDS}


def _replicate_norm(module: nn.Module, mesh: DeviceMesh, inside_block: bool) -> None:
    """A norm with replicated weights.

    ``inside_block``: a norm inside a tensor-parallel block (per-head q/k norms), whose input is this
    rank's heads, either ``[..., heads/tp, head_dim]`` (the norm spans one head: the heads dimension is
    sharded) or ``[..., heads/tp * head_dim]`` (the norm spans all heads, as OLMo2's: the normalized
    dimension itself is sharded, and the statistics are reduced over the ranks). Otherwise a norm on the
    full, replicated residual stream (tensor parallelism without sequence parallelism)."""

    def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
        for key, param in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

    features = next(iter(module.parameters(recurse=False))).shape[-1]

    def to_dtensor(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        def convert(x: Any) -> Any:
            if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
                return x
            if not inside_block:
                return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            dim = x.dim() - 1 if x.shape[-1] != features else x.dim() - 2
            return DTensor.from_local(x, mesh, [Shard(dim)], run_check=False)

        return tuple(convert(x) for x in inputs)

    def to_local(mod: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, mesh, partition, input_fn=to_dtensor, output_fn=to_local)  # type: ignore[arg-type]


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and any(True for _ in module.parameters(recurse=False))


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _replicate_module(module: nn.Module, mesh: DeviceMesh) -> None:
    """Replicated parameters, computed on DTensors: a plain input (the full, replicated stream when there
    is no sequence parallelism) becomes a replicated DTensor; the output stays one."""

    def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
        for key, param in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

    def to_dtensor(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(
            DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    distribute_module(module, mesh, partition, input_fn=to_dtensor)  # type: ignore[arg-type]


def _residual_norm(module: nn.Module, mesh: DeviceMesh, sequence_parallel: bool, local_kernels: bool = False) -> None:
    if local_kernels:  # on the sequence shard: the weight's gradient is summed over the ranks
        _run_locally(module, mesh, Replicate(), Partial() if sequence_parallel else Replicate())
    elif sequence_parallel:
        parallelize_module(module, mesh, SequenceParallel(use_local_output=True))
    else:
        _replicate_norm(module, mesh, inside_block=False)


def _gather_sequence_on_entry(module: nn.Module, mesh: DeviceMesh) -> None:
    """Give ``module`` its input (the first positional argument, or ``hidden_states``) gathered over the
    sequence: a local ``Shard(1)`` tensor in, a replicated DTensor to the column-wise projections."""

    def gather(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return x
        return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()])

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (gather(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": gather(kwargs["hidden_states"])}
        return args, kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _pass_position_ids(decoder: nn.Module) -> None:
    """Hand the decoder explicit positions 0..L-1 when the caller gives none: under sequence parallelism
    Hugging Face would count them from the sharded embedding output."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("position_ids") is None and isinstance(input_ids, torch.Tensor):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            kwargs = {**kwargs, "position_ids": positions.expand(input_ids.shape[0], -1)}
        return args, kwargs

    decoder.register_forward_pre_hook(hook, with_kwargs=True)


class _SwapParameters:
    """Within the block, ``module``'s parameters read as the given tensors (e.g. their local shards)."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.module, self.tensors = module, tensors
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        for name, tensor in self.tensors.items():
            self.saved[name] = self.module._parameters[name]
            self.module._parameters[name] = tensor  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        self.module._parameters.update(self.saved)


def _run_locally(module: nn.Module, mesh: DeviceMesh, placement: Any, grad_placement: Any) -> None:
    """Make ``module``'s parameters DTensors (``placement``) but run its forward on plain local tensors.

    For modules whose forward calls kernels that take no DTensor (fla's Triton norms and convolutions):
    the inputs are already this rank's part (a sequence shard, this rank's heads or channels), and each
    parameter enters the forward as its local tensor, whose gradient is declared ``grad_placement``:
    ``Partial()`` for a replicated weight applied to different data on every rank (the gradients are
    summed over the ranks), the parameter's own placement otherwise."""

    # The module's own parameters only: its submodules have their own plan (distribute_module would
    # replicate every parameter it does not partition, submodules' too).
    for key, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [placement])))
    forward = module.forward

    def local_forward(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.to_local() if isinstance(a, DTensor) else a for a in args)
        kwargs = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in kwargs.items()}
        params = {
            name: p.to_local(grad_placements=[grad_placement]) if isinstance(p, DTensor) else p
            for name, p in module._parameters.items()
            if p is not None
        }
        with _SwapParameters(module, params):
            return forward(*args, **kwargs)

    module.forward = local_forward  # type: ignore[method-assign]


def _swiglu_linear_on_shards(module: nn.Module, mesh: DeviceMesh, output: Any) -> None:
    """fla's fused ``swiglu_linear(gate, up, down_weight, bias)`` on this rank's columns: the partial sums
    of the down projection are reduced (to ``output``: the sequence shard or the replicated stream)."""
    forward = module.forward

    def sharded_forward(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        if bias is not None:
            raise ConfigError("tensor parallelism: fla's fused SwiGLU with a down-projection bias has no plan")
        local_weight = weight.to_local() if isinstance(weight, DTensor) else weight
        partial = forward(x, y, local_weight, None)
        return DTensor.from_local(partial, mesh, [Partial()], run_check=False).redistribute(mesh, [output]).to_local()

    module.forward = sharded_forward  # type: ignore[method-assign]


def apply_tensor_parallel(
    model: PreTrainedModel,
    layers: list[nn.Module],
    layer_plan: dict[str, str],
    mesh: DeviceMesh,
    loss_parallel: bool,
    sequence_parallel: bool = True,
    local_kernels: bool = False,
) -> None:
    """Split every decoder layer by ``layer_plan``, the embedding by vocabulary rows and the output head
    by vocabulary columns; with ``sequence_parallel`` shard the residual stream over the sequence between
    the blocks (see the module docstring); replicate the other norms.

    Plan styles: "colwise", "rowwise", "replicate" (a small projection every rank computes whole),
    "channels" (a depthwise convolution split by channels, run on the local channels), "heads" (a block's
    own per-head parameters, split by heads and passed to its kernels as local tensors) and
    "swiglu_linear" (fla's fused SwiGLU + down projection). Entries naming no submodule of a layer are
    skipped (optional parts such as short convolutions); every parameter must end up covered.
    ``local_kernels``: the family's norms call kernels that take plain tensors (fla), so they run on
    local tensors (``_run_locally``) instead of DTensors."""
    seq = Shard(1) if sequence_parallel else Replicate()
    for layer in layers:
        present = {name: style for name, style in layer_plan.items() if _has_submodule(layer, name)}
        plan: dict[str, Any] = {}
        for name, style in present.items():
            if style == "colwise":
                plan[name] = ColwiseParallel()
            elif style == "rowwise":
                plan[name] = RowwiseParallel(output_layouts=seq)
            elif style == "replicate":
                _replicate_module(layer.get_submodule(name), mesh)
            elif style in ("channels", "heads"):  # depthwise convolutions; per-head parameters of a block
                _run_locally(layer.get_submodule(name), mesh, Shard(0), Shard(0))
            elif style == "swiglu_linear":
                _swiglu_linear_on_shards(layer.get_submodule(name), mesh, seq)
            else:
                raise ValueError(f"unknown tensor-parallel style {style!r} for {name}")
        parallelize_module(layer, mesh, plan)
        # Norms directly on the residual stream (pre- and post-norms) work on the sequence shard.
        for child in layer.children():
            if _is_norm(child):
                _residual_norm(child, mesh, sequence_parallel, local_kernels)
        if sequence_parallel:
            # Blocks holding column-wise projections all-gather their input on entry.
            for block in {name.rsplit(".", 1)[0] for name, style in present.items() if style == "colwise"}:
                _gather_sequence_on_entry(layer.get_submodule(block), mesh)
    # A pipeline stage may own neither (middle stages) or only one of them.
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embedding is not None:
        parallelize_module(embedding, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=seq))
    if sequence_parallel:
        setattr(model, SEQUENCE_SHARDS_ATTR, mesh.size())
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        if decoder is not None and embedding is not None:
            _pass_position_ids(decoder)
    final_norm = getattr(getattr(model, getattr(model, "base_model_prefix", "model"), None), "norm", None)
    if isinstance(final_norm, nn.Module):
        _residual_norm(final_norm, mesh, sequence_parallel, local_kernels)
    if head is not None:
        head_style = (
            ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
            if loss_parallel
            else ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
        )
        parallelize_module(head, mesh, head_style)
    for module in model.modules():  # the norms inside the blocks
        if _is_norm(module) and any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            if local_kernels:  # on this rank's heads: the weight's gradient is summed over the ranks
                _run_locally(module, mesh, Replicate(), Partial())
            else:
                _replicate_norm(module, mesh, inside_block=True)
    leftover = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if leftover:
        raise ConfigError(f"tensor parallelism: no plan covers these parameters: {leftover[:4]}")
    logger.info(
        "tensor parallel: degree %d over mesh axis %s, sequence parallel %s, loss parallel %s",
        mesh.size(),
        mesh.mesh_dim_names,
        sequence_parallel,
        loss_parallel,
    )
