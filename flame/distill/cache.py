"""The offline teacher cache: the teacher's top-k log-probabilities of every row a training run will see.

    python -m flame.distill.cache --job.config_file run.toml --distill.teacher T --distill.top_k 64 \\
        --distill.teacher_cache cache/ [--world_size 8]

runs the teacher (one process; CUDA if visible) over exactly the batches the training config gives to
each data-parallel rank, step by step and micro-batch by micro-batch (flame's data order is deterministic
and resumable), and writes, per data-parallel rank, ``.npy`` arrays: ``ids`` ``[rows, seq_len, k]`` int32,
``logprobs`` ``[rows, seq_len, k]`` and ``log_rest`` ``[rows, seq_len]`` float32 (at ``--distill.temperature``),
and ``fingerprints`` ``[rows]``: a 64-bit BLAKE2b hash of each row's input ids, labels and positions.
``--world_size`` is the training run's NGPU x NNODE (it decides how rows are dealt to data-parallel ranks).
Disk: 8k + 4 bytes per token.

Training with ``--distill.teacher_cache <folder>`` (and no ``--distill.teacher``) keeps no teacher in memory.
Before any work, the cache's ``meta.json`` must match the run (the data settings of ``[training]``, the
data-parallel world size, the tokenizer, ``top_k``, ``temperature``, enough steps); a mismatch is a
``ConfigError`` naming every differing setting. Every step then checks every row's fingerprint against the
batch the loader gave: another data config, seed, batch or layout is an error, never silent misalignment.
"""

from __future__ import annotations

import os
import sys

import torch

from flame.config.errors import ConfigError
from flame.distill.cache_io import write_cache


def _split_world_size(argv: list[str]) -> tuple[list[str], int]:
    """``--world_size N`` (this tool's own flag) out of the training flags."""
    rest, world_size = [], 1
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--world_size" or arg.startswith("--world_size="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world_size: the training run's NGPU x NNODE, a positive integer; got {value!r}")
            world_size = int(value)
            continue
        rest.append(arg)
        i += 1
    return rest, world_size


def main(argv: list[str] | None = None) -> int:
    from flame.config.loader import parse_args
    from flame.config.validate import validate
    from flame.utils.console import fail, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        flags, world_size = _split_world_size(argv)
        config = parse_args(flags)
        d = config.distill
        missing = [f for f, v in (("--distill.teacher", d.teacher), ("--distill.teacher_cache", d.teacher_cache),
                                  ("--distill.top_k", d.top_k)) if not v]  # fmt: skip
        if missing:
            raise ConfigError(f"python -m flame.distill.cache needs {', '.join(missing)} (the teacher, the output "
                              "folder and k)")  # fmt: skip
        if os.path.exists(os.path.join(d.teacher_cache, "meta.json")):
            raise ConfigError(f"--distill.teacher_cache {d.teacher_cache} holds a cache already; remove it first")
        if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":
            raise ConfigError("python -m flame.distill.cache runs in one process (not under torchrun)")
        setup_logging()
        import dataclasses

        # the training checks, with the teacher in memory (the cache this writes does not exist yet)
        online = dataclasses.replace(config, distill=dataclasses.replace(d, teacher_cache=""))
        validate(online, world_size, "cuda" if torch.cuda.is_available() else "cpu")
        meta = write_cache(config, world_size)
    except ConfigError as e:
        return fail(e.format("invalid config"))
    gib = meta["rows_per_rank"] * meta["data"]["training.seq_len"] * meta["bytes_per_token"] / 2**30
    print(f"teacher cache written to {config.distill.teacher_cache}: {gib:.3f} GiB per data-parallel rank")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
