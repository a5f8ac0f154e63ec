"""Wheels of what flame needs on the lent GPU machine, which reaches no package registry (``make gpu-wheels``).

    python scripts/gpu/wheels.py [--dest .whl] [--check]

The device machine (kind nvidia-h200: Python 3.12, torch 2.11 with CUDA, transformers, triton) lacks some
of flame's dependencies. This finds them, downloads their Python 3.12 manylinux x86-64 wheels into
``--dest`` and checks the set, so that ``scripts/gpu/check.py`` can install it there with
``pip install --no-index --no-deps``:

- the roots are ``pyproject.toml``'s dependencies and its ``float8`` extra (torchao, for the float8
  GPU test); a root on the machine's list (``scripts/gpu/h200_packages.txt``) needs no wheel;
- every ``Requires-Dist`` of a downloaded wheel (markers evaluated for CPython 3.12 on Linux x86-64,
  extras left out) that the machine lacks is downloaded too, until nothing is missing;
- each version is the one installed here, where the test suite runs, except ``DEVICE_PINS``;
- the checks: one version of each name; each wheel installable on CPython 3.12 manylinux x86-64; every
  requirement met by a wheel of a matching version or by the machine (by the version the list gives,
  where it gives one); every third-party module that flame, its tests, benchmarks and scripts import
  provided the same way (except one imported only inside functions, of an extra that is not carried,
  such as lm-eval for ``flame.evaluate``'s tasks: listed in the manifest as not carried); wheels plus the
  repository tree within the 64 MiB that travel to the machine.

``--check`` runs the checks alone on the wheels already in ``--dest`` (exit code 1 on a problem). The
result, ``<dest>/MANIFEST.json``, lists each wheel with its size, hash and the wheels that need it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("flame", "tests", "benchmarks", "custom_models", "scripts")  # the code that runs on the machine
MACHINE_LIST = Path(__file__).with_name("h200_packages.txt")
LIMIT_BYTES = 64 * 2**20  # what travels to the device machine: the repository tree plus carried paths
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
PIP_TARGET += [arg for p in PLATFORMS for arg in ("--platform", p)]
# Versions for the device machine that differ from the ones installed here, and why.
DEVICE_PINS = {
    # torchao is built against one torch; 0.17.0 is the release for torch 2.11 (the machine's), while the
    # 0.18 installed here goes with this machine's newer torch
    "torchao": "0.17.0",
}
MARKER_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "platform_release": "",
    "platform_version": "",
    "extra": "",
}
SUPPORTED = set(cpython_tags((3, 12), platforms=PLATFORMS)) | set(compatible_tags((3, 12), "cp312", PLATFORMS))


def machine_packages(path: Path = MACHINE_LIST) -> dict[str, str | None]:
    """The machine's distributions: canonical name -> version (None where the list gives none)."""
    found: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version or None
    return found


def roots(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["float8"]]]


def requirements(metadata: str) -> list[Requirement]:
    """A wheel's ``Requires-Dist`` that apply to the device machine (no extras, markers for 3.12/Linux)."""
    reqs = [Requirement(r) for r in Parser().parsestr(metadata).get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(MARKER_ENV)]


def read_wheel(path: Path) -> tuple[str, str, list[Requirement]]:
    """(canonical name, version, applicable requirements) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    headers = Parser().parsestr(text)
    return canonicalize_name(headers["Name"]), headers["Version"], requirements(text)


def check(dest: Path, machine: dict[str, str | None], needed: list[Requirement], tree_bytes: int) -> list[str]:
    """Everything that would stop the wheels in ``dest`` from installing and importing on the machine."""
    problems = []
    wheels = sorted(dest.glob("*.whl"))
    found: dict[str, tuple[str, list[Requirement]]] = {}
    for path in wheels:
        name, version, reqs = read_wheel(path)
        if name in found:
            problems.append(f"two versions of {name}: {found[name][0]} and {version} (pip refuses the set)")
        found[name] = (version, reqs)
        tags = parse_wheel_filename(path.name)[3]
        if not tags & SUPPORTED:
            problems.append(f"{path.name} does not install on CPython 3.12 manylinux x86-64")
    wanted = [(req, "pyproject.toml") for req in needed]
    wanted += [(req, f"{name} {version}") for name, (version, reqs) in sorted(found.items()) for req in reqs]
    for req, source in wanted:
        name = canonicalize_name(req.name)
        if name in found:
            version = found[name][0]
            where = "the wheel"
        elif name in machine:
            version = machine[name]
            where = "the machine"
        else:
            problems.append(f"{source} requires {req}: neither a wheel here nor on the machine")
            continue
        if version is not None and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{source} requires {req}, {where} has {name} {version}")
    excused = not_carried(set(found), machine)
    for module, imp in sorted(imported_distributions().items()):
        if not imp.dists:
            problems.append(f"{imp.files[0]} imports {module}, which is not installed here (add it to pyproject.toml)")
        elif module not in excused and not any(d in found or d in machine for d in imp.dists):
            dists = ", ".join(imp.dists)
            problems.append(f"{imp.files[0]} imports {module} ({dists}): neither a wheel here nor on the machine")
    total = sum(p.stat().st_size for p in wheels)
    if total + tree_bytes > LIMIT_BYTES:
        problems.append(
            f"wheels {total / 2**20:.1f} MiB + repository tree {tree_bytes / 2**20:.1f} MiB exceed the "
            f"{LIMIT_BYTES / 2**20:.0f} MiB that travel to the device machine"
        )
    return problems


@dataclass
class Imported:
    """A third-party module the code imports: its distributions here, the files, and whether any file
    imports it when the file itself is imported (module or class level) rather than inside a function."""

    dists: list[str]
    files: list[str] = field(default_factory=list)
    at_import: bool = False


def _imports(tree: ast.AST, at_import: bool = True):
    """(module names, at import time) of every import statement; function bodies run later."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            yield [a.name for a in node.names], at_import
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield [node.module], at_import
        deferred = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(node, at_import and not deferred)


