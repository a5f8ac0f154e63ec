"""Config-time checks of the parallel layouts that need the model family or its config (run by validation).

Each function returns the problems it found (empty when the layout is possible), each naming the flag
and what is allowed; ``flame.config.validate`` collects them into one ``ConfigError``.
"""

from __future__ import annotations

from typing import Any

from flame.config.errors import ConfigError
from flame.models.adapters import adapter_for, context_parallel_families, tensor_parallel_families
from flame.models.build import declared_model_type, import_family
from flame.parallel.tensor_parallel import check_tp_divisibility, tp_dims


def _model_config(path: str) -> Any | None:
    """The model config at ``path`` through AutoConfig (its family imported first), or None when it cannot
    be read: that is reported with its reason when the model is built."""
    from transformers import AutoConfig

    try:
        import_family(declared_model_type(path))
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, ConfigError):
        return None


def context_parallel_problems(config: Any, device_type: str) -> list[str]:
    """What makes ``--experimental.context_parallel_degree`` impossible for ``config`` (empty if fine)."""
    t, e = config.training, config.experimental
    cp, tp = e.context_parallel_degree, t.tensor_parallel_degree
    problems = []
    if t.seq_len % (2 * cp):
        problems.append(
            f"--training.seq_len {t.seq_len} is not divisible by 2 x --experimental.context_parallel_degree = "
            f"{2 * cp}: context parallelism cuts every sequence into 2 x cp chunks (rank i holds chunks i and "
            "2cp-1-i, which balances the causal attention work)"
        )
    elif tp > 1 and (t.seq_len // cp) % tp:
        problems.append(
            f"--training.seq_len {t.seq_len}: each context-parallel rank holds {t.seq_len // cp} tokens, which "
            f"sequence parallelism cannot split over --training.tensor_parallel_degree {tp}; use a seq_len "
            f"divisible by {2 * cp * tp}"
        )
    rotate = e.context_parallel_rotate_method
    if rotate == "alltoall" and device_type != "cuda":
        problems.append(
            "--experimental.context_parallel_rotate_method alltoall is torch's ring attention, which passes K/V "
            "shards rank to rank on CUDA; on this machine (no CUDA device) context parallelism runs flame's "
            "all-gather attention: use allgather"
        )
    elif rotate == "alltoall" and t.varlen:
        problems.append(
            "--experimental.context_parallel_rotate_method alltoall does not apply with --training.varlen: "
            "document masks need flame's all-gather attention (torch's ring attention is plain causal); use allgather"
        )
    model_type = declared_model_type(config.model.config) if config.model.config else ""
    adapter = adapter_for(model_type)
    if model_type and adapter.cp_state_passing:
        problems.extend(state_passing_problems(config, cp))
    elif model_type and not adapter.context_parallel:
        if adapter.no_context_parallel:  # the family says why (fla's other families)
            kin = [n for n in context_parallel_families() if adapter_for(n).registered_by == adapter.registered_by]
            problems.append(
                f"--experimental.context_parallel_degree {cp}: {adapter.registered_by} model family {model_type!r} "
                f"has no context-parallel path ({adapter.no_context_parallel}); {adapter.registered_by} families "
                f"with context parallelism: {', '.join(kin)}"
            )
        else:
            problems.append(
                f"--experimental.context_parallel_degree {cp}: model family {model_type!r} is not known to route "
                "its attention through transformers' AttentionInterface, which context parallelism replaces; "
                f"families with context parallelism: {', '.join(context_parallel_families())}"
            )
    return problems


def state_passing_problems(config: Any, cp: int) -> list[str]:
    """What state-passing CP (flame/parallel/state_passing.py: fla's linear-attention families) cannot do."""
    t, e = config.training, config.experimental
    problems = []
    if t.varlen:
        problems.append(
            f"--training.varlen with --experimental.context_parallel_degree {cp}: flame's context parallelism for "
            "fla models passes one recurrent state per row between the chunks and has no document boundaries; "
            "train fla models with varlen without CP, or CP without varlen"
        )
    if e.context_parallel_rotate_method != "allgather":
        problems.append(
            f"--experimental.context_parallel_rotate_method {e.context_parallel_rotate_method}: fla models pass "
            "recurrent states between the chunks (no K/V rotation); leave it at allgather"
        )
    model = _model_config(config.model.config)
    if model is None:
        return problems  # reported with its reason when the model is built
    model = model.to_dict()
    chunk = t.seq_len // (2 * cp)
    width = int(model.get("conv_size", 4))
    if model.get("use_short_conv") and chunk < width - 1:
        problems.append(
            f"--training.seq_len {t.seq_len}: chunks of {chunk} tokens are shorter than the model's short "
            f"convolution needs from the chunk before ({width - 1}); use seq_len >= {2 * cp * (width - 1)}"
        )
    return problems


def tensor_parallel_problems(config: Any) -> list[str]:
    """Heads, KV heads and MLP width must divide the tensor-parallel degree (reads the model config)."""
    tp = config.training.tensor_parallel_degree
    model_type = declared_model_type(config.model.config)
    adapter = adapter_for(model_type)
    # (custom families may register a plan when --experimental.custom_model_path is imported: checked then)
    if adapter.registered_by and adapter.tp_plan is None:
        return [
            f"--training.tensor_parallel_degree {tp}: model family {model_type!r} has no tensor-parallel plan; "
            f"families with one: {', '.join(tensor_parallel_families())}"
        ]
    model_config = _model_config(config.model.config)
    if model_config is None:
        return []
    return check_tp_divisibility((adapter.tp_dims or tp_dims)(model_config), tp)
