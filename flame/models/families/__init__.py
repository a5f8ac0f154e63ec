"""Model families: one module per family group, holding everything flame knows about that family.

A family module registers a ``ModelAdapter`` (``flame.models.adapters``) per model type: its layout,
tensor-parallel plan, pipeline stage forward, varlen route, context-parallel path and wrappers, FLOP
convention, and the CPU-path installs it runs once its package is imported. The generic machinery it
plugs into lives in ``flame/parallel/`` and ``flame/models/``, which never import this package; the
callers that look a family up (the trainer's builders, the dry run, validation, conversion) import it.

Importing this package imports every module in this folder (in name order), so adding a family is
adding a module here, plus its test. A module that refines another one's entries (``fla_gla`` replaces
the CUDA-only entry ``fla_base`` registers for ``gla``) imports that module first, so the order of the files
does not matter. The modules are found by name, which import-linter cannot follow: the contracts in
pyproject.toml therefore also keep the families below everything that imports this package.
"""

import importlib
import pkgutil

from flame.models.adapters import families_registered

FAMILY_MODULES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__)))

for _name in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

families_registered()
