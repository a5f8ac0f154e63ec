"""Run under torchrun: the teacher built on a layout's mesh gives the one-process logits, holding a shard.

argv: teacher folder, tokenizer folder, layout (fsdp | ddp | tp | cp). Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import flame.distributed.titan  # noqa: F401
from flame.config.schema import JobConfig
from flame.distill.source import resolve_teacher
from flame.distill.teacher import Teacher
from flame.distributed.setup import init_distributed

from torchtitan.distributed.parallel_dims import ParallelDims


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, tokenizer_path, layout = sys.argv[1:4]
    init_distributed(60)
    world = dist.get_world_size()
    degrees = {
        "fsdp": dict(dp_shard=world),
        "ddp": dict(dp_replicate=world),
        "tp": dict(tp=world),
        "cp": dict(cp=world),
    }
    d = {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1, **degrees[layout]}
    dims = ParallelDims(**d, pp=1, ep=1, world_size=world, spmd_backend="partial_dtensor")
    dims.build_mesh()
    config = JobConfig()
    config.distill.teacher = folder
    config.training.mixed_precision_param = "float32"
    config.training.tensor_parallel_degree = d["tp"]
    config.experimental.context_parallel_degree = d["cp"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    teacher = Teacher(resolve_teacher(folder), tokenizer, config, dims, torch.device("cpu"))
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    if teacher.context_parallel is not None:
        batch = teacher.context_parallel.shard(batch)
    logits = teacher.logits(batch)
    is_dtensor = hasattr(logits, "full_tensor")
    placements = str(getattr(logits, "placements", ""))
    if is_dtensor:
        logits = logits.full_tensor()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(input_ids=ids).logits[..., : len(tokenizer)]
    if teacher.context_parallel is not None:
        from flame.parallel.context_parallel import shard_indices

        want = want[:, shard_indices(16, world, dist.get_rank())]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in teacher.model.parameters())
    diffs = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(diffs, (logits - want).abs().max().reshape(()))
    if dist.get_rank() == 0:
        record = {
            "max_diff": max(x.item() for x in diffs),
            "local_params": local,
            "params": sum(p.numel() for p in reference.parameters())
            - (reference.config.vocab_size - len(tokenizer)) * 2 * reference.config.hidden_size,
            "placements": placements,
            "shard_axes": list(teacher.shard_axes),
        }
        print("RESULT " + json.dumps(record), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
