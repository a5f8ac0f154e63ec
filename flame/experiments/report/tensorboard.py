"""One TensorBoard view of an experiment: ``<root>/tensorboard/<stage>/<trial>/`` holds a link to every
event file of the trial's TensorBoard folder (a copy where the file system has no symbolic links), so
``tensorboard --logdir <root>/tensorboard`` shows every variant of every stage on shared plots, each run
named ``<stage>/<trial>``.

The hyper-parameters go to TensorBoard's HParams view: each trial's view folder gets one more event file
(written here, never in the trial's own folder) with its session start (the trial's searched values and
contender) and end (its status). No experiment summary is written, so TensorBoard infers the table from
the sessions: every hyper-parameter that appears, every scalar the trials logged as a metric column.
``sync`` is idempotent; the report and the live status call it again as trials add event files.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any

TENSORBOARD = "tensorboard"
HPARAMS_SUFFIX = ".flame-hparams"


def _tb_folder(trial_folder: str) -> str:
    """The trial's TensorBoard folder: ``metrics.save_tb_folder`` of its config.toml (default tb)."""
    import tomllib

    try:
        with open(os.path.join(trial_folder, "config.toml"), "rb") as f:
            sub = tomllib.load(f).get("metrics", {}).get("save_tb_folder", "tb")
    except (OSError, ValueError):
        sub = "tb"
    return os.path.join(trial_folder, sub)


def _link(source: str, target: str) -> str:
    """Link ``target`` to ``source`` (or copy it where links fail); "linked", "copied" or "kept"."""
    if os.path.islink(target):
        if os.readlink(target) == source:
            return "kept"
        os.remove(target)
    elif os.path.exists(target):  # an earlier copy: refresh it when the source grew
        if os.path.getsize(target) == os.path.getsize(source):
            return "kept"
        os.remove(target)
    try:
        os.symlink(source, target)
        return "linked"
    except OSError:
        shutil.copy2(source, target)
        return "copied"


def _hparam_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_hparams(folder: str, hparams: dict[str, Any], status: str) -> None:
    """The trial's HParams session as an event file: its start (the values) and, once it ended, its end
    (success for done, masked, stopped and pruned trials, failure for failed ones)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_summary
    from torch.utils.tensorboard.writer import FileWriter

    for old in glob.glob(os.path.join(folder, f"*{HPARAMS_SUFFIX}")):
        os.remove(old)
    _, start, _ = hparams_summary({k: _hparam_value(v) for k, v in hparams.items()}, {})
    writer = FileWriter(folder, filename_suffix=HPARAMS_SUFFIX)
    writer.add_summary(start)
    # TensorBoard's statuses are unknown, success, failure and running: a trial a scheduler stopped at its
    # rung (or a pruner stopped) ran what it was given without error, so it is a success there.
    ended = {"done": "STATUS_SUCCESS", "masked": "STATUS_SUCCESS", "failed": "STATUS_FAILURE"}
    ended |= {"pruned": "STATUS_SUCCESS", "stopped": "STATUS_SUCCESS"}
    if status in ended:  # a session without an end is shown as running
        info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(ended[status]))
        content = plugin_data_pb2.HParamsPluginData(session_end_info=info, version=metadata.PLUGIN_DATA_VERSION)
        tag = metadata.SESSION_END_INFO_TAG
        writer.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))]))
    writer.close()
    # A fixed name that sorts before the trainer's files: TensorBoard's directory loader reads a run's
    # files in name order and follows only the last one for new events, which must be the trainer's.
    (written,) = glob.glob(os.path.join(folder, f"*{HPARAMS_SUFFIX}"))
    os.replace(written, os.path.join(folder, f"events.out.tfevents.0000000000{HPARAMS_SUFFIX}"))


def sync(root: str, status: dict[str, Any], hparams: bool = True) -> dict[str, int]:
    """Build or refresh ``<root>/tensorboard``; counts of event files linked, copied and kept, and of
    trials shown."""
    counts = {"linked": 0, "copied": 0, "kept": 0, "trials": 0}
    view = os.path.join(root, TENSORBOARD)
    for stage in status["stages"]:
        for trial in stage["trials"]:
            source_root = _tb_folder(trial["dump_folder"])
            files = [
                p for p in glob.glob(os.path.join(source_root, "**", "*tfevents*"), recursive=True) if os.path.isfile(p)
            ]
            if not files:
                continue
            counts["trials"] += 1
            folder = os.path.join(view, stage["name"], trial["id"])
            for path in files:
                target = os.path.join(folder, os.path.relpath(path, source_root))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                counts[_link(os.path.abspath(path), target)] += 1
            if hparams:
                values = dict(trial.get("params") or {})
                if trial.get("contender"):
                    values["contender"] = trial["contender"]
                values["stage"] = stage["name"]
                write_hparams(folder, values, trial["status"])
    return counts
