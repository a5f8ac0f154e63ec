"""Training FLOPs per token, per model family, for throughput and MFU.

Dense matmuls cost 6 FLOPs per parameter per token (forward 2, backward 4). Softmax attention adds
the score and value products, 12 x layers x hidden x seq_len per token (forward 4, backward 8),
halved neither for causality nor GQA, as in the PaLM paper's MFU convention. Linear-attention and
state-space families (fla) have no quadratic term: counting one would report impossible MFU
(upstream flame's issue #7 showed 133 %). Hybrids count the term for their softmax layers only.
Embedding parameters are excluded (a lookup, not a matmul); an untied output head is included.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flame.models.adapters import adapter_for


def softmax_attention_layers(config: Any) -> int:
    """How many layers use softmax attention: the family adapter says (linear-attention and state-space
    families: none, hybrids: their attention layers), else all of them."""
    count = adapter_for(str(getattr(config, "model_type", ""))).softmax_attention_layers
    return count(config) if count is not None else int(getattr(config, "num_hidden_layers", 0))


def flops_per_token(model: nn.Module, config: Any, seq_len: int) -> int:
    """Training FLOPs for one token at sequence length ``seq_len`` (see the module docstring)."""
    get_input, get_output = (getattr(model, f"get_{k}_embeddings", None) for k in ("input", "output"))
    embedding = get_input() if callable(get_input) else None
    embedding_params = embedding.weight.numel() if embedding is not None else 0
    output = get_output() if callable(get_output) else None
    tied = output is not None and embedding is not None and output.weight is embedding.weight
    params = sum(p.numel() for p in model.parameters()) - embedding_params
    if tied:
        params += embedding_params  # the shared matrix is still multiplied by in the output head
    hidden = int(getattr(config, "hidden_size", 0))
    window = getattr(config, "sliding_window", None) or seq_len
    attention = 12 * softmax_attention_layers(config) * hidden * min(seq_len, int(window))
    return 6 * params + attention


# Peak dense tensor-core throughput in TFLOP/s: (bf16/fp16, tf32) from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": (989.0, 494.7),
    "H100 SXM": (989.0, 494.7),
    "H100 NVL": (835.0, 417.5),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.7),
    "GH200": (989.0, 494.7),
    "B200": (2250.0, 1100.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),
    "MI300X": (1307.0, 653.7),
    "MI250X": (383.0, 95.7),
}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The peak of a known GPU (longest matching name wins), or None (MFU then reads "unknown")."""
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name:
            bf16, tf32 = PEAK_TFLOPS[name]
            return bf16 if dtype in ("bfloat16", "float16") else tf32
    return None
