"""Train like ``python -m flame.train`` and record a hash of every step's batches, per rank.

Launched by the distributed resume test under torchrun: each rank appends
``{"step", "hash"}`` lines to ``<dump_folder>/batches_rank<r>.jsonl``, so an interrupted and
resumed run can be compared step by step with an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch.distributed as dist


def batch_hash(batches: list[dict]) -> str:
    """sha256 over every tensor of a step's micro-batches, keys in sorted order."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode() + batch[key].numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    from flame.cli import setup_logging
    from flame.config.loader import parse_args
    from flame.trainer import Trainer

    setup_logging()
    config = parse_args(argv)
    trainer = Trainer(config)
    path = os.path.join(config.job.dump_folder, f"batches_rank{dist.get_rank()}.jsonl")
    train_step = trainer.train_step

    def recording_step(batches):
        with open(path, "a") as f:
            f.write(json.dumps({"step": trainer.state.step, "hash": batch_hash(batches)}) + "\n")
        return train_step(batches)

    trainer.train_step = recording_step  # type: ignore[method-assign]
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
