"""The parallel layout of a run: torchtitan's ``ParallelDims`` and its device meshes, built in one place.

The trainer and the dry run (on torch's fake process group) both call ``build_parallel_dims``, so the
meshes a plan is checked with are the ones training uses. torchtitan is imported on the first build, so
validation can resolve the degrees (``resolve_dp_shard``) without it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flame.config.schema import JobConfig

if TYPE_CHECKING:
    from torchtitan.distributed.parallel_dims import ParallelDims


def world_size_from_env() -> int:
    """The world size a launcher announced (1 when run as a plain process); no torch import, so the
    command's first validation pass can use it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def dry_run_world_size() -> int:
    """The ranks a dry run stands in for: train.sh's NNODE x NGPU, else the launcher's world size."""
    return int(os.environ.get("FLAME_DRY_RUN_WORLD_SIZE", world_size_from_env()))


def resolve_dp_shard(config: JobConfig, world_size: int) -> int:
    """The data-parallel shard degree, with -1 resolved to the ranks left over by the other axes."""
    t, e = config.training, config.experimental
    others = (
        t.data_parallel_replicate_degree
        * t.tensor_parallel_degree
        * e.pipeline_parallel_degree
        * e.context_parallel_degree
    )
    if t.data_parallel_shard_degree == -1:
        return max(world_size // max(others, 1), 1)
    return t.data_parallel_shard_degree


def build_parallel_dims(config: JobConfig, world_size: int) -> ParallelDims:
    """The degrees of ``config`` for ``world_size`` ranks (dp_shard -1 resolved), with the meshes built.

    Needs the default process group (the real one, or the fake one of a dry run). "partial_dtensor":
    torchtitan's SPMD backend for DTensor-based parallelisms (FSDP2, TP, CP)."""
    import flame.distributed.titan  # noqa: F401  (before any torchtitan import)

    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.parallel_dims import ParallelDims

    t, e = config.training, config.experimental
    dims = ParallelDims(
        dp_replicate=t.data_parallel_replicate_degree,
        dp_shard=resolve_dp_shard(config, world_size),
        cp=e.context_parallel_degree,
        tp=t.tensor_parallel_degree,
        pp=e.pipeline_parallel_degree,
        ep=1,
        world_size=world_size,
        spmd_backend="partial_dtensor",
    )
    dist_utils.set_spmd_backend("partial_dtensor")
    dims.build_mesh()
    return dims
