"""An import-linter contract type for ``make check``: no import cycle between the modules of a package.

import-linter's own ``acyclic_siblings`` compares packages as wholes; flame's packages depend on each other
by design in both directions at package level (``flame.models.families`` uses ``flame.parallel``, which uses
``flame.models.adapters``), so the rule is checked on modules: no module reaches itself through imports.
Every import statement counts, at the top of a module or inside a function (grimp reads them all), so a
lazy import is no way around it. Imports made by name (``importlib.import_module``), which no static
reader sees, are declared in the contract's ``by_name`` option (``"importer -> imported"``, ``imported``
ending in ``.*`` for all its children) and count too.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


def module_cycles(
    graph: Any, package: str, by_name: dict[str, set[str]] | None = None, skip: list[str] | None = None
) -> list[list[str]]:
    """The strongly connected groups (more than one module) of the import graph below ``package``, plus the
    ``by_name`` imports (importer -> imported modules), without the packages in ``skip``, each as one cycle through the group's modules (or
    the group itself where a by-name import closes it), found by Tarjan's algorithm."""
    by_name = by_name or {}
    skip = skip or []
    modules = sorted(
        m
        for m in graph.modules
        if (m == package or m.startswith(package + ".")) and not any(m == s or m.startswith(s + ".") for s in skip)
    )
    inside = set(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted((graph.find_modules_directly_imported_by(module) | by_name.get(module, set())) & inside):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(modules) + 100))
    try:
        for module in modules:
            if module not in index:
                visit(module)
    finally:
        sys.setrecursionlimit(limit)
    return [
        _cycle_through(group, lambda m: graph.find_modules_directly_imported_by(m) | by_name.get(m, set()))
        for group in groups
    ]


def _cycle_through(group: list[str], imports: Callable[[str], set[str]]) -> list[str]:
    """The shortest import cycle from the first module of a strongly connected ``group`` back to itself."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for imported in sorted(imports(module) & members):
                if imported == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if module != start else [start, start]
                if imported not in previous:
                    previous[imported] = module
                    following.append(imported)
        frontier = following
    return group


def __getattr__(name: str) -> Any:
    # import-linter is a dev tool: imported when lint-imports asks for the class (PEP 562), so that the
    # code that travels to the GPU machine (scripts/gpu/wheels.py) imports no more at module level.
    if name == "AcyclicModulesContract":
        return _contract_class()
    raise AttributeError(name)


@functools.cache
def _contract_class() -> type:
    from importlinter import Contract, ContractCheck, fields, output

    class AcyclicModulesContract(Contract):
        """``type = acyclic_modules``: no module of ``containers`` (default: the root packages) imports itself
        through other modules."""

        type_name = "acyclic_modules"
        containers = fields.ListField(subfield=fields.StringField(), required=False)
        by_name = fields.ListField(subfield=fields.StringField(), required=False)
        # Packages left out of the check (say why next to the option); their modules are not in the graph.
        skip = fields.ListField(subfield=fields.StringField(), required=False)

        def _by_name(self, graph: Any) -> dict[str, set[str]]:
            edges: dict[str, set[str]] = {}
            for line in self.by_name or []:  # type: ignore[attr-defined]
                importer, imported = (part.strip() for part in line.split("->"))
                targets = graph.find_children(imported[:-2]) if imported.endswith(".*") else {imported}
                edges.setdefault(importer, set()).update(targets)
            return edges

        def check(self, graph: Any, verbose: bool) -> ContractCheck:
            containers = list(self.containers or self.session_options["root_packages"])  # type: ignore[call-overload]
            by_name = self._by_name(graph)
            skipped = [str(package) for package in self.skip or []]  # type: ignore[attr-defined]
            cycles = [cycle for package in containers for cycle in module_cycles(graph, package, by_name, skipped)]
            return ContractCheck(kept=not cycles, metadata={"cycles": cycles})

        def render_broken_contract(self, check: ContractCheck) -> None:
            for cycle in check.metadata["cycles"]:
                output.print_error(" -> ".join(cycle), bold=False)
                output.new_line()

    return AcyclicModulesContract
