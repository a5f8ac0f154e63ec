"""Save a DCP checkpoint from an FSDP2-sharded model, as the trainer does; run under torchrun (gloo, CPU).

torchrun --nproc_per_node=2 fsdp_save_checkpoint.py <config folder> <weights.pt> <checkpoint folder>
"""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM


def main(config_dir: str, weights: str, checkpoint: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.load_state_dict(torch.load(weights))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = model.state_dict()
    assert all(isinstance(t, DTensor) for t in state.values()), "every weight must be sharded"
    dcp.save({**state, "optimizer.fake": torch.zeros(3), "train_state": {"step": 5}}, checkpoint_id=checkpoint)
    dist.barrier()  # no rank tears down gloo while another is still in the last collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
