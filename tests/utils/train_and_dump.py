"""Train with flame's Trainer, then save the trained model's logits on fixed token ids (rank 0).

    torchrun --nproc_per_node=2 -m tests.utils.train_and_dump <ids.pt> <out.pt> <train flags...>

Under torchrun the model is FSDP2-sharded; every rank runs the same forward pass on the same ids, so
the logits are exactly those of the model that wrote the last checkpoint. The output holds
``{"ids": ..., "logits": ...}`` (float32), the reference the exported Hugging Face model must match.
"""

import os
import sys

import torch
import torch.distributed as dist


def main(ids_path: str, out_path: str, args: list[str]) -> None:
    from flame.config.loader import parse_args
    from flame.trainer import Trainer

    if "RANK" in os.environ:  # one of N ranks of its own: the start-up line on stdout, as `flame.train` prints it
        from flame.cli import setup_logging

        setup_logging()
    trainer = Trainer(parse_args(args))
    try:
        trainer.train()
        ids = torch.load(ids_path)
        trainer.model.eval()
        with torch.no_grad():
            logits = trainer.model(input_ids=ids.to(trainer.device)).logits.float().cpu()
        if dist.get_rank() == 0:
            torch.save({"ids": ids, "logits": logits}, out_path)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
