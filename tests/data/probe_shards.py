"""Under torchrun: write which documents each (rank, worker) reads in its first epoch.

``python -m torch.distributed.run ... -m tests.data.probe_shards SPEC.json``: SPEC holds the
tokenizer path, the output folder, the number of documents and a list of ``[training]`` settings.
Each rank writes ``<out>/<case>_rank<r>.json``: one list of document texts per worker.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist


def main(spec_path: str) -> int:
    from transformers import AutoTokenizer

    from flame.data import build_dataloader
    from tests.data.conftest import split_on, take, training_config, windows

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(spec_path) as f:
        spec = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    per_shard = spec["num_docs"] // (world * spec["num_workers"])
    for case, settings in spec["cases"].items():
        cfg = training_config(**settings, num_workers=spec["num_workers"], seq_len=32, batch_size=2)
        loader = build_dataloader(cfg, tokenizer, dp_rank=rank, dp_world_size=world)
        batches = take(loader, spec["batches_per_worker"] * spec["num_workers"])
        seen = []
        for worker in range(spec["num_workers"]):  # StatefulDataLoader hands out workers' batches in turn
            stream = [t for w in windows(batches[worker :: spec["num_workers"]]) for t in w]
            docs = split_on(stream, tokenizer.eos_token_id)[:per_shard]
            seen.append([tokenizer.backend_tokenizer.decode(d) for d in docs])
        with open(os.path.join(spec["out"], f"{case}_rank{rank}.json"), "w") as f:
            json.dump(seen, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
