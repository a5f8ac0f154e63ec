"""Train with ``python -m flame.train`` semantics, but stall the save of one step right before it completes.

    FLAME_TEST_STALL_STEP=6 FLAME_TEST_STALL_MARKER=/tmp/m python tests/checkpoint/stall_save.py <train flags>

When DCP has written every data file of ``step-<FLAME_TEST_STALL_STEP>`` and is about to write its
``.metadata``, this touches the marker file and sleeps, so that a test can SIGKILL the process exactly
in the middle of a real save. Test-only: flame itself has no such hook.
"""

import os
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint import filesystem

_finish = filesystem._FileSystemWriter.finish


def _stalling_finish(self, metadata, results):
    if Path(str(self.path)).name == f"step-{os.environ['FLAME_TEST_STALL_STEP']}":
        Path(os.environ["FLAME_TEST_STALL_MARKER"]).touch()
        time.sleep(600)
    return _finish(self, metadata, results)


filesystem._FileSystemWriter.finish = _stalling_finish

if __name__ == "__main__":
    from flame.cli import main

    sys.exit(main(sys.argv[1:]))
