"""Run under torchrun (gloo, any number of ranks): flame's all-gather CP attention against full-sequence sdpa.

Every rank builds the same full q/k/v (GQA: 4 query heads, 2 K/V heads) and computes the reference
attention over the whole sequence, then runs ``allgather_attention`` on its load-balanced shard and
compares the output and the gradients of its shard of q, k and v (the K/V gradients arrive through
the all-gather's reduce-scatter). Cases: causal, a sliding window, and packed documents (the mask
``ContextParallel`` builds from per-document positions). Also checks that flame's shards equal
torch's head-tail sharding. Prints one JSON line per case and ``CP ATTENTION OK`` at the end.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from flame.parallel.context_parallel import ContextParallel, shard_indices
from flame.parallel.cp_attention import allgather_attention, attach

TOLERANCE = 1e-5  # fp32, absolute: only the order of the sums differs


def reference_mask(position_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """``[batch, 1, L, L]``: causal, within the sliding window, within each document."""
    length = position_ids.shape[1]
    index = torch.arange(length)
    distance = index[:, None] - index[None, :]
    mask = (distance >= 0)[None]
    if sliding_window is not None:
        mask = mask & (distance < sliding_window)
    segment = torch.cumsum(position_ids == 0, dim=1)
    return (mask & (segment[:, :, None] == segment[:, None, :]))[:, None]


def check(case: str, mesh, position_ids: torch.Tensor, sliding_window: int | None, varlen: bool) -> dict:
    batch, heads, kv_heads, length, dim = position_ids.shape[0], 4, 2, position_ids.shape[1], 8
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, length, dim, generator=generator, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, generator=generator, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, dim, generator=generator, requires_grad=True)
    upstream = torch.randn(batch, length, heads, dim, generator=generator)  # d(loss)/d(output)
    scale = 0.3

    full_mask = reference_mask(position_ids, sliding_window)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, scale=scale, enable_gqa=True).transpose(1, 2)
    (ref * upstream).sum().backward()

    cp = ContextParallel(mesh, "allgather", torch.device("cpu"))
    fake_batch = {"input_ids": position_ids, "labels": position_ids}
    if varlen:
        fake_batch["position_ids"] = position_ids
    shard = cp.shard(fake_batch)
    mask = cp.model_inputs(shard, torch.device("cpu")).get("attention_mask")
    index = shard_indices(length, mesh.size(), mesh.get_local_rank())
    local = [t.detach()[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    module = nn.Module()
    attach(module, mesh)
    out, _ = allgather_attention(module, *local, mask, scaling=scale, sliding_window=sliding_window)
    (out * upstream[:, index]).sum().backward()
    errors = {
        "output": (out - ref[:, index]).abs().max().item(),
        **{
            f"grad_{name}": (mine.grad - full.grad[:, :, index]).abs().max().item()
            for name, mine, full in zip("qkv", local, (q, k, v), strict=True)
        },
    }
    return {"case": case, "rank": dist.get_rank(), **errors, "ok": max(errors.values()) <= TOLERANCE}


def main() -> int:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    length = 8 * mesh.size()
    causal = torch.arange(length).expand(2, length)
    # packed rows: documents (pieces) of lengths that cross the chunk boundaries, different per row
    docs = (
        torch.cat([torch.arange(n) for n in (5, 3, length - 8)]),
        torch.cat([torch.arange(n) for n in (1, length - 1)]),
    )
    packed = torch.stack(docs)
    results = [
        check("causal", mesh, causal, None, varlen=False),
        check("sliding_window", mesh, causal, 5, varlen=False),
        check("documents", mesh, packed, None, varlen=True),
        check("documents_sliding_window", mesh, packed, 3, varlen=True),
    ]
    from torch.distributed.tensor.experimental._attention import _context_parallel_shard, _HeadTailLoadBalancer

    tokens = torch.arange(2 * length).reshape(2, length)
    (torch_shard,) = _context_parallel_shard(mesh, [tokens], [1], _HeadTailLoadBalancer(length, mesh.size(), "cpu"))
    ours = ContextParallel(mesh, "allgather", torch.device("cpu")).shard({"input_ids": tokens, "labels": tokens})
    results.append({"case": "torch_head_tail_layout", "ok": torch.equal(torch_shard, ours["input_ids"])})
    for result in results:
        print(json.dumps(result), flush=True)
    ok = all(r["ok"] for r in results)
    if ok and dist.get_rank() == 0:
        print("CP ATTENTION OK", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
