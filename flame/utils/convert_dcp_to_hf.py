"""Convert a training checkpoint (DCP, any sharding) into a Hugging Face model folder.

    python -m flame.utils.convert_dcp_to_hf --path <dump_folder> --step <step> \\
        --config <model config> --tokenizer <tokenizer> [--output <folder>] [--dtype bfloat16] \\
        [--norm_type <as in training; default: from <path>/config.toml>] [--custom_model_path <module>]

The model is rebuilt from ``--config`` exactly as training built it (vocabulary matched to the tokenizer),
its weights are read from ``<dump_folder>/checkpoint/step-<step>`` (optimizer and other training state are
ignored), and ``save_pretrained`` writes safetensors, config.json, generation_config.json and the tokenizer.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

import flame.models.families  # noqa: F401  (registers the model families)
from flame.config.errors import ConfigError
from flame.models.build import build_meta_model, import_custom_models, load_model_config
from flame.utils._checkpoint_io import (
    DTYPES,
    flag_names,
    loading_error,
    match_keys,
    run_cli,
    single_process_dcp,
    step_folder,
    tensor_metadata,
)


def _load_tokenizer(tokenizer: str):
    from transformers import AutoTokenizer

    if not tokenizer:
        raise ConfigError("--tokenizer is required: a folder or name that AutoTokenizer loads.")
    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise loading_error("--tokenizer", tokenizer, "AutoTokenizer", e) from e


def _run_norm_type(dump_folder: str) -> str:
    """The ``--model.norm_type`` recorded in a run's ``config.toml`` ("" if none, or no readable file)."""
    import tomllib

    try:
        with open(os.path.join(dump_folder, "config.toml"), "rb") as f:
            value = tomllib.load(f).get("model", {}).get("norm_type", "")
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    return value if isinstance(value, str) else ""


def _load_weights(model: nn.Module, keys: dict[str, str], checkpoint: str) -> None:
    """Read the matched keys from the DCP folder straight into the (materialised) model's tensors."""
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    request: dict[str, torch.Tensor] = {}
    owner: dict[int, str] = {}
    aliases: list[tuple[str, str]] = []
    for key, stored_key in keys.items():
        target = state[key]
        ptr = target.untyped_storage().data_ptr()
        if ptr in owner:  # a tied tensor stored under both names: load a copy and check that it agrees
            aliases.append((key, owner[ptr]))
            target = torch.empty_like(target)
        else:
            owner[ptr] = key
        request[stored_key] = target
    with single_process_dcp():
        dcp.load(request, checkpoint_id=checkpoint)
    for key, tied_to in aliases:
        if not torch.equal(request[keys[key]], state[tied_to]):
            raise ConfigError(
                f"{checkpoint}: {key} and {tied_to} differ, but the config ties them; "
                "set tie_word_embeddings to the value used in training."
            )


def convert_dcp_to_hf(
    path: str,
    step: int,
    config: str,
    tokenizer: str,
    output: str | None = None,
    dtype: str | None = None,
    custom_model_path: str | None = None,
    norm_type: str | None = None,
) -> str:
    """Write the model weights of ``<path>/checkpoint/step-<step>`` as a Hugging Face folder; returns the folder.

    ``step=-1`` takes the latest complete step. ``norm_type`` is the ``--model.norm_type`` the run was
    trained with (it changes the model's modules, so the config alone does not rebuild it); ``None``
    reads it from the run's ``<path>/config.toml``, where the trainer records it. ``output`` defaults to ``path`` (the dump folder; other files
    there are kept). ``dtype`` (float32, bfloat16, float16) defaults to the dtype stored in the checkpoint.
    Raises ``ConfigError`` on bad input (missing folders, a config that does not match the checkpoint).
    """
    from transformers import GenerationConfig

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    checkpoint, step = step_folder(path, step)
    output = os.path.abspath(output or path)
    checkpoint_root = os.path.abspath(os.path.join(path, "checkpoint"))
    if os.path.commonpath([output, checkpoint_root]) == checkpoint_root or os.path.exists(
        os.path.join(output, ".metadata")
    ):
        raise ConfigError(f"--output {output!r} is (inside) a checkpoint folder; choose another folder.")
    tok = _load_tokenizer(tokenizer)
    if norm_type is None:
        norm_type = _run_norm_type(path)
        if norm_type:
            print(f"norm_type {norm_type!r}, as in {os.path.join(path, 'config.toml')}")
    renames = {
        "--model.config": "--config",
        "--experimental.custom_model_path": "--custom_model_path",
        "--model.norm_type": "--norm_type",
    }
    with flag_names(renames):
        if custom_model_path:
            import_custom_models(custom_model_path)
        # for_device=None: converting needs no kernels, so families that train on GPUs only convert anywhere.
        model: Any = build_meta_model(load_model_config(config, tok, norm_type), for_device=None)
    stored = tensor_metadata(checkpoint)
    fix = f"convert with the model config the run was trained with (--config {config}"
    fix += f", --norm_type {norm_type})." if norm_type else ", and --norm_type if training set --model.norm_type)."
    keys = match_keys(model, stored, checkpoint, fix)
    weights = [stored[k] for k in keys.values() if stored[k][1].is_floating_point]
    stored_dtype = max((d for _, d in weights), key=lambda d: sum(s.numel() for s, t in weights if t == d))
    model.to(dtype=stored_dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty unties shared parameters
    _load_weights(model, keys, checkpoint)
    out_dtype = DTYPES[dtype] if dtype else stored_dtype
    model.to(dtype=out_dtype).eval()

    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    generation = GenerationConfig.from_model_config(model.config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(generation, name, getattr(tok, name, None))
    model.generation_config = generation
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    tok.save_pretrained(output)
    params = sum(p.numel() for p in model.parameters())
    print(f"Wrote {output} from {checkpoint}: {params:,} parameters, {str(out_dtype).removeprefix('torch.')}")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flame.utils.convert_dcp_to_hf",
        description="Convert a DCP training checkpoint into a Hugging Face model folder (safetensors).",
    )
    parser.add_argument("--path", required=True, help="dump folder of the run (holds checkpoint/step-<N>)")
    parser.add_argument("--step", type=int, required=True, help="step to convert; -1 = the latest complete step")
    parser.add_argument("--config", required=True, help="model config used for training (JSON file or folder)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer used for training (folder or name)")
    parser.add_argument("--output", default=None, help="output folder (default: the dump folder, --path)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="weight dtype (default: as stored)")
    parser.add_argument("--custom_model_path", default=None, help="module/folder that registers custom models")
    parser.add_argument(
        "--norm_type",
        default=None,
        help="the --model.norm_type used in training (default: as recorded in <path>/config.toml; '' for none)",
    )
    args = parser.parse_args(argv)
    convert_dcp_to_hf(
        args.path,
        args.step,
        args.config,
        args.tokenizer,
        args.output,
        args.dtype,
        args.custom_model_path,
        args.norm_type,
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
