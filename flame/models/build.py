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
import warnings
import zlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from flame.config.errors import ConfigError
from flame.models.adapters import adapter_for

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


def declared_model_type(path: str) -> str:
    """The ``model_type`` a config file declares ("" if it cannot be read; AutoConfig then says why)."""
    import json

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            value = json.load(f).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def import_family(model_type: str) -> None:
    """Import the module that registers ``model_type``'s classes (e.g. ``fla``), if its adapter names one,
    then run the adapter's ``on_import`` (fla: the CPU paths and context-parallel wrappers)."""
    adapter = adapter_for(model_type)
    module = adapter.registered_by
    if not module:
        return
    try:
        with warnings.catch_warnings():  # fla on a CPU-only machine: "Triton is not supported ..., roll back to CPU"
            warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
            importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"--model.config: model type {model_type!r} is provided by the {module!r} package, which cannot be "
            f"imported here ({e}); install it (flash-linear-attention for fla) or choose another model type"
        ) from e
    if adapter.on_import is not None:
        adapter.on_import()


def load_tokenizer(path: str):
    """The tokenizer at ``--model.tokenizer_path``, or a ConfigError saying why it cannot load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model.tokenizer_path {path!r} cannot be loaded by AutoTokenizer: {first}") from e


def load_model_config(path: str, tokenizer=None, norm_type: str = ""):
    """Read a model config with ``AutoConfig`` and reconcile it with the tokenizer.

    ``path`` is a JSON file or a folder with ``config.json``. Families registered by another package
    (fla's GLA, Mamba, ...) have that package imported first, as their adapter says. ``norm_type`` overrides the config's
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
    import_family(declared_model_type(path))
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


def build_meta_model(config, for_device: str | None = "auto") -> nn.Module:
    """The model class ``AutoModelForCausalLM`` maps the config to, built on the meta device (no memory).

    ``for_device`` is the device type the model will run on ("auto": CUDA if visible, else CPU); a family
    whose kernels do not run there (fla's Triton kernels on a CPU-only machine) is a ``ConfigError`` now
    rather than a kernel crash at the first step. ``None`` skips the check (conversion runs no kernels).
    """
    from transformers import AutoModelForCausalLM

    if for_device == "auto":
        for_device = "cuda" if torch.cuda.is_available() else "cpu"
    supported = adapter_for(config.model_type).device_types
    if for_device is not None and for_device not in supported:
        raise ConfigError(
            f"--model.config: model family {config.model_type!r} trains on {'/'.join(supported)} only (its "
            f"kernels), not on {for_device}; train it on a machine with a GPU (converting its checkpoints works "
            "anywhere)"
        )
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except ValueError as e:
            raise ConfigError(f"--model.config: no causal-LM class for model_type {config.model_type!r}: {e}") from e
        except ImportError as e:  # e.g. fla's attention layers need the flash-attn package
            first = str(e).strip().splitlines()[0]
            raise ConfigError(
                f"--model.config: model family {config.model_type!r} needs a missing package: {first}"
            ) from e
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


def retie_embeddings(model: nn.Module) -> None:
    """Tie the output head to the input embedding again where the config ties them.

    ``to_empty`` gives each name of a plain module's shared Parameter its own tensor, so a tied model
    materialised in one process would silently train two matrices (under FSDP2 the tie survives,
    and the two layouts would differ). Pipeline stages hold at most one of the two and are skipped.
    """
    config = getattr(model, "config", None)
    tie = getattr(model, "tie_weights", None)
    if not (callable(tie) and getattr(config, "tie_word_embeddings", False)):
        return
    head = getattr(model, "get_output_embeddings", lambda: None)()
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    if head is not None and embed is not None and head.weight is not embed.weight:
        tie()


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

    retie_embeddings(model)
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
