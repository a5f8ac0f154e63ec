"""Process group and device setup, the same for a notebook, one process, or torchrun on many nodes.

Under torchrun (``RANK``/``WORLD_SIZE`` set) the group comes from the environment; in a plain
Python process a one-rank group is created on an in-memory store (no port, no environment).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


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
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return True


def set_collective_timeout(timeout_seconds: int) -> None:
    """Change the default group's collective timeout (after the slow first step).

    torchtitan's ``set_pg_timeouts`` fails on CPU and calls an API missing in torch 2.13, so this
    uses c10d's own setter.
    """
    from torch.distributed.distributed_c10d import _get_default_group, _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=timeout_seconds), _get_default_group())


def world_size_from_env() -> int:
    """The world size a launcher announced (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
