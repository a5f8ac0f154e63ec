"""Llama-style Hugging Face decoders: Llama, Mistral, Qwen2/3, OLMo2, Granite (transformers' own classes).

Layout ``model.layers`` with ``self_attn.{q,k,v,o}_proj`` and a gated MLP; attention goes through
transformers' ``AttentionInterface`` (so context parallelism swaps in its attention function) and
takes packed documents as a 4-D mask or flash-attention's varlen arguments (the adapter's generic
route). This module holds their tensor-parallel plan and pipeline stage forward.
"""

from __future__ import annotations

from typing import Any

import torch

from flame.models.adapters import ModelAdapter, register_adapter
from flame.parallel.context_parallel import CONTEXT_SHARD_ATTR, shard_indices
from flame.parallel.tensor_parallel import SEQUENCE_SHARDS_ATTR

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite")

# One decoder layer: attention q/k/v split by heads (columns), o by rows; the gated MLP the same.
LLAMA_LAYER_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def llama_stage_forward(model: Any, x: torch.Tensor, first: bool, last: bool) -> torch.Tensor:
    """One stage of a Llama-style decoder: token ids or hidden states in, hidden states or logits out.

    Attention is causal (no mask is passed), positions are 0..L-1, or under context parallelism the
    global positions of this rank's shard of the sequence.
    """
    decoder = model.model
    hidden = decoder.embed_tokens(x) if first else x
    # Under sequence parallelism the hidden states between stages are this rank's sequence shard.
    length = x.shape[1] if first else x.shape[1] * getattr(model, SEQUENCE_SHARDS_ATTR, 1)
    cp_shard = getattr(model, CONTEXT_SHARD_ATTR, None)  # (cp degree, cp rank)
    if cp_shard is None:
        positions = torch.arange(length, device=hidden.device).unsqueeze(0)
    else:
        cp_degree, cp_rank = cp_shard
        positions = shard_indices(length * cp_degree, cp_degree, cp_rank, hidden.device).unsqueeze(0)
    position_embeddings = decoder.rotary_emb(hidden, positions)
    for layer in decoder.layers.values():
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
    if last:
        return model.lm_head(decoder.norm(hidden))
    return hidden


for _model_type in MODEL_TYPES:
    register_adapter(
        _model_type,
        ModelAdapter(
            family=_model_type, tp_plan=LLAMA_LAYER_PLAN, stage_forward=llama_stage_forward, context_parallel=True
        ),
    )
