"""Process group and device setup, the same for a notebook, one process, or torchrun on many nodes.

Under torchrun (``RANK``/``WORLD_SIZE`` set) the group comes from the environment; in a plain
Python process a one-rank group is created on an in-memory store (no port, no environment).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from flame.distributed.parallel_dims import world_size_from_env


def device_for_rank() -> torch.device:
    """CUDA device ``LOCAL_RANK`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(timeout_seconds: int, trace_buf_size: int = 0) -> bool:
    """Create the default process group if none exists; True if this call created it.

    NCCL on GPUs, gloo on CPU. A caller that already set one up (a notebook, a test) keeps it.
    ``trace_buf_size`` sizes NCCL's flight recorder (the last collectives, dumped on a hang).
    """
    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(trace_buf_size))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        store = _attempt_store(timeout)
        if store is not None:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return True


def _attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's shared store, with a prefix per restart attempt (None when not under such an agent).

    torchrun's agent hosts one TCPStore for the whole job and keeps it across ``--max-restarts``
    restarts, so the keys of a failed attempt (for example the gloo address of a rank that was
    killed) are still there: a restarted rank could read its dead peer's address and fail with
    "Connection refused". Prefixing every key with the attempt number gives each attempt a clean
    namespace for the default group and every group created from it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"flame/attempt_{attempt}", store)


def set_collective_timeout(timeout_seconds: int) -> None:
    """Change the collective timeout of every process group of this rank (after the slow first step).

    Every group, not only the default one: FSDP, TP and PP collectives run on the device mesh's
    groups and flame's fault handler has its own, each created with the init timeout. A collective
    that waits longer (a peer stalled or died) then fails with a timeout error instead of hanging.
    torchtitan's ``set_pg_timeouts`` fails on CPU and calls an API missing in torch 2.13, so this
    uses c10d's own setter.
    """
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    timeout = datetime.timedelta(seconds=timeout_seconds)
    for group, (backend, _store) in list(_world.pg_map.items()):
        # Only real backends have a timeout (the fake backend of shape-only meshes has none).
        if "gloo" in str(backend) or "nccl" in str(backend):
            _set_pg_timeout(timeout, group)


def launched_world_size() -> int:
    """The world size of this run before its process group exists: an existing group's (a caller that set
    one up), else the launcher's announcement (1 for a plain process, as ``init_distributed`` then makes)."""
    return dist.get_world_size() if dist.is_initialized() else world_size_from_env()
