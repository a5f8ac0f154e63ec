"""Build any Hugging Face causal LM from its config, on the meta device, and initialise it.

Weights are created after the model has been parallelised (sharded), so no rank ever holds the
full model. Initialisation is nevertheless *layout independent*: every "init unit" (a decoder
layer, or a module outside the layers) is initialised in full from a seed derived from the run
seed and the unit's name, and each rank keeps only its slice. One seed gives bit-identical
initial weights on 1 process, FSDP on 8 ranks, or any other layout on the same device type.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import sys
import zlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from flame.config.errors import ConfigError

logger = logging.getLogger("flame.models")

# Wrappers that torch/torchtitan insert into parameter names (activation checkpointing, compile).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def import_custom_models(path: str) -> None:
    """Import a module or folder whose import registers custom models with the Auto classes.

    ``path`` is a dotted module name (``custom_models``) or a folder/file path; a folder is put on
    ``sys.path`` and imported as a package.
    """
    if not path:
        return
    if os.path.exists(path):
        path = os.path.abspath(path.rstrip("/"))
        parent, name = os.path.split(path)
        name = name.removesuffix(".py")
        if parent not in sys.path:
            sys.path.insert(0, parent)
        path = name
    try:
        importlib.import_module(path)
    except ImportError as e:
        raise ConfigError(
            f"--experimental.custom_model_path: cannot import {path!r} ({e}); give a module "
            "name on the Python path or a folder/file that registers the model."
        ) from e


def load_model_config(path: str, tokenizer=None, norm_type: str = ""):
    """Read a model config with ``AutoConfig`` and reconcile it with the tokenizer.

    ``path`` is a JSON file or a folder with ``config.json``. ``norm_type`` overrides the config's
    ``norm_type`` for families that have one (an error for the others). The vocabulary is set to the
    tokenizer's size (so the embedding covers every token id), special token ids are copied from
    the tokenizer, and the KV cache is turned off (training never uses it, and it breaks
    activation checkpointing's recomputation).
    """
    from transformers import AutoConfig

    if not path:
        raise ConfigError("--model.config is required: a JSON config file or a folder with config.json.")
    if not os.path.exists(path):
        raise ConfigError(f"--model.config: {path!r} does not exist (a JSON file or a folder with config.json).")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model.config {path!r} cannot be read by AutoConfig: {first}") from e
    config.use_cache = False
    if norm_type:
        if not hasattr(config, "norm_type"):
            raise ConfigError(
                f"--model.norm_type: model family {config.model_type!r} has no norm_type setting in its "
                "config; leave the flag unset for it"
            )
        config.norm_type = norm_type
    if tokenizer is not None:
        vocab = len(tokenizer)
        if getattr(config, "vocab_size", vocab) != vocab:
            logger.info("vocab_size %s -> %s to match the tokenizer", config.vocab_size, vocab)
            config.vocab_size = vocab
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, name, None)
            if token_id is not None:
                setattr(config, name, token_id)
    return config


def build_meta_model(config) -> nn.Module:
    """The model class ``AutoModelForCausalLM`` maps the config to, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except ValueError as e:
            raise ConfigError(f"--model.config: no causal-LM class for model_type {config.model_type!r}: {e}") from e
    return model


def canonical_name(name: str) -> str:
    """A parameter name without activation-checkpoint/compile wrapper prefixes."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _unit_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _init_units(reference: nn.Module, layer_names: set[str]) -> Iterator[tuple[str, nn.Module]]:
    """Decoder layers as whole units (their init may rescale children), other tensors per module."""
    for name, module in reference.named_modules():
        if name in layer_names:
            yield name, module
            continue
        if any(name.startswith(layer + ".") for layer in layer_names):
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            unit = copy.copy(module)  # shallow: the same direct tensors, none of the children
            unit._modules = {}
            yield name, unit


@torch.no_grad()
def init_weights(
    model: nn.Module, reference: nn.Module, layer_names: set[str], seed: int, device: torch.device
) -> None:
    """Initialise the (possibly sharded, already materialised) ``model`` from ``reference``.

    ``reference`` is an untouched meta copy of the model taken before parallelisation. Each unit is
    materialised in full on ``device``, initialised with the model's own ``_init_weights`` from a
    seed that depends only on ``seed`` and the unit's name, and copied into ``model``: plain
    tensors wholesale, DTensors as this rank's slice (``distribute_tensor`` with
    ``src_data_rank=None`` slices locally, without communication).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets: dict[str, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        targets[canonical_name(name)] = tensor
    init_fn: Callable[[nn.Module], None] | None = getattr(model, "_init_weights", None)
    seen: set[str] = set()
    for unit_name, unit in _init_units(reference, layer_names):
        full = copy.deepcopy(unit).to_empty(device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_unit_seed(seed, unit_name))
            if init_fn is not None:
                full.apply(init_fn)
            else:
                for m in full.modules():
                    reset = getattr(m, "reset_parameters", None)
                    if callable(reset):
                        reset()
        prefix = f"{unit_name}." if unit_name else ""
        for tname, value in list(full.named_parameters()) + list(full.named_buffers()):
            key = prefix + tname
            target = targets.get(key)
            if target is None:  # e.g. a buffer the parallelised model dropped
                continue
            seen.add(key)
            if isinstance(target, DTensor):
                local = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(local.to_local())
            else:
                target.copy_(value)
    missing = sorted(set(targets) - seen)
    if missing:
        raise RuntimeError(f"weights left uninitialised: {missing[:5]}")
