"""The training command behind ``python -m flame.train``: parse the config, validate it, train, exit with a clear code.

Exit codes: 0 done, 2 bad input (one message naming the flag or file, no traceback, nothing
written), 1 a failure during training (one message where flame knows the cause: divergence, a failed
checkpoint save, a collective timeout). A run stopped by SIGTERM/SIGUSR1 after saving its checkpoint
also exits 0 (so torchrun does not restart it) and leaves ``<dump_folder>/preempted.json``; train.sh
turns that into exit code 75.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from flame.config.errors import ConfigError
from flame.config.loader import parse_args, to_dict


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


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as e:
        return fail(("bad arguments:\n" if len(e.problems) > 1 else "") + e.format())
    if config.job.print_args:
        import tomli_w

        print(tomli_w.dumps(to_dict(config)))
    setup_logging()
    if config.job.dry_run:
        from flame.dry_run import main as dry_run_main

        return dry_run_main(argv)
    from flame.components.fault import explain_runtime_error, install_signal_handlers

    install_signal_handlers()  # early: a SIGTERM/SIGUSR1 during start-up then stops after the first step
    import torch

    from flame.config.validate import validate
    from flame.distributed.setup import world_size_from_env

    try:
        validate(config, world_size_from_env(), "cuda" if torch.cuda.is_available() else "cpu")
        from flame.trainer import Trainer

        trainer = Trainer(config)
    except ConfigError as e:
        return fail(("invalid config:\n" if len(e.problems) > 1 else "") + e.format())
    except RuntimeError as e:  # e.g. the process group timed out waiting for another rank
        message = explain_runtime_error(e, config)
        if message is None:
            raise
        return fail(message, 1)
    try:
        trainer.train()
    except RuntimeError as e:  # divergence, a failed save, a collective timeout (see fault.py)
        message = explain_runtime_error(e, config)
        if message is None:
            raise
        return fail(message, 1)
    finally:
        trainer.close()
    return 0
