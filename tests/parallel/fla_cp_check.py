"""Run under torchrun (gloo, any number of ranks): flame's state-passing CP for fla's GLA against the
unsharded sequence, at the op level.

Every rank builds the same full inputs and computes the reference over the whole sequence, then runs
the CP-wrapped op on its load-balanced shard (chunks ``r`` and ``2cp-1-r``) and compares the output
and the gradients of its shard. Cases: the GLA recurrence (slow decay, so every chunk's start state
matters), the gated delta rule with fla's in-kernel options and grouped value heads, DeltaNet's delta rule, and fla's short
convolution (halo from the chunk before). Prints one JSON line per case and
``FLA CP OK`` at the end.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from flame.models.families import fla_base, fla_delta, fla_gla
from flame.parallel import state_passing as sp
from flame.parallel.context_parallel import shard_indices

TOLERANCE = 1e-5  # fp32, absolute


def compare(case: str, ours: list[torch.Tensor], full: list[torch.Tensor], index: torch.Tensor) -> dict:
    errors = {
        f"{case}_{i}": (a - b[:, index]).abs().max().item() for i, (a, b) in enumerate(zip(ours, full, strict=True))
    }
    return {"case": case, "rank": dist.get_rank(), **errors, "ok": max(errors.values()) <= TOLERANCE}


def main() -> int:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    for install in (fla_base.install_common, fla_gla.install, fla_delta.install):  # as importing fla in training does
        install()
    import fla.layers.gla as gla_layer
    from fla.modules import ShortConvolution

    state = sp.CPState(mesh=mesh, degree=mesh.size(), rank=mesh.get_local_rank())
    B, L, H, K, V = 2, 12 * mesh.size(), 2, 4, 3
    index = shard_indices(L, mesh.size(), mesh.get_local_rank())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, L, H, K, generator=gen),
        torch.randn(B, L, H, K, generator=gen),
        torch.randn(B, L, H, V, generator=gen),
    )
    g = F.logsigmoid(torch.randn(B, L, H, K, generator=gen)) / 8  # slow decay: states carry far
    upstream = torch.randn(B, L, H, V, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v, g)]
    out, _ = gla_layer.chunk_gla(*full[:3], g=full[3], state_v_first=True)
    (out * upstream).sum().backward()
    local = [t[:, index].clone().requires_grad_() for t in (q, k, v, g)]
    token = sp._ACTIVE.set(state)
    try:
        mine, _ = gla_layer.chunk_gla(*local[:3], g=local[3], state_v_first=True)
    finally:
        sp._ACTIVE.reset(token)
    (mine * upstream[:, index]).sum().backward()
    results = [compare("gla", [mine, *(t.grad for t in local)], [out, *(t.grad for t in full)], index)]

    import fla.layers.gated_deltanet as gdn_layer

    HQ, HV = 2, 4  # grouped value heads
    q, k = torch.randn(B, L, HQ, K, generator=gen), torch.randn(B, L, HQ, K, generator=gen)
    v = torch.randn(B, L, HV, V, generator=gen)
    a, b = torch.randn(B, L, HV, generator=gen), torch.randn(B, L, HV, generator=gen)
    A_log, dt_bias = torch.randn(HV, generator=gen) - 2, torch.randn(HV, generator=gen)
    options = {"use_qk_l2norm_in_kernel": True, "use_beta_sigmoid_in_kernel": True, "allow_neg_eigval": True,
               "use_gate_in_kernel": True, "A_log": A_log, "dt_bias": dt_bias, "state_v_first": True}  # fmt: skip
    upstream = torch.randn(B, L, HV, V, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v, a, b)]
    out, _ = gdn_layer.chunk_gated_delta_rule(q=full[0], k=full[1], v=full[2], g=full[3], beta=full[4], **options)
    (out * upstream).sum().backward()
    local = [t[:, index].clone().requires_grad_() for t in (q, k, v, a, b)]
    token = sp._ACTIVE.set(state)
    try:
        mine, _ = gdn_layer.chunk_gated_delta_rule(
            q=local[0], k=local[1], v=local[2], g=local[3], beta=local[4], **options
        )
    finally:
        sp._ACTIVE.reset(token)
    (mine * upstream[:, index]).sum().backward()
    results.append(compare("gated_delta", [mine, *(t.grad for t in local)], [out, *(t.grad for t in full)], index))

    import fla.layers.delta_net as delta_layer

    beta = torch.rand(B, L, HQ, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v[:, :, :HQ], beta)]
    out, _ = delta_layer.chunk_delta_rule(q=full[0], k=full[1], v=full[2], beta=full[3], use_qk_l2norm_in_kernel=True)
    (out * upstream[:, :, :HQ]).sum().backward()
    local = [t.detach()[:, index].clone().requires_grad_() for t in full]
    token = sp._ACTIVE.set(state)
    try:
        mine, _ = delta_layer.chunk_delta_rule(
            q=local[0], k=local[1], v=local[2], beta=local[3], use_qk_l2norm_in_kernel=True
        )
    finally:
        sp._ACTIVE.reset(token)
    (mine * upstream[:, index, :HQ]).sum().backward()
    results.append(compare("delta", [mine, *(t.grad for t in local)], [out, *(t.grad for t in full)], index))

    conv = ShortConvolution(hidden_size=6, kernel_size=4, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    x = torch.randn(B, L, 6, generator=gen, requires_grad=True)
    up = torch.randn(B, L, 6, generator=gen)
    y, _ = conv(x)
    (y * up).sum().backward()
    x_local = x.detach()[:, index].clone().requires_grad_()
    token = sp._ACTIVE.set(state)
    try:
        y_local, _ = conv(x_local)
    finally:
        sp._ACTIVE.reset(token)
    (y_local * up[:, index]).sum().backward()
    results.append(compare("conv", [y_local, x_local.grad], [y, x.grad], index))

    for record in results:
        print(json.dumps(record), flush=True)
    ok = all(r["ok"] for r in results)
    if ok and dist.get_rank() == 0:
        print("FLA CP OK", flush=True)
    dist.barrier()  # no rank leaves while another still runs a collective of the backward
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
