"""A stage kind for tests: the train kind's spec, resolution and validation, with a fake trainer as command.

Loaded through ``FLAME_STAGE_KINDS=tests.experiments.fake_kind`` (the driver imports it, in-process or
in a subprocess). The fake trainer (``fake_trainer.py``) writes a run folder like flame's: metrics.jsonl,
checkpoints with ``.metadata``, summary.json, preempted.json + exit 75 on SIGTERM, exit 1 on divergence,
and a loss that is a pure function of the config, so the experiment's rules are tested in seconds.
"""

from __future__ import annotations

import os
import sys

from flame.experiments.kinds import StageKind, register_stage_kind

HERE = os.path.dirname(os.path.abspath(__file__))


class FakeTrainKind(StageKind):
    name = "fake"

    def validate(self, trial, device_type, where):
        """The train kind's checks, but a fork's source is the fake trainer's (no DCP metadata to read)."""
        import dataclasses

        if trial.config is not None and trial.config.checkpoint.fork_from:
            ck = dataclasses.replace(trial.config.checkpoint, fork_from="")
            trial = dataclasses.replace(trial, config=dataclasses.replace(trial.config, checkpoint=ck))
        super().validate(trial, device_type, where)

    def command(self, trial):
        return [sys.executable, os.path.join(HERE, "fake_trainer.py"), os.path.join(trial.folder, "config.toml")]


register_stage_kind(FakeTrainKind())
