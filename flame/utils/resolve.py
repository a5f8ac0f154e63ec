"""``python -m flame.utils.resolve <train flags>``: the resolved facts a launcher needs, as shell lines.

train.sh reads the dump folder, step count and conversion inputs from the fully resolved config
(defaults, TOML and flags together) rather than by grepping its own arguments. Bad flags fail here,
before any process is launched, with the trainer's own message and exit code 2.
"""

from __future__ import annotations

import shlex
import sys

from flame.components.fork import paused
from flame.config.errors import ConfigError
from flame.config.loader import parse_args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        return 0  # train.sh then runs flame.train -h
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"flame: error: {e.format()}", file=sys.stderr)
        return 2
    values = {
        "FLAME_DUMP_FOLDER": config.job.dump_folder,
        "FLAME_STEPS": config.training.steps,
        "FLAME_CHECKPOINT": int(config.checkpoint.enable_checkpoint),
        "FLAME_CHECKPOINT_FOLDER": config.checkpoint.folder,
        "FLAME_MODEL_CONFIG": config.model.config,
        "FLAME_TOKENIZER": config.model.tokenizer_path,
        "FLAME_CUSTOM_MODEL_PATH": config.experimental.custom_model_path,
        "FLAME_SEED_CHECKPOINT": int(config.checkpoint.create_seed_checkpoint),
        "FLAME_DRY_RUN": int(config.job.dry_run),
        # a trunk stopped before the end of its schedule (lr_scheduler.schedule_steps) is not a finished model
        "FLAME_PAUSED": int(paused(config)),
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
