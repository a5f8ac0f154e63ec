"""The Slurm launcher: one job array per stage (or search round), and a controller job that carries on.

``run --launcher slurm`` checks everything, copies the spec to ``<root>/spec.toml`` and makes one
controller step here: it walks the experiment (``driver.walk`` in ``collect`` mode), submits the
trials that must run as an array (``--array=0-N%max_parallel``, in chunks of the cluster's MaxArraySize,
each chunk after the one before so that at most max_parallel run), and submits the next controller
with ``--dependency=afterany:<arrays>``. That controller job does the same once the arrays have ended:
it records what finished, expands the next stage (links, reduce, the next Optuna round), submits it, and
so on until the experiment is complete; the user can log out after submitting. The controller jobs are
the only writers of the records (one at a time, under the driver lock); array tasks write only their
trial folders.

Each array task (``python -m flame.experiments.slurm task <tasks file> <index>``) runs its trial:
training through ``scripts/slurm/train.sbatch`` (its preemption -> checkpoint -> requeue behaviour), other
kinds directly, and leaves ``exit.json`` in the trial folder (75 when the trial was stopped after saving).
A task cancelled or preempted for good is seen as unfinished by the next controller and submitted again:
it resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from functools import cache
from typing import Any

from flame.config.errors import ConfigError
from flame.experiments.hooks import WorkItem
from flame.experiments.kinds import ROOT, stage_kind
from flame.experiments.records import DriverLock, Records, job_active
from flame.experiments.spec import Experiment, Stage

SBATCH_TRAIN = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")


@cache
def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must be below it), from ``scontrol show config``; Slurm's
    default, 1001, where there is no ``scontrol`` (a dry run on a machine outside the cluster)."""
    if not _have("scontrol"):
        return 1001
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else 1001


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _options(exp: Experiment, stage: Stage) -> list[str]:
    s = exp.slurm
    opts = [f"--nodes={stage.nnode}", "--ntasks-per-node=1", f"--cpus-per-task={s.cpus_per_task}"]
    opts += [f"--gpus-per-node={s.gpus_per_node}"] if s.gpus_per_node else []
    opts += [f"--partition={s.partition}"] if s.partition else []
    opts += [f"--account={s.account}"] if s.account else []
    opts += [f"--time={s.time}"] if s.time else []
    opts += [f"--mem={s.mem}"] if s.mem else []
    return opts + list(s.options)


def describe_stage(exp: Experiment, stage: Stage, n: int) -> str:
    """The dry run's words for a stage's launch on Slurm."""
    if n == 0:
        return "nothing to submit"
    size = max_array_size()
    arrays = [f"--array=0-{len(c) - 1}%{exp.max_parallel}" for c in chunks(n, size)]
    return (
        f"sbatch {' '.join(_options(exp, stage))} {' + '.join(arrays)} (each task: its trial's "
        f"{'train.sbatch' if stage.kind != 'python' and stage_kind(stage.kind).trains else 'command'}); then a "
        "controller job with --dependency=afterany:<arrays> expands the next stage"
    )


