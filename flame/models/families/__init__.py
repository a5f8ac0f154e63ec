"""Model families: one module per family group, holding everything flame knows about that family.

A family module registers a ``ModelAdapter`` (``flame.models.adapters``) per model type: its layout,
tensor-parallel plan, pipeline stage forward, varlen route, context-parallel path and wrappers, and
the CPU-path installs it runs once its package is imported. The generic machinery it plugs into lives in
``flame/parallel/`` and ``flame/models/``, which never import this package (an import-linter contract in
``make check``); the callers that look a family up (trainer, dry run, validation, conversion) import it.

Importing this package registers every family below, in this order: ``fla`` first, because it registers
every fla model type as CUDA-only, and the fla families flame has more for replace their entry after it.
Adding a family is adding a module here (and its test), and its name to this list.
"""

from flame.models.adapters import families_registered
from flame.models.families import fla, fla_delta, fla_gla, llama

__all__ = ["fla", "fla_delta", "fla_gla", "llama"]

families_registered()
