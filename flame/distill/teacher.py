"""The teacher model: built like the student, sharded over the student's mesh, frozen.

The teacher is built on the meta device from its own model config (with the student's tokenizer), cast to
``--distill.teacher_dtype``, and parallelised by the same code as the student (``parallelize``): FSDP2 /
HSDP shard it over the same data-parallel axes (no rank holds the whole teacher), tensor parallelism applies
its family's plan (so its logits are vocabulary-sharded like the student's under loss parallelism), context
parallelism swaps its attention the same way. Activation checkpointing and float8 are training features and
stay off. Its weights are then read straight into the shards (DCP for a flame run, DCP's Hugging Face reader
for safetensors). It runs in ``eval()`` mode with ``requires_grad=False``; it is never given to the optimizer
or the checkpointer.

**Padded vocabulary**: a teacher whose embedding and output layer have more rows than the tokenizer
(152,064 vs 151,936) is built with the tokenizer's size and only the first rows are read. The extra rows
belong to ids no tokenizer produces and whose logits would be masked out of the softmax anyway, so this is
the same as masking them, and under tensor parallelism the teacher's logits are sharded exactly like the
student's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch import nn

import flame.models.families  # noqa: F401  (registers the model families: the teacher's is looked up)
from flame.config.errors import ConfigError
from flame.distill.source import TeacherSource, config_vocab_size, identity
from flame.utils._checkpoint_io import match_keys, single_process_dcp, tensor_metadata

logger = logging.getLogger("flame.distill")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_dtype(name: str, device_type: str) -> torch.dtype:
    """``--distill.teacher_dtype``: ``auto`` is bfloat16 on GPU and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return DTYPES[name]


def _vocab_keys(model: Any) -> list[str]:
    """State-dict keys of the embedding and output layer (the tensors with one row per token)."""
    from flame.models.build import canonical_name

    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    keys = []
    for name, module in model.named_modules():
        if id(module) in wanted:
            keys += [canonical_name(f"{name}.{p}" if name else p) for p, _ in module.named_parameters(recurse=False)]
    return keys