def _have(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def sbatch(args: list[str], cwd: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def task_line(item: WorkItem) -> str:
    """One line of a tasks file: what an array task needs to run ``item`` (``run_task`` reads it)."""
    trial = item.trial
    fields = {"stage": trial.stage, "key": item.key, "folder": item.folder, "kind": trial.kind, "ngpu": trial.ngpu}
    return json.dumps({**fields, "command": stage_kind(trial.kind).command(trial)}) + "\n"


def array_args(exp: Experiment, stage: Stage, folder: str, indices: str) -> list[str]:
    """sbatch's flags for an array of ``stage`` over ``indices`` (``0-N%max_parallel``): requeued on
    preemption, SIGUSR1 180 s before the time limit (the trial saves), logs under ``folder``/logs."""
    return [
        *_options(exp, stage),
        f"--array={indices}",
        f"--job-name=flame-{exp.name}-{stage.name}",
        "--requeue",
        "--signal=USR1@180",
        "--open-mode=append",
        f"--output={folder}/logs/%A_%a.out",
        f"--chdir={os.getcwd()}",
    ]


def submit_stage(exp: Experiment, stage: Stage, items: list[WorkItem], records: Records) -> list[str]:
    """Submit ``items`` as array job(s) of their stage; the job ids."""
    from flame.experiments.local import write_trial_files

    folder = os.path.join(exp.root, "slurm")
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    n = sum(1 for e in records.events if e["event"] == "submit")
    jobs: list[str] = []
    for c, part in enumerate(chunks(len(items), max_array_size())):
        tasks = os.path.join(folder, f"{stage.name}-{n}-{c}.tasks")
        with open(tasks, "w") as f:
            for i in part:
                item = items[i]
                write_trial_files(item)
                f.write(task_line(item))
        args = array_args(exp, stage, folder, f"0-{len(part) - 1}%{exp.max_parallel}")
        if jobs:  # chunks one after the other: max_parallel at a time in all
            args.append(f"--dependency=afterany:{jobs[-1]}")
        job = sbatch(
            [*args, "--wrap", f"{shlex.quote(sys.executable)} -m flame.experiments.slurm task {shlex.quote(tasks)}"],
            os.getcwd(),
        )
        jobs.append(job)
        for k, i in enumerate(part):
            records.append("launch", stage=stage.name, trial=items[i].key, job=f"{job}_{k}")
    records.append("submit", stage=stage.name, jobs=jobs, trials=[i.key for i in items])
    return jobs


def submit_controller(exp: Experiment, after: list[str]) -> str:
    folder = os.path.join(exp.root, "slurm")
    spec = os.path.join(exp.root, "spec.toml")
    args = [
        f"--dependency=afterany:{':'.join(after)}",
        "--kill-on-invalid-dep=yes",
        f"--job-name=flame-{exp.name}-controller",
        "--nodes=1",
        "--cpus-per-task=1",
        f"--time={exp.slurm.controller_time}",
        f"--output={folder}/controller-%j.out",
        f"--chdir={os.getcwd()}",
    ]
    args += [f"--partition={exp.slurm.partition}"] if exp.slurm.partition else []
    args += [f"--account={exp.slurm.account}"] if exp.slurm.account else []
    command = f"{shlex.quote(sys.executable)} -m flame.experiments.slurm controller {shlex.quote(spec)}"
    return sbatch([*args, "--wrap", command], os.getcwd())


def step(exp: Experiment, retry_failed: bool = False, echo: Any = print) -> dict[str, Any]:
    """One controller step (under the driver lock): record what finished, submit what must run next and
    the controller after it; at the end, the summary table and the reports. The status object."""
    from flame.experiments.driver import _check_failures, walk
    from flame.experiments.hooks import call_reports
    from flame.experiments.schedule import StageContext
    from flame.experiments.status import build, table

    with DriverLock(exp.root):
        records = Records(exp.root, writable=True)
        states = walk(exp, records, "collect", retry_failed=retry_failed)
        pending = next((s for s in states if s.view is None), None)
        if pending is not None and pending.scheduler is not None:
            metric, mode = exp.metric_of(pending.stage)
            ctx = StageContext(exp, pending.stage, pending.scheduler.ctx.expansion, records, metric, mode, True)
            try:
                _check_failures(ctx, pending, _NoLauncher())
            except Exception as e:
                records.append("experiment", status="stopped", message=str(e))
                raise
        result = build(exp, states, records)
        if pending is None:
            if not any(e["event"] == "experiment" and e.get("status") == "done" for e in records.events):
                records.append("experiment", status="done", best={s["name"]: s["best"] for s in result["stages"]})
            echo(table(result))
            call_reports(exp, result)
            return result
        if getattr(pending.scheduler, "workers", False):  # ASHA: array tasks are workers claiming pieces
            return _submit_workers(exp, pending, records, result, echo)
        # A task still queued or running (requeued after a preemption) is waited for, not submitted twice.
        still = [i for i in pending.to_launch if records.running(pending.stage.name, i.key)]
        items = [i for i in pending.to_launch if i not in still]
        waiting = [str(records.last("launch", pending.stage.name, i.key)["job"]) for i in still]  # type: ignore[index]
        if not items and not waiting:
            raise ConfigError(
                f"stage {pending.stage.name!r} waits for {pending.waiting or 'nothing'} and has nothing to submit"
            )
        arrays: dict[str, list[WorkItem]] = {}  # a trial scheduler's pieces: one array per (bracket, rung)
        for i in items:
            arrays.setdefault(getattr(i, "array", ""), []).append(i)
        jobs = [j for part in arrays.values() for j in submit_stage(exp, pending.stage, part, records)]
        controller = submit_controller(exp, jobs + waiting)
        records.append("controller", job=controller, after=jobs + waiting)
        echo(
            f"stage {pending.stage.name}: {len(items)} trials in array job(s) {', '.join(jobs)}; controller job {controller} runs after them"
        )
        return result


def _submit_workers(exp: Experiment, pending: Any, records: Records, result: dict[str, Any], echo: Any) -> dict:
    """ASHA's stage on Slurm: an array of max_parallel workers (flame.experiments.schedulers.worker), unless
    the last one still runs; then the controller after it."""
    stage = pending.stage
    last = next((e for e in reversed(records.events) if e["event"] == "workers" and e["stage"] == stage.name), None)
    if last is not None and job_active(str(last["job"])):
        jobs = [str(last["job"])]
    else:
        folder = os.path.join(exp.root, "slurm")
        os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
        spec = os.path.join(exp.root, "spec.toml")
        args = array_args(exp, stage, folder, f"0-{exp.max_parallel - 1}")
        command = f"{shlex.quote(sys.executable)} -m flame.experiments.schedulers.worker {shlex.quote(spec)} {shlex.quote(stage.name)}"
        jobs = [sbatch([*args, "--wrap", command], os.getcwd())]
        records.append("workers", stage=stage.name, job=jobs[0], count=exp.max_parallel)
    controller = submit_controller(exp, jobs)
    records.append("controller", job=controller, after=jobs)
    echo(
        f"stage {stage.name}: {exp.max_parallel} ASHA workers in array job {jobs[0]}; controller job {controller} runs after them"
    )
    return result


class _NoLauncher:
    def stop_all(self) -> None:  # a controller has nothing running itself; arrays finish on their own
        pass


def submit(exp: Experiment, retry_failed: bool = False, echo: Any = print) -> dict[str, Any]:
    """``run --launcher slurm``: the spec saved in the experiment folder and the first controller step."""
    import tomli_w

    records = Records(exp.root)
    active = [e["job"] for e in records.events if e["event"] == "controller" and job_active(str(e["job"]))]
    if active:
        raise ConfigError(
            f"{exp.root}: this experiment is running on Slurm (controller job {active[-1]}); "
            "watch it with `python -m flame.experiment status`"
        )
    raw = json.loads(json.dumps(exp.raw))
    raw["experiment"]["root"], raw["experiment"]["launcher"] = exp.root, "slurm"
    os.makedirs(exp.root, exist_ok=True)
    with open(os.path.join(exp.root, "spec.toml"), "wb") as f:
        tomli_w.dump(raw, f)
    return step(exp, retry_failed, echo)


def run_task(tasks: str, index: int) -> int:
    """An array task: run trial ``index`` of ``tasks`` and leave its exit code in ``exit.json``."""
    with open(tasks) as f:
        task = json.loads(f.readlines()[index])
    folder = task["folder"]
    exit_file = os.path.join(folder, "exit.json")
    if os.path.exists(exit_file):
        os.remove(exit_file)
    # Slurm signals the batch shell too on scancel/preemption: outlive the trial to report its end.
    signal.signal(signal.SIGTERM, lambda *_: None)
    env = dict(os.environ, NGPU=str(task["ngpu"]), FLAME_ROOT=ROOT, PYTHON=sys.executable)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if stage_kind(task["kind"]).trains and task["command"][:2] == ["bash", os.path.join(ROOT, "train.sh")]:
        command = ["bash", SBATCH_TRAIN, *task["command"][2:]]  # preemption -> checkpoint -> requeue
    else:
        command = task["command"]
    start = time.time()
    with open(os.path.join(folder, "train.log"), "ab") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    preempted = os.path.exists(os.path.join(folder, "preempted.json"))
    if preempted or code in (75, 143, -15):
        code = 75  # stopped after saving (train.sbatch requeued the task, or it was cancelled): resumable
    with open(exit_file + ".tmp", "w") as f:
        json.dump({"code": code, "start": start, "end": time.time(), "job": os.environ.get("SLURM_JOB_ID")}, f)
    os.replace(exit_file + ".tmp", exit_file)
    return 0 if code == 75 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "task":
        return run_task(argv[1], int(os.environ["SLURM_ARRAY_TASK_ID"]) if len(argv) < 3 else int(argv[2]))
    if argv[0] == "controller":
        from flame.experiments.plan import ExperimentError
        from flame.experiments.spec import resolve

        try:
            step(resolve(argv[1], "slurm"))
        except ConfigError as e:
            print(f"flame: error: {e.format()}", file=sys.stderr)
            return 2
        except ExperimentError as e:
            print(f"flame: experiment stopped: {e}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m flame.experiments.slurm task TASKS [INDEX] | controller SPEC", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
