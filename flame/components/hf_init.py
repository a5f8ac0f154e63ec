"""Initial weights from a Hugging Face model folder (``--checkpoint.initial_load_hf``).

Continue pretraining a published model without a conversion step: the folder's safetensors are read
straight into the freshly built (and possibly sharded) model with DCP's Hugging Face storage reader,
so each rank reads only its own slices, and stored dtypes (bf16, fp16) are cast to the model's.
Keys and shapes are checked against the model first, so a folder that does not fit ``--model.config``
is a ``ConfigError`` naming the first mismatch rather than a failure deep inside DCP.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from flame.config.errors import ConfigError
from flame.models.build import canonical_name
from flame.utils._checkpoint_io import match_keys, single_process_dcp

logger = logging.getLogger("flame")


def hf_tensor_metadata(folder: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every tensor in a Hugging Face folder's safetensors files (headers only)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = HuggingFaceStorageReader(folder).read_metadata()
    except Exception as e:  # a truncated or foreign file: say which folder, not a DCP traceback
        raise ConfigError(f"--checkpoint.initial_load_hf {folder!r}: its safetensors cannot be read ({e})") from e
    return {
        key: (item.size, item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


@torch.no_grad()
def load_hf_weights(model: nn.Module, folder: str, stage_only: bool = False) -> int:
    """Copy the weights of the Hugging Face folder ``folder`` into ``model``; returns the tensor count.

    Every rank calls this (DCP's load is collective when a process group exists). Tied tensors are
    read once and stay tied; a folder whose keys or shapes differ from the model raises ``ConfigError``.
    ``stage_only``: ``model`` is one pipeline stage and reads only its own weights.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    stored = hf_tensor_metadata(folder)
    fix = f"use the folder's own config (--model.config {folder}) and a tokenizer of the same vocabulary size"
    keys = match_keys(model, stored, f"--checkpoint.initial_load_hf {folder}", fix, allow_extra=stage_only)
    # keep_vars: a tied weight is one Parameter under two keys.
    state = {canonical_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    request: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, stored_key in keys.items():
        if id(state[key]) in seen:  # the other key of a tied pair: loaded once, stays tied
            continue
        seen.add(id(state[key]))
        request[stored_key] = state[key].detach()  # shares storage: DCP reads in place, local shards only
    with single_process_dcp():
        dcp.load(request, storage_reader=HuggingFaceStorageReader(folder))
    logger.info("initial weights: %d tensors from Hugging Face folder %s", len(request), folder)
    return len(request)
