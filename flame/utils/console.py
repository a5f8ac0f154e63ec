"""Console output of flame's commands: one log format (with the rank under torchrun), one-line errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging() -> None:
    """One line per message, prefixed with the rank under torchrun; info only on the ``LOG_RANK`` ranks.

    ``LOG_RANK`` is a comma list of global ranks (default 0) or ``all``; other ranks print warnings and
    errors. train.sh sets ``all``: torchrun then filters the console and every rank's log file is complete.
    """
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    log_ranks = {r.strip() for r in os.environ.get("LOG_RANK", "0").split(",")}
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # torchtitan logs through the root logger: keep its chatter at warnings, flame's at info.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("flame").setLevel(
        logging.INFO if "all" in log_ranks or (rank or "0") in log_ranks else logging.WARNING
    )
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*get_last_lr.*")  # torchtitan's schedule reload


def fail(message: str, code: int = 2) -> int:
    """Print one error message (no traceback) and give the exit code: 2 bad input, 1 a runtime failure."""
    print(f"flame: error: {message}", file=sys.stderr)
    return code
