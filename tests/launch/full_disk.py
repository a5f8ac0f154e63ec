"""``python -m tests.launch.full_disk <train flags>``: flame.train on a disk that fills up during one save.

    FLAME_TEST_FULL_DISK_STEP=4 python -m tests.launch.full_disk <train flags>

Every file DCP writes into ``step-<FLAME_TEST_FULL_DISK_STEP>`` accepts its first 1,024 bytes and then
fails with ENOSPC, as a real full disk does part-way through a save. Test-only: flame has no such hook.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import filesystem

BYTES_BEFORE_FULL = 1024
_create_stream = filesystem.FileSystem.create_stream


class _FillingFile:
    """A writable file that raises ENOSPC once ``BYTES_BEFORE_FULL`` bytes are in it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._written = 0

    def write(self, data) -> int:
        room = BYTES_BEFORE_FULL - self._written
        if len(data) > room:
            self._stream.write(bytes(memoryview(data)[: max(room, 0)]))
            self._written = BYTES_BEFORE_FULL
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += len(data)
        return self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _full_disk_stream(self, path, mode: str):
    with _create_stream(self, path, mode) as stream:
        full = Path(str(path)).parent.name == f"step-{os.environ['FLAME_TEST_FULL_DISK_STEP']}"
        yield _FillingFile(stream) if full and "w" in mode else stream


filesystem.FileSystem.create_stream = _full_disk_stream  # type: ignore[method-assign]

if __name__ == "__main__":
    from flame.cli import main

    sys.exit(main(sys.argv[1:]))