def imported_distributions(root: Path = ROOT) -> dict[str, Imported]:
    """Third-party modules imported anywhere in the code that runs on the machine, by module name."""
    files = [p for d in SOURCES for p in sorted((root / d).rglob("*.py"))]
    local = {p.stem for p in files} | set(SOURCES)
    distributions = importlib.metadata.packages_distributions()
    found: dict[str, Imported] = {}
    for path in files:
        for names, at_import in _imports(ast.parse(path.read_text(), str(path))):
            for module in {n.split(".")[0] for n in names} - local - set(sys.stdlib_module_names):
                dists = sorted({canonicalize_name(d) for d in distributions.get(module, [])})
                entry = found.setdefault(module, Imported(dists))
                entry.files.append(str(path.relative_to(root)))
                entry.at_import |= at_import
    return found


def optional_extras(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, list[str]]:
    """Distributions of the extras that are not carried (all but ``float8``): name -> its extras."""
    found: dict[str, list[str]] = {}
    for extra, reqs in tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"].items():
        for r in reqs:
            if extra != "float8":
                found.setdefault(canonicalize_name(Requirement(r).name), []).append(extra)
    return found


def not_carried(found: set[str], machine: dict[str, str | None]) -> dict[str, str]:
    """Modules imported only inside functions, of an extra that is not carried: module -> why that is fine."""
    extras = optional_extras()
    notes = {}
    for module, imp in sorted(imported_distributions().items()):
        if not imp.at_import and imp.dists and not any(d in found or d in machine for d in imp.dists):
            names = [e for d in imp.dists for e in extras.get(d, [])]
            if names:
                where = ", ".join(sorted(set(imp.files)))
                notes[module] = f"extra {', '.join(names)}; imported in a function only ({where})"
    return notes


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the files that travel with every device call: tracked and untracked-not-ignored files."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return 0
    paths = {root / p for p in out.decode().split("\0") if p}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def download(dest: Path, pins: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-qq", "--no-deps", *PIP_TARGET, "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)


def local_version(name: str) -> str:
    if name in DEVICE_PINS:
        return DEVICE_PINS[name]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"wheels.py: {name} is needed on the device machine but not installed here; install it first")


def collect(dest: Path, machine: dict[str, str | None]) -> dict[str, list[str]]:
    """Download the closure of missing distributions into ``dest``; return name -> what requires it."""
    required_by: dict[str, list[str]] = {}
    pending = [(canonicalize_name(r.name), "pyproject.toml") for r in roots()]
    while pending:
        new: dict[str, list[str]] = {}
        for name, source in pending:
            if name in required_by:
                required_by[name].append(source)
            elif name not in machine:
                new.setdefault(name, []).append(source)
        pending = []
        if not new:
            break
        download(dest, [f"{name}=={local_version(name)}" for name in sorted(new)])
        required_by.update(new)
        for path in dest.glob("*.whl"):
            name, version, reqs = read_wheel(path)
            if name in new:
                pending += [(canonicalize_name(req.name), f"{name} {version}") for req in reqs]
    return required_by


def write_manifest(dest: Path, required_by: dict[str, list[str]], tree: int, machine: dict[str, str | None]) -> dict:
    wheels = []
    for path in sorted(dest.glob("*.whl")):
        name, version, _ = read_wheel(path)
        data = path.read_bytes()
        wheels.append(
            {
                "file": path.name,
                "name": name,
                "version": version,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "required_by": sorted(set(required_by.get(name, []))),
            }
        )
    manifest = {
        "target": "CPython 3.12, manylinux x86-64 (the device machine)",
        "machine_list": str(MACHINE_LIST.relative_to(ROOT)),
        "wheels": wheels,
        "wheel_bytes": sum(w["bytes"] for w in wheels),
        "not_carried": not_carried({w["name"] for w in wheels}, machine),
        "tree_bytes": tree,
        "limit_bytes": LIMIT_BYTES,
    }
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(ROOT / ".whl"))
    p.add_argument("--check", action="store_true", help="check the wheels already in --dest; download nothing")
    p.add_argument("--machine", default=str(MACHINE_LIST), help="the machine's package list")
    a = p.parse_args(argv)
    dest = Path(a.dest)
    machine = machine_packages(Path(a.machine))
    tree = tree_bytes()
    if not a.check:
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.whl"):  # a fresh set: no second version of anything from an earlier run
            old.unlink()
        required_by = collect(dest, machine)
        manifest = write_manifest(dest, required_by, tree, machine)
        for w in manifest["wheels"]:
            print(f"{w['bytes'] / 2**20:7.2f} MiB  {w['file']}  (for {', '.join(w['required_by'])})")
        print(f"{manifest['wheel_bytes'] / 2**20:.1f} MiB of wheels in {dest}, tree {tree / 2**20:.1f} MiB")
    problems = check(dest, machine, roots(), tree)
    for module, why in not_carried({read_wheel(p)[0] for p in dest.glob("*.whl")}, machine).items():
        print(f"wheels.py: not carried: {module} ({why})")
    for problem in problems:
        print(f"wheels.py: {problem}", file=sys.stderr)
    if not problems:
        print(f"wheels.py: {len(list(dest.glob('*.whl')))} wheels complete for the device machine")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
