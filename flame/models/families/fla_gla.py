"""fla's gated linear attention (GLA): CPU path, tensor-parallel plan, state-passing context parallelism.

The layer (``fla.layers.gla.GatedLinearAttention``) calls ``chunk_gla`` (or ``fused_recurrent_gla``
for short sequences); on CPU tensors both take flame's PyTorch recurrence
(``flame.models.fla_reference.gla_reference``). Under context parallelism ``gla_state_passing`` wraps
the op: a chunk's state map is ``S_out = diag(D) S_in + S0`` (``D``: the product of the chunk's gates),
so two kernel calls per layer give the exact outputs (``flame/parallel/state_passing.py``).
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

# q/k/v/output-gate projections and the second, widening projection of the low-rank key gate split by
# heads; the first, low-rank one replicated; the short convolutions split by channels like the projections
# feeding them; o by rows. fla's GatedMLP as the Llama MLP, its fused SwiGLU+down-projection on this rank's
# columns.
FLA_GLA_LAYER_PLAN = {
    "attn.q_proj": "colwise",
    "attn.k_proj": "colwise",
    "attn.v_proj": "colwise",
    "attn.g_proj": "colwise",
    "attn.gk_proj.0": "replicate",
    "attn.gk_proj.1": "colwise",
    "attn.q_conv1d": "channels",
    "attn.k_conv1d": "channels",
    "attn.v_conv1d": "channels",
    "attn.o_proj": "rowwise",
    **FLA_MLP_PLAN,
}


def gla_state_passing(chunk_gla: Callable) -> Callable:
    """Wrap an fla GLA op (``chunk_gla`` / ``fused_recurrent_gla`` signature) so that inside a CP layer
    it computes the outputs of the whole sequence by state passing; outside one it is the op itself."""

    @functools.wraps(chunk_gla)
    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = sp.active()
        if state is None:
            return chunk_gla(q, k, v, *args, **kwargs)
        if args:
            sp.refuse("positional arguments after q, k, v")
        gate = kwargs.pop("g", None)
        gate = kwargs.pop("gk", None) if gate is None else gate
        if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
            sp.refuse("recurrent-state caches (decoding)")
        if kwargs.get("cu_seqlens") is not None:
            sp.refuse("packed documents (cu_seqlens)")
        if kwargs.get("gv") is not None:
            sp.refuse("value gates (gv)")
        scale = kwargs.get("scale")
        q2, k2, v2, g2 = (sp.halves(x) for x in (q, k, v, gate))
        _, s0 = chunk_gla(q2, k2, v2, g=g2, scale=scale, output_final_state=True)  # [2B, H, K, V]
        decay = g2.float().sum(1).exp()  # [2B, H, K]: the product of the chunk's gates
        h0 = sp.start_states(state, s0, decay, decay.shape[1:], lambda d, carried: d[..., None] * carried)
        o2, _ = chunk_gla(q2, k2, v2, g=g2, scale=scale, initial_state=h0, output_final_state=False)
        return sp.unhalves(o2), None

    return call


def install() -> None:
    """GLA's ops: the CPU path for CPU tensors, then the state-passing wrapper around it (idempotent)."""
    layer: Any = importlib.import_module("fla.layers.gla")
    for name in ("chunk_gla", "fused_recurrent_gla"):
        ref.patch(layer, name, ref.gla_reference, ref.op_input)
    sp.wrap_ops(layer, "chunk_gla", "fused_recurrent_gla", gla_state_passing)


register_adapter("gla", cpu_path_adapter("gla", FLA_GLA_LAYER_PLAN, ("GatedLinearAttention",), install))
