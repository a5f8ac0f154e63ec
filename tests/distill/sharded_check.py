"""Run under torchrun (2 gloo ranks): the vocabulary-sharded KD loss against the dense one.

Every rank builds the same full logits, shards them on the vocabulary (``Shard(-1)``, as loss parallelism
leaves the output head's logits) and computes the loss and its gradient; rank 0 prints, as one JSON
line per case, the largest differences from the dense loss computed in one process.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from flame.distill.divergences import LOSSES, KDSpec
from flame.distill.losses import agreement_sums, kd_loss_sum


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    g = torch.Generator().manual_seed(0)
    width = 11
    zs_full = torch.randn(2, 7, width, generator=g) * 2
    zt_full = torch.randn(2, 7, width, generator=g) * 2
    labels = torch.randint(0, 9, (2, 7), generator=g)
    labels[0, 2] = labels[1, 5] = -100
    cases = []
    for loss in LOSSES:
        for top_k in (None, 3, 7):
            for size in (width, 9):  # 9: the last two columns are padding
                if top_k is not None and top_k > size:
                    continue
                cases.append((loss, top_k, size))
    for loss, top_k, size in cases:
        spec = KDSpec(loss, 2.0, 0.3, top_k, chunk_size=5)
        dense_z = zs_full.clone().requires_grad_(True)
        dense = kd_loss_sum(dense_z, labels, zt_full, spec, size)
        dense.backward()
        leaf = distribute_tensor(zs_full.clone(), mesh, [Shard(-1)]).requires_grad_(True)
        sharded = kd_loss_sum(leaf, labels, distribute_tensor(zt_full, mesh, [Shard(-1)]), spec, size)
        sharded.backward()
        grad = leaf.grad.full_tensor()
        values = [torch.zeros(()) for _ in range(dist.get_world_size())]
        dist.all_gather(values, sharded.detach())
        sums = agreement_sums(
            distribute_tensor(zs_full, mesh, [Shard(-1)]),
            labels,
            distribute_tensor(zt_full, mesh, [Shard(-1)]),
            size,
            4,
        )
        dense_sums = agreement_sums(zs_full, labels, zt_full, size, 4)
        if dist.get_rank() == 0:
            record = {
                "loss": loss,
                "top_k": top_k,
                "size": size,
                "dense": dense.item(),
                "value_diff": abs(sharded.item() - dense.item()),
                "ranks_agree": all(v.item() == values[0].item() for v in values),
                "grad_diff": (grad - dense_z.grad).abs().max().item(),
                "grad_scale": dense_z.grad.abs().max().item(),
                "agreement_diff": (sums - dense_sums).abs().max().item(),
            }
            print("RESULT " + json.dumps(record), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
