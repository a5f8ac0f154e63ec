"""Convert a Hugging Face model into a DCP checkpoint that training starts from.

    python -m flame.utils.convert_hf_to_dcp --model <hf folder> --checkpoint <dump_folder>/checkpoint/step-0

The checkpoint holds the model's tensors only, under the model's own state-dict keys
(``model.embed_tokens.weight``, ``lm_head.weight``, ...), which is what the trainer loads at step 0.
"""

from __future__ import annotations

import argparse
import os

from flame.config.errors import ConfigError
from flame.models.build import import_custom_models
from flame.utils._checkpoint_io import DTYPES, flag_names, is_nonempty_dir, loading_error, run_cli, single_process_dcp


def convert_hf_to_dcp(model: str, checkpoint: str, dtype: str | None = None) -> str:
    """Save the weights of the Hugging Face model ``model`` as a DCP checkpoint at ``checkpoint``; returns it.

    ``dtype`` (float32, bfloat16, float16) defaults to the dtype the model is stored in. An existing non-empty
    ``checkpoint`` folder is never overwritten (``ConfigError``).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    checkpoint = os.path.abspath(checkpoint)
    if is_nonempty_dir(checkpoint) or (os.path.exists(checkpoint) and not os.path.isdir(checkpoint)):
        raise ConfigError(f"--checkpoint {checkpoint!r} already exists and is not empty; refusing to overwrite it.")
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype] if dtype else "auto")
    except (OSError, ValueError) as e:
        raise loading_error("--model", model, "AutoModelForCausalLM", e) from e
    state = hf_model.state_dict()  # top-level HF keys, never wrapped as {"model": ...}
    os.makedirs(checkpoint, exist_ok=True)
    with single_process_dcp():
        dcp.save(state, checkpoint_id=checkpoint)
    params = sum(p.numel() for p in hf_model.parameters())
    print(
        f"Wrote {checkpoint} from {model}: {len(state)} tensors, {params:,} parameters, "
        f"{str(hf_model.dtype).removeprefix('torch.')}"
    )
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flame.utils.convert_hf_to_dcp",
        description="Convert a Hugging Face model into a DCP checkpoint (model weights only) to start training from.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder (or name) to convert")
    parser.add_argument("--checkpoint", required=True, help="DCP folder to write, e.g. <dump_folder>/checkpoint/step-0")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="weight dtype (default: as stored)")
    parser.add_argument("--custom_model_path", default=None, help="module/folder that registers custom models")
    args = parser.parse_args(argv)
    if args.custom_model_path:
        with flag_names({"--experimental.custom_model_path": "--custom_model_path"}):
            import_custom_models(args.custom_model_path)
    convert_hf_to_dcp(args.model, args.checkpoint, args.dtype)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
