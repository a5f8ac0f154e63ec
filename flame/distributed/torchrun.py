"""``python -m flame.distributed.torchrun ...``: torchrun itself, minus the noise around a clean stop.

With ``--signals_to_handle`` torchrun's agent forwards a signal (SIGTERM, SIGUSR1 ...) to its workers,
waits ``--shutdown_timeout`` seconds for them to finish, and then re-raises the signal as a
``SignalException``, which Python prints as a traceback of torchrun's internals although nothing
went wrong: flame's workers saved a checkpoint and exited 0. This wrapper prints one line instead
and exits 128 + the signal number, as a process killed by that signal would.

When a worker fails, torchrun raises ``ChildFailedError``, printed with a traceback of torchrun's
internals. A worker exiting with 2 has refused its configuration (checks that need the world size,
such as parallel degrees) and printed the reason itself: the wrapper then exits 2 with that message
alone. The agent's own lines about the failure (``Sending process ... closing signal SIGTERM`` to the
other workers, ``failed (exitcode: 2) ...``) are held back while the workers run and dropped in that
case; where no worker whose stderr reaches the console (``--tee``, ``--local_ranks_filter``) wrote the
message, the refusing rank's message is copied from its log file under ``--log_dir``. Other failures
print the held lines and torchrun's failure summary (ranks, exit codes, log paths) without the
traceback and exit 1. Arguments and behaviour are otherwise exactly torchrun's (train.sh uses it).
"""

from __future__ import annotations

import glob
import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import main as torchrun_main
from torch.distributed.run import parse_args

# The agent's logger and the beginnings of its lines about failed and stopped workers.
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
FAILURE_LINES = ("Sending process ", "failed (exitcode: ")
CONFIG_ERROR = 2  # flame's exit code for a refused configuration


class HoldFailureLines(logging.Filter):
    """Keeps the agent's failure lines back until the wrapper knows whether they say anything."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(FAILURE_LINES):
            self.held.append(record)
            return False
        return True

    def release(self, logger: logging.Logger) -> None:
        logger.removeFilter(self)
        for record in self.held:
            logger.handle(record)
        self.held.clear()


def shown_on_console(args) -> set[int] | None:
    """Local ranks whose stderr torchrun copies to the console (None: all of them)."""
    if args.tee not in ("2", "3"):
        return set()
    if not args.local_ranks_filter:
        return None
    return {int(r) for r in args.local_ranks_filter.split(",")}


def refusal_message(failures: dict[int, ProcessFailure], shown: set[int] | None, log_dir: str | None) -> str | None:
    """The config error to print for a run whose workers refused their configuration (exit code 2).

    None when the message already reached the console: a rank that torchrun copies to it wrote one (it
    may have been stopped by the agent before its own exit code counted). Else the first refusing rank's
    message, from its ``flame: error:`` line on, read from this attempt's ``stderr.log`` under ``--log_dir``
    (torchrun keeps no path to it in the failure when the worker wrote no ``error.json``).
    """
    attempts = glob.glob(os.path.join(glob.escape(log_dir or ""), "*", "attempt_*"))
    if not log_dir or not attempts:
        return None
    attempt = max(attempts, key=os.path.getmtime)  # this attempt's folder: the newest

    def error_of(rank: int) -> str | None:
        try:
            with open(os.path.join(attempt, str(rank), "stderr.log")) as f:
                text = f.read()
        except OSError:
            return None
        start = text.find("flame: error:")
        return text[start:].rstrip("\n") if start >= 0 else None

    ranks = [int(d) for d in os.listdir(attempt) if d.isdigit()]
    if any(error_of(rank) for rank in ranks if shown is None or rank in shown):
        return None
    refused = sorted(f.local_rank for f in failures.values() if f.exitcode == CONFIG_ERROR)
    return next((text for text in map(error_of, refused) if text), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    agent_logger = logging.getLogger(AGENT_LOGGER)
    hold = HoldFailureLines()
    agent_logger.addFilter(hold)
    try:
        torchrun_main(argv)
    except SignalException as e:
        hold.release(agent_logger)
        print(f"torchrun: stopped by {e.sigval.name} after passing it to the workers", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if any(failure.exitcode == CONFIG_ERROR for failure in e.failures.values()):
            args = parse_args(argv)
            message = refusal_message(e.failures, shown_on_console(args), args.log_dir)
            if message:
                print(message, file=sys.stderr)
            return CONFIG_ERROR
        hold.release(agent_logger)
        print(e.format_msg(), file=sys.stderr)
        return 1
    hold.release(agent_logger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
