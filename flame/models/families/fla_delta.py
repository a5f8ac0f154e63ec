"""fla's delta-rule families, Gated DeltaNet and DeltaNet: CPU path, tensor-parallel plans, state-passing CP.

The layers (``fla.layers.gated_deltanet.GatedDeltaNet``, ``fla.layers.delta_net.DeltaNet``) call the
(gated) delta rule ops; on CPU tensors they take flame's PyTorch recurrences
(``flame.models.fla_reference``), with fla's in-kernel options (q/k L2 norm, the A_log/dt_bias gate,
sigmoid beta, grouped value heads). Under context parallelism ``gated_delta_state_passing`` wraps the op:
the chunk state map is affine with a full K x K matrix (``flame/parallel/state_passing.py``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from flame.models import fla_reference as ref
from flame.models.adapters import register_adapter
from flame.models.families.fla_base import FLA_MLP_PLAN, cpu_path_adapter
from flame.parallel import state_passing as sp

# q/k/v/output-gate projections and the per-head gate and beta inputs (a, b) split by heads, the layer's
# own per-head decay parameters (A_log, dt_bias: "heads") too, convolutions by channels; fla's GatedMLP.
FLA_GATED_DELTANET_LAYER_PLAN = {
    "attn": "heads",
    "attn.q_proj": "colwise",
    "attn.k_proj": "colwise",
    "attn.v_proj": "colwise",
    "attn.a_proj": "colwise",
    "attn.b_proj": "colwise",
    "attn.g_proj": "colwise",
    "attn.q_conv1d": "channels",
    "attn.k_conv1d": "channels",
    "attn.v_conv1d": "channels",
    "attn.o_proj": "rowwise",
    **FLA_MLP_PLAN,
}

# DeltaNet: as Gated DeltaNet without the per-head decay parameters.
FLA_DELTANET_LAYER_PLAN = {name: style for name, style in FLA_GATED_DELTANET_LAYER_PLAN.items() if name != "attn"}


def gated_delta_state_passing(op: Callable) -> Callable:
    """Wrap fla's (gated) delta rule op (Gated DeltaNet, DeltaNet) for CP. Its chunk state map is affine with a full
    matrix, ``S_out = P S_in + S0`` (``P``: the product of the chunk's ``exp(g_t) (I - beta_t k_t k_t^T)``),
    so besides ``S0`` (the chunk from a zero state) each rank gets ``P`` from one more call of the same
    op, with zero values and the identity as start state (the op is linear in values and state); then
    fold and rerun as for GLA: three calls per layer."""

    @functools.wraps(op)
    def call(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        g: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        gate = {} if g is None else {"g": g}  # DeltaNet's op has no gate
        state = sp.active()
        if state is None:
            return op(q=q, k=k, v=v, beta=beta, **gate, **kwargs)
        if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
            sp.refuse("recurrent-state caches (decoding)")
        if kwargs.get("cu_seqlens") is not None:
            sp.refuse("packed documents (cu_seqlens)")
        kwargs = {**kwargs, "state_v_first": False, "output_final_state": True}
        q2, k2, v2, b2 = (sp.halves(x) for x in (q, k, v, beta))
        gate = {name: sp.halves(x) for name, x in gate.items()}
        _, s0 = op(q=q2, k=k2, v=v2, beta=b2, **gate, **kwargs)  # [2B, HV, K, V]
        heads, dk = s0.shape[1:3]
        eye = torch.eye(dk, device=q.device, dtype=torch.float32).expand(s0.shape[0], heads, dk, dk).contiguous()
        zeros = v2.new_zeros(*v2.shape[:-1], dk)
        _, transition = op(q=q2, k=k2, v=zeros, beta=b2, **gate, **{**kwargs, "initial_state": eye})  # [2B, HV, K, K]
        h0 = sp.start_states(state, s0, transition, (heads, dk, dk), lambda p, carried: p @ carried)
        o2, _ = op(q=q2, k=k2, v=v2, beta=b2, **gate, **{**kwargs, "initial_state": h0, "output_final_state": False})
        return sp.unhalves(o2), None

    return call


# (fla layer module, chunk op, recurrent op, reference) per family
_OPS: dict[str, tuple[str, str, str, Callable[..., Any]]] = {
    "gated_deltanet": (
        "fla.layers.gated_deltanet",
        "chunk_gated_delta_rule",
        "fused_recurrent_gated_delta_rule",
        ref.gated_delta_rule_reference,
    ),
    "delta_net": ("fla.layers.delta_net", "chunk_delta_rule", "fused_recurrent_delta_rule", ref.delta_rule_reference),
}


def install() -> None:
    """Both families' ops: the CPU path for CPU tensors, then the state-passing wrapper around it, and Gated
    DeltaNet's fused convolution (idempotent)."""
    for module, chunk, recurrent, reference in _OPS.values():
        layer: Any = importlib.import_module(module)
        for name in (chunk, recurrent):
            ref.patch(layer, name, reference, ref.op_input)
        sp.wrap_ops(layer, chunk, recurrent, gated_delta_state_passing)
    gdn: Any = importlib.import_module("fla.layers.gated_deltanet")
    ref.patch(gdn, "causal_conv1d", ref.causal_conv1d_reference, ref.first_input)


for _model_type, _plan, _module in (
    ("gated_deltanet", FLA_GATED_DELTANET_LAYER_PLAN, "GatedDeltaNet"),
    ("delta_net", FLA_DELTANET_LAYER_PLAN, "DeltaNet"),
):
    register_adapter(_model_type, cpu_path_adapter(_model_type, _plan, (_module,), install))
