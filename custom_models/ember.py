"""Ember: a small decoder-only language model of flame's own, as an example of a custom architecture.

What makes it Ember: every residual branch (attention and MLP) is scaled by a learned *per-channel
gate* before it is added back, initialised to ``residual_gate_init`` (small), so a deep stack starts
close to the identity and each channel learns how much of each sublayer it wants. Everything else is
a plain pre-norm decoder: grouped-query causal attention with rotary positions through torch's
``scaled_dot_product_attention``, a SwiGLU MLP, and a ``norm_type`` of ``rmsnorm`` or ``layernorm``.

Why it is laid out like this: flame's generic model adapter finds the decoder layers at
``model.layers`` (``base_model_prefix = "model"``), which is all it needs for FSDP sharding,
activation checkpointing and ``torch.compile`` per layer. The model keeps no buffers (rotary angles
are computed from the positions on the fly), so building it on the meta device and initialising it
after sharding needs nothing but ``_init_weights``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

NORM_TYPES = ("rmsnorm", "layernorm")


class EmberConfig(PretrainedConfig):
    """Hyper-parameters of an Ember model (``model_type: "ember"`` in config.json)."""

    model_type = "ember"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1408,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        norm_type: str = "rmsnorm",
        norm_eps: float = 1e-6,
        residual_gate_init: float = 0.1,
        initializer_range: float = 0.02,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type {norm_type!r}: choose one of {', '.join(NORM_TYPES)}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
            )
        num_key_value_heads = num_key_value_heads or num_attention_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of {num_key_value_heads=}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.residual_gate_init = residual_gate_init
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.update(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
        super().__init__(**kwargs)


class EmberRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the compute dtype: the mean square of bf16 activations is too coarse.
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def make_norm(config: EmberConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return EmberRMSNorm(config.hidden_size, config.norm_eps)


class ResidualGate(nn.Module):
    """Ember's twist: a learned per-channel scale on a residual branch, before it joins the stream."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        return branch * self.scale.to(branch.dtype)


def rotate(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` [batch, heads, seq, head_dim] at ``position_ids`` [batch, seq]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = position_ids.float()[:, None, :, None] * inv_freq  # [batch, 1, seq, half]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class EmberAttention(nn.Module):
    def __init__(self, config: EmberConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, position_ids, self.rope_theta), rotate(k, position_ids, self.rope_theta)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class EmberMLP(nn.Module):
    def __init__(self, config: EmberConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EmberBlock(nn.Module):
    """One decoder layer: x + gate_a * attn(norm(x)), then x + gate_m * mlp(norm(x))."""

    def __init__(self, config: EmberConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = EmberAttention(config)
        self.attn_gate = ResidualGate(config.hidden_size)
        self.mlp_norm = make_norm(config)
        self.mlp = EmberMLP(config)
        self.mlp_gate = ResidualGate(config.hidden_size)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn_gate(self.attn(self.attn_norm(x), position_ids, mask))
        return x + self.mlp_gate(self.mlp(self.mlp_norm(x)))


class EmberPreTrainedModel(PreTrainedModel):
    config_class = EmberConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EmberBlock"]  # noqa: RUF012  (transformers declares these as instance attributes)
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ResidualGate):
            nn.init.constant_(module.scale, self.config.residual_gate_init)
        elif isinstance(module, (EmberRMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)


def attention_mask_for_sdpa(attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
    """SDPA's boolean mask (True = attend), or None for plain causal attention.

    Accepts what callers pass: nothing (training on packed rows), a 4-D boolean mask already
    holding causality (packed documents), or a 2-D padding mask [batch, seq] (generation).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask.bool()
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class EmberModel(EmberPreTrainedModel):
    """The backbone: embeddings, ``layers`` (the decoder blocks), final norm."""

    def __init__(self, config: EmberConfig) -> None:
        super().__init__(config)
        self.embed_tokens: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(EmberBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq, device=x.device).expand(batch, seq)
        mask = attention_mask_for_sdpa(attention_mask, seq)
        for layer in self.layers:
            x = layer(x, position_ids, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class EmberForCausalLM(EmberPreTrainedModel, GenerationMixin):
    """Ember with a language-model head; ``labels`` (same shape as the inputs) give the shifted LM loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012  (as above)

    def __init__(self, config: EmberConfig) -> None:
        super().__init__(config)
        self.model = EmberModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Any = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Ember keeps no KV cache: every generation step re-reads the whole sequence (simple, not fast).
        return {"input_ids": input_ids, "attention_mask": attention_mask}
