"""``python -m flame.distributed.torchrun ...``: torchrun itself, minus a traceback on a stop signal.

With ``--signals_to_handle`` torchrun's agent forwards a signal (SIGTERM, SIGUSR1 ...) to its workers,
waits ``--shutdown_timeout`` seconds for them to finish, and then re-raises the signal as a
``SignalException``, which Python prints as a traceback of torchrun's internals although nothing
went wrong: flame's workers saved a checkpoint and exited 0. This wrapper prints one line instead
and exits 128 + the signal number, as a process killed by that signal would. Arguments and
behaviour are otherwise exactly torchrun's (train.sh uses it).
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main() -> int:
    try:
        torchrun_main()
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name} after passing it to the workers", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
