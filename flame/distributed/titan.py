"""Thin access point to torchtitan on machines without CUDA.

torchtitan 0.3.0 sets ``torchtitan.tools.utils.device_type`` to "cuda" when no accelerator is
found, and several modules copy that value at import; so before any other torchtitan import we
point it at the device that really exists. Import torchtitan through this module only.
"""

from __future__ import annotations

import torch

import torchtitan.tools.utils as _tt_utils

if not torch.cuda.is_available():
    _tt_utils.device_type = "cpu"
    _tt_utils.device_module = torch.cpu

# FSDP must be imported before torchtitan builds meshes: it registers the "fake" c10d backend.
import torch.distributed.fsdp
