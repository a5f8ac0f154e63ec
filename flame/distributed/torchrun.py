"""``python -m flame.distributed.torchrun ...``: torchrun itself, minus a traceback on a stop signal.

With ``--signals_to_handle`` torchrun's agent forwards a signal (SIGTERM, SIGUSR1 ...) to its workers,
waits ``--shutdown_timeout`` seconds for them to finish, and then re-raises the signal as a
``SignalException``, which Python prints as a traceback of torchrun's internals although nothing
went wrong: flame's workers saved a checkpoint and exited 0. This wrapper prints one line instead
and exits 128 + the signal number, as a process killed by that signal would.

When a worker fails, torchrun raises ``ChildFailedError``, printed with a traceback of torchrun's
internals. A worker exiting with 2 has refused its configuration (checks that need the world size,
such as parallel degrees) and printed the reason itself: the wrapper then exits 2 quietly. Other
failures print torchrun's failure summary (ranks, exit codes, log paths) without the traceback and
exit 1. Arguments and behaviour are otherwise exactly torchrun's (train.sh uses it).
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def main() -> int:
    try:
        torchrun_main()
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name} after passing it to the workers", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if any(failure.exitcode == 2 for failure in e.failures.values()):
            return 2  # a configuration refused by the workers, who said why
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