def _prefix_planner(prefix_sizes: dict[str, torch.Size]):
    """A DCP load planner that reads the first rows of stored tensors with more rows than the model's."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class PrefixPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):  # type: ignore[override]
            if metadata is not None and prefix_sizes:
                stored = dict(metadata.state_dict_metadata)
                for key, size in prefix_sizes.items():
                    # the stored chunks stay: DCP reads where they overlap the model's (smaller) tensor
                    stored[key] = dataclasses.replace(stored[key], size=size)
                metadata = dataclasses.replace(metadata, state_dict_metadata=stored)
            super().set_up_planner(state_dict, metadata, is_coordinator)

    return PrefixPlanner()


@torch.no_grad()
def load_teacher_weights(model: nn.Module, source: TeacherSource) -> int:
    """Read the teacher's weights into the (materialised, possibly sharded) ``model``; returns the tensor count.

    Collective when a process group exists (every rank calls it). Keys and shapes are checked first; the
    vocabulary rows past the model's are skipped (see the module docstring)."""
    import torch.distributed.checkpoint as dcp

    from flame.models.build import canonical_name

    if source.kind == "hf":
        from flame.components.hf_init import hf_tensor_metadata

        stored = hf_tensor_metadata(source.weights)
    else:
        stored = tensor_metadata(source.weights)
    state = {canonical_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    by_name = {canonical_name(k): k for k in stored}
    prefix: dict[str, torch.Size] = {}
    for key in _vocab_keys(model):
        stored_key = by_name.get(key)
        if stored_key is None:
            continue
        shape, dtype = stored[stored_key]
        want = state[key].shape
        if len(shape) == len(want) and shape[0] > want[0] and tuple(shape[1:]) == tuple(want[1:]):
            prefix[stored_key] = torch.Size(want)
            stored[stored_key] = (torch.Size(want), dtype)
    fix = "the teacher's config.json / config.toml must describe the weights beside it"
    keys = match_keys(model, stored, f"--distill.teacher {source.describe()}", fix)
    request: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, stored_key in keys.items():
        if id(state[key]) in seen:  # the other key of a tied pair
            continue
        seen.add(id(state[key]))
        request[stored_key] = state[key].detach()
    kwargs: dict[str, Any] = {"planner": _prefix_planner(prefix)}
    if source.kind == "hf":
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        kwargs["storage_reader"] = HuggingFaceStorageReader(source.weights)
    else:
        kwargs["checkpoint_id"] = source.weights
    with single_process_dcp():
        dcp.load(request, **kwargs)
    if prefix:
        logger.info("teacher: read the first %s rows of %s (vocabulary padding skipped)", _first(prefix), list(prefix))
    return len(request)


def _first(prefix: dict[str, torch.Size]) -> int:
    return next(iter(prefix.values()))[0]


def teacher_model_config(source: TeacherSource, tokenizer: Any):
    """The teacher's model config with the student's tokenizer: vocabulary resized to it (see module doc)."""
    from flame.models.build import import_custom_models, load_model_config

    import_custom_models(source.custom_model_path)
    try:
        return load_model_config(source.model_config, tokenizer, source.norm_type)
    except ConfigError as e:
        raise ConfigError([f"--distill.teacher {source.describe()}: {p}" for p in e.problems]) from e


class Teacher:
    """The frozen teacher on this rank: ``logits(batch)`` for a (context-parallel sharded) loader batch."""

    def __init__(self, source: TeacherSource, tokenizer: Any, config: Any, parallel_dims: Any, device: torch.device):
        from flame.models.adapters import adapter_for
        from flame.models.build import build_meta_model, init_weights
        from flame.parallel.parallelize import parallelize

        self.source = source
        self.identity = identity(source)
        self.device = device
        self.dtype = teacher_dtype(config.distill.teacher_dtype, device.type)
        model_config = teacher_model_config(source, tokenizer)
        self.padded_vocab = config_vocab_size(source)
        model = build_meta_model(model_config, for_device=device.type).to(self.dtype)
        self.adapter = adapter_for(model_config.model_type).with_model(model)
        if parallel_dims.pp_enabled:
            raise ConfigError("--distill.teacher with --experimental.pipeline_parallel_degree > 1 is not supported")
        # buffers that no checkpoint holds (rotary inv_freq) come from the model's own init, as for the student
        reference = copy.deepcopy(model)
        layer_names = set(self.adapter.layer_names(model))
        run_config = _teacher_run_config(config, self.dtype)
        # TP and CP exactly as the student's; data-parallel sharding below, on the teacher's own terms
        parallelize(model, self.adapter, _WithoutDataParallel(parallel_dims), run_config, device.type)
        self.shard_axes = _shard_teacher(model, self.adapter, parallel_dims, run_config)
        model.to_empty(device=device)
        init_weights(model, reference, layer_names, 0, device)  # (re-ties tied embeddings too)
        del reference
        self.num_tensors = load_teacher_weights(model, source)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.num_params = sum(p.numel() for p in model.parameters())
        self.context_parallel = None
        if parallel_dims.cp_enabled:
            from flame.parallel.context_parallel import ContextParallel
            from flame.parallel.parallelize import context_parallel_path

            path, _ = context_parallel_path(model, self.adapter, config, device.type)
            self.context_parallel = ContextParallel(parallel_dims.get_mesh("cp"), path, device)
        logger.info(
            "teacher %s: %s, %.2fM parameters, %s, fingerprint %s",
            source.describe(),
            type(model).__name__,
            self.num_params / 1e6,
            str(self.dtype).removeprefix("torch."),
            self.identity["fingerprint"],
        )

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The teacher's forward arguments for a batch: the student's tokens, positions and document
        boundaries (this rank's sequence shard under CP), in the form the teacher's family takes them."""
        if self.context_parallel is not None:
            return self.context_parallel.model_inputs(batch, self.device)
        return self.adapter.model_inputs(batch, self.device)

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**self.inputs(batch)).logits


def _teacher_run_config(config: Any, dtype: torch.dtype) -> Any:
    """The config ``parallelize`` applies to the teacher: the student's layout without training features."""
    c = copy.deepcopy(config)
    c.activation_checkpoint.mode = "none"
    c.float8.enable_float8_linear = False
    c.training.enable_cpu_offload = False
    c.training.mixed_precision_param = str(dtype).removeprefix("torch.")  # FSDP computes in the stored dtype
    return c


class _WithoutDataParallel:
    """``parallel_dims`` with data parallelism off, so that ``parallelize`` applies TP and CP only."""

    def __init__(self, parallel_dims: Any) -> None:
        self._dims = parallel_dims

    fsdp_enabled = False
    dp_replicate_enabled = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dims, name)


def _shard_teacher(model: nn.Module, adapter: Any, parallel_dims: Any, run_config: Any) -> tuple[str, ...]:
    """FSDP2 over the axes the student shards over ("fsdp" = dp_shard x cp); under pure DDP (the student
    replicated) over "dp_replicate": the teacher has no gradients to reduce, so nothing forces a copy per
    rank. Every module reshards after its forward (the student's last layer keeps its gathered weights for
    the backward; the teacher has none). Returns the mesh axes (empty: one rank holds it all)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if parallel_dims.fsdp_enabled:
        axes: tuple[str, ...] = ("fsdp",)
    elif parallel_dims.dp_replicate_enabled:
        axes = ("dp_replicate",)
    else:
        return ()
    mesh = parallel_dims.get_mesh(list(axes))
    dtype = DTYPES[run_config.training.mixed_precision_param]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in adapter.layers(model).children():
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    logger.info("teacher: FSDP2 over mesh axes %s (shape %s)", axes, tuple(mesh.shape))
    return axes
