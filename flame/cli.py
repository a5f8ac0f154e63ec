"""The training command behind ``python -m flame.train``: parse the config, validate it, train, exit with a clear code.

Exit codes: 0 done, 2 bad input (one message naming the flag or file, no traceback, nothing
written), 1 a failure during training (one message where flame knows the cause: divergence, a failed
checkpoint save, a collective timeout). A run stopped by SIGTERM/SIGUSR1 after saving its checkpoint
also exits 0 (so torchrun does not restart it) and leaves ``<dump_folder>/preempted.json``; train.sh
turns that into exit code 75.

The config's values are checked before anything heavy is imported (``check_static``: numbers, flags
that need another flag, missing files, degrees against the world size), so such a mistake fails in a
fraction of a second; the checks that need torch or the model follow in ``Trainer``. A dry run
(``--job.dry_run``) skips this pass: it runs every check and reports every problem at once.
"""

from __future__ import annotations

from flame.config.errors import ConfigError
from flame.config.loader import parse_args, to_dict
from flame.config.validate import check_static
from flame.distributed.parallel_dims import world_size_from_env
from flame.utils.console import fail, setup_logging


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as e:
        return fail(e.format("bad arguments"))
    if config.job.print_args:
        import tomli_w

        print(tomli_w.dumps(to_dict(config)))
    setup_logging()
    if config.job.dry_run:  # a dry run exists to check a config: it reports every problem at once
        from flame.dry_run import main as dry_run_main

        return dry_run_main(argv)
    try:
        check_static(config, world_size_from_env())
    except ConfigError as e:
        return fail(e.format("invalid config"))
    from flame.components.fault import explain_runtime_error, install_signal_handlers

    install_signal_handlers()  # early: a SIGTERM/SIGUSR1 during start-up then stops after the first step
    trainer = None
    try:
        from flame.trainer import Trainer

        trainer = Trainer(config)  # validates the config first, before any process group or work
        trainer.train()
    except ConfigError as e:
        return fail(e.format("invalid config"))
    except RuntimeError as e:  # divergence, a failed save, a collective timeout (see fault.py), a lost rank
        message = explain_runtime_error(e, config)
        if message is None:
            raise
        return fail(message, 1)
    finally:
        if trainer is not None:
            trainer.close()
    return 0
