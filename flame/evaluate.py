"""``python -m flame.evaluate``: validation loss, perplexity and bits per byte of a model; lm-eval tasks.

    python -m flame.evaluate --model_path outputs/demo/checkpoint/step-450 --job.config_file outputs/demo/config.toml --job.dump_folder outputs/demo_eval
    torchrun --nproc_per_node 2 -m flame.evaluate --model_path outputs/demo --job.config_file configs/demo.toml --job.dump_folder outputs/demo_eval

``--model_path`` is a DCP step folder (``<run>/checkpoint/step-N``), a run folder (its newest complete
checkpoint) or a Hugging Face folder (config.json + safetensors). The numbers come from the trainer's own
validation code (``flame/components/validation.py``) on the datasets of the config's ``[validation]``
section, under any layout the config describes, so they equal what training logged on the same
checkpoint. Bits per byte = summed loss in bits / UTF-8 bytes of the decoded target tokens (special
tokens have no bytes): comparable across tokenizers. ``--lm_eval.tasks a,b`` (with ``--lm_eval.include_path``
for your own task files, ``--lm_eval.limit``, ``--lm_eval.num_fewshot``, ``--lm_eval.batch_size``) runs
lm-evaluation-harness tasks through its Python API on the same model (one process; ``pip install
flame[eval]``). Results go to ``<dump_folder>/summary.json`` (and the console). Exit codes as training:
0 done, 2 bad input (nothing written), 1 a runtime failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from flame.config.errors import ConfigError
from flame.config.loader import apply_overrides, parse_args
from flame.config.schema import JobConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flame.evaluate", add_help=False)
    p.add_argument("--model_path", required=True)
    p.add_argument("--lm_eval.tasks", dest="tasks", default="")
    p.add_argument("--lm_eval.include_path", dest="include_path", default="")
    p.add_argument("--lm_eval.limit", dest="limit", type=float, default=None)
    p.add_argument("--lm_eval.num_fewshot", dest="num_fewshot", type=int, default=None)
    p.add_argument("--lm_eval.batch_size", dest="batch_size", type=int, default=1)
    return p


def model_source(path: str) -> tuple[str, str]:
    """("dcp", step folder) or ("hf", folder) for ``--model_path``; a ConfigError naming what was found."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return "dcp", path
    if os.path.isfile(os.path.join(path, "config.json")) and any(n.endswith(".safetensors") for n in os.listdir(path)):
        return "hf", path
    ck = os.path.join(path, "checkpoint")
    if os.path.isdir(ck):
        steps = sorted(
            int(n[5:])
            for n in os.listdir(ck)
            if n.startswith("step-") and os.path.isfile(os.path.join(ck, n, ".metadata"))
        )
        if steps:
            return "dcp", os.path.join(ck, f"step-{steps[-1]}")
    raise ConfigError(
        f"--model_path {path!r}: not a DCP step folder (.metadata), a run folder with a complete checkpoint, "
        "or a Hugging Face folder (config.json + *.safetensors)"
    )


def prepare(config: JobConfig, kind: str, path: str) -> JobConfig:
    """The config evaluation runs with: validation on, no checkpointing, the weights' source set."""
    out = os.path.abspath(config.job.dump_folder)
    holder = os.path.abspath(path if kind == "hf" else os.path.dirname(os.path.dirname(path)))
    if out == holder:
        raise ConfigError(
            f"--job.dump_folder {config.job.dump_folder!r} is the folder of the model being evaluated; "
            "give the results their own folder (e.g. --job.dump_folder <run>/eval)"
        )
    values: dict[str, Any] = {"validation.enable": True, "checkpoint.enable_checkpoint": False}
    values["checkpoint.initial_load_hf"] = path if kind == "hf" else ""
    if kind == "hf" and not config.model.config:
        values["model.config"] = path
    if kind == "hf" and not config.model.tokenizer_path:
        values["model.tokenizer_path"] = path
    return apply_overrides(config, values, where="flame.evaluate")


def load_dcp_weights(model_parts, path: str) -> None:
    """The model weights of a DCP step folder (written under any layout) into the (sharded) model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from flame.utils._checkpoint_io import match_keys, tensor_metadata

    stored = tensor_metadata(path)
    for part in model_parts:
        found = match_keys(
            part, stored, path, "evaluate it with the --model.config it was trained with", allow_extra=True
        )
        state = get_model_state_dict(part)
        # Stored names may differ from the model's (wrapper prefixes); tied weights are stored once.
        by_stored = {found[k]: v for k, v in state.items() if k in found}
        dcp.load(by_stored, checkpoint_id=path)
        set_model_state_dict(part, {k: by_stored[found[k]] for k in state if k in found}, options=_partial())


def _partial():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)


def target_bytes(tokenizer) -> Any:
    """``bytes_of(batch)``: UTF-8 bytes of the decoded target tokens of every row (special tokens: none)."""

    def bytes_of(batch: dict) -> int:
        total = 0
        for row in batch["labels"].tolist():
            ids = [t for t in row if t >= 0]
            total += len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
        return total

    return bytes_of


def run_lm_eval(trainer, args: argparse.Namespace) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if trainer.world_size > 1:
        raise ConfigError("--lm_eval.tasks runs on one process (NGPU=1): lm-eval drives the model itself")
    model = trainer.model_parts[0]
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=trainer.tokenizer, batch_size=args.batch_size, device=str(trainer.device))
    manager = TaskManager(include_path=args.include_path or None)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--lm_eval.tasks: unknown task(s) {unknown} (add --lm_eval.include_path for your own)")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=args.num_fewshot, log_samples=False
    )
    out: dict[str, Any] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in name and name != "alias":
                out[f"lm_eval/{task}/{name.split(',')[0]}"] = value
    return out


def main(argv: list[str] | None = None) -> int:
    from flame.utils.console import fail, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    args, rest = _parser().parse_known_args(argv)
    try:
        kind, path = model_source(args.model_path)
        config = prepare(parse_args(rest), kind, path)
    except ConfigError as e:
        return fail(e.format())
    setup_logging()
    from flame.trainer import Trainer

    try:
        trainer = Trainer(config)  # validates the config first, before any process group or work
    except ConfigError as e:
        return fail(e.format())
    try:
        if kind == "dcp":
            load_dcp_weights(trainer.model_parts, path)
        assert trainer.validator is not None
        metrics: dict[str, Any] = trainer.validator.validate(
            trainer.model_parts, trainer.eval_loss_sum, target_bytes(trainer.tokenizer)
        )
        if args.tasks:
            metrics.update(run_lm_eval(trainer, args))
    except ConfigError as e:
        return fail(e.format())
    finally:
        trainer.close()
    metrics["model_path"] = path
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(config.job.dump_folder, "summary.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        shown = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        print("flame.evaluate: " + json.dumps(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
