"""flame's data path: text sources -> tokenized, mixed, packed, sharded, resumable batches.

``build_dataloader(training, tokenizer, dp_rank=r, dp_world_size=w)`` is the entry point the
trainer uses. Modules: ``sources`` (finding and loading datasets), ``documents``/``streaming``
(per-shard readers of map-style and streamed sources), ``mixing`` (sampling sources by
probability), ``packing`` (rows and the resumable state), ``varlen`` (packed documents and their
boundaries), ``tokenized`` (preprocessed folders). Command lines: ``python -m flame.data.demo``
builds a small real corpus and tokenizer, ``python -m flame.data.inspect`` shows the batches
training would see, ``python -m flame.utils.preprocess`` tokenizes a dataset offline.

``build_dataloader`` is imported lazily (PEP 562) so that ``flame.data.demo`` and the
source checks do not pay for importing torchtitan and datasets.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_dataloader"]


def __getattr__(name: str) -> Any:
    if name == "build_dataloader":
        from flame.data.loader import build_dataloader

        return build_dataloader
    raise AttributeError(f"module 'flame.data' has no attribute {name!r}")
