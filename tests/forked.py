"""``python -m module`` on 1..N ranks in processes forked from one that imported torch, transformers and
flame once.

A flame run of the test suite's tiny models spends about 10 of its 12 CPU-seconds importing torch,
transformers and datasets; a suite of ~80 such runs (many on two ranks) spends most of its time there.
Here a multiprocessing fork server imports them once (``PRELOAD``) and forks each rank from it. A child
is a fresh process as far as flame can tell: the module runs as ``__main__`` with its ``sys.argv``, the
environment of a torchrun worker (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ...), its
own stdout/stderr (captured in files) and its exit code; nothing ran in the server but the imports.

What it does not emulate is torchrun's agent (restarts, its store, its error files): tests of the
launcher itself use the real torchrun (``tests.helpers.torchrun(..., launcher="torchrun")``) or
train.sh.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# imported once by the fork server: what every flame run needs (the trainer, the Llama family the tests
# train, the json/datasets data path); what only some runs need (fla, dynamo) they import themselves
PRELOAD = [
    "flame.cli",
    "flame.trainer",
    "transformers.models.llama.modeling_llama",
    "datasets",
    "datasets.packaged_modules.json.json",
]

_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    """The fork server's context, started on first use with the tests' child environment
    (``tests.helpers.env()``: huggingface_hub, datasets and OpenMP read theirs at import time)."""
    global _context
    if _context is None:
        from tests.helpers import env

        environment = env()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(environment)
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _rank_main(module: str, argv: list[str], environment: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the child: this rank's environment, working directory and output files, then the module as
    ``__main__`` (its ``sys.exit`` becomes the process's exit code, an exception exit code 1)."""
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    # a process started by the fork server inherits "forkserver" as its start method; a `python -m`
    # process on Linux has "fork" (DataLoader workers would otherwise start through the server, ~1 s each)
    multiprocessing.set_start_method("fork", force=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if "OMP_NUM_THREADS" in environment:
        import torch

        torch.set_num_threads(int(environment["OMP_NUM_THREADS"]))
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def launch(
    module: str,
    argv: list[str],
    environment: dict[str, str],
    *,
    nproc: int = 1,
    port: int = 0,
    cwd: str | os.PathLike = ".",
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``python -m module argv`` on ``nproc`` ranks (torchrun's worker environment when
    ``nproc > 1``), wait for all of them and return their exit code and output like ``subprocess.run``
    (the ranks' outputs one after another). Like torchrun, the first rank that fails stops the others
    (SIGTERM, then SIGKILL after 10 s) and its exit code is the result."""
    context = _server()
    with tempfile.TemporaryDirectory(prefix="flame-forked-") as tmp:
        procs, files = [], []
        for rank in range(nproc):
            env = dict(environment)
            if nproc > 1:
                env.update(
                    RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                    WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), ROLE_WORLD_SIZE=str(nproc),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                )  # fmt: skip
            out, err = Path(tmp) / f"{rank}.out", Path(tmp) / f"{rank}.err"
            proc = context.Process(target=_rank_main, args=(module, argv, env, str(cwd), str(out), str(err)))
            proc.start()
            procs.append(proc)
            files.append((out, err))
        returncode = _wait(procs, timeout, f"python -m {module} {' '.join(argv)}")
        stdout = "".join(_read(out) for out, _ in files)
        stderr = "".join(_read(err) for _, err in files)
    return subprocess.CompletedProcess([module, *argv], returncode, stdout, stderr)


def _read(path: Path) -> str:
    """A rank's output; empty when it died before opening it (its error is on the test's stderr)."""
    return path.read_text(errors="replace") if path.exists() else ""


def _wait(procs: list, timeout: float, what: str) -> int:
    deadline = time.monotonic() + timeout
    failed: int | None = None
    while any(p.is_alive() for p in procs):
        for p in procs:
            if failed is None and p.exitcode not in (None, 0):
                failed = p.exitcode
                _stop([q for q in procs if q.is_alive()])
        if time.monotonic() > deadline:
            _stop(procs)
            raise subprocess.TimeoutExpired(what, timeout)
        time.sleep(0.05)
    codes = [p.exitcode for p in procs]
    if failed is None:
        failed = next((c for c in codes if c != 0), 0)
    return 128 - failed if failed < 0 else failed  # killed by signal N: the shell's 128 + N


def _stop(procs: list) -> None:
    for p in procs:
        p.terminate()
    end = time.monotonic() + 10
    for p in procs:
        p.join(max(end - time.monotonic(), 0))
        if p.is_alive():
            p.kill()
            p.join()
