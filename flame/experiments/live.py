"""Live status of an experiment: one refreshing terminal table while ``run`` drives it, and
``status --watch`` for an experiment driven elsewhere (another shell, a Slurm controller).

On a terminal (rich): per stage its trials done / running / failed / stopped by a scheduler / pending and
the best so far; per running trial step/steps, the last loss, tokens/s, its ETA; under it the driver's
line (counts and the experiment's ETA). Event lines (a trial started, ended) print above the table.
Not on a terminal (CI, Slurm logs, a pipe): plain lines, one per event, never an escape sequence.

Everything shown is read the way ``status`` reads it (records.jsonl, the run folders), so the driver and
a watcher show the same; a trial's last record is the tail of its metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from typing import Any

from flame.experiments.records import Records
from flame.experiments.status import Console

STATUS_EVERY = 5.0  # seconds between full status reads while nothing happens
RENDER_EVERY = 0.5  # seconds between table refreshes
TENSORBOARD_EVERY = 30.0  # seconds between refreshes of <root>/tensorboard while running


def last_record(folder: str) -> dict[str, Any]:
    """The last complete line of ``folder``/metrics.jsonl (read from its end: files grow long)."""
    try:
        with open(os.path.join(folder, "metrics.jsonl"), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 16384, 0))
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def _launch_time(records: Records, stage: str, trial: str) -> float | None:
    launch = records.last("launch", stage, trial)
    return launch["time"] if launch else None


def running_rows(status: dict[str, Any], records: Records, now: float | None = None) -> list[dict[str, Any]]:
    """Per running trial: stage, id, step, steps, loss, tokens/s (all its processes), ETA seconds."""
    now = time.time() if now is None else now
    rows = []
    for stage in status["stages"]:
        for t in stage["trials"]:
            if t["status"] != "running":
                continue
            rec = last_record(t["dump_folder"])
            step = int(rec.get("step", t.get("step") or 0) or 0)
            steps = int(t.get("steps") or 0)
            info = _trial_info(t["dump_folder"])
            tps = rec.get("tokens_per_second")
            tps = tps * info.get("ngpu", 1) * info.get("nnode", 1) if isinstance(tps, (int, float)) else None
            eta = rec.get("eta_seconds")
            started = _launch_time(records, stage["name"], t["id"])
            if not isinstance(eta, (int, float)) and started is not None and step > 0 and steps:
                eta = (now - started) / step * (steps - step)  # this attempt's pace
            rows.append(
                {
                    "stage": stage["name"],
                    "id": t["id"],
                    "step": step,
                    "steps": steps,
                    "loss": rec.get("loss"),
                    "tokens_per_second": tps,
                    "eta_seconds": eta,
                    "elapsed_seconds": now - started if started is not None else None,
                }
            )
    return rows


_INFO: dict[str, dict[str, Any]] = {}


def _trial_info(folder: str) -> dict[str, Any]:
    if folder not in _INFO:
        try:
            with open(os.path.join(folder, "trial.json")) as f:
                _INFO[folder] = json.load(f)
        except (OSError, ValueError):
            return {}
    return _INFO[folder]


def stage_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: counts by status (done includes masked) and the best finished trial so far."""
    out = []
    for stage in status["stages"]:
        counts = {"done": 0, "running": 0, "failed": 0, "pruned": 0, "pending": 0}
        for t in stage["trials"]:
            s = {"masked": "done", "stopped": "pruned", "planned": "pending", "preempted": "pending"}.get(
                t["status"], t["status"]
            )
            counts[s] = counts.get(s, 0) + 1
        finished = [
            t
            for t in stage["trials"]
            if t["status"] in ("done", "masked")
            and isinstance(t["metric"], (int, float))
            and math.isfinite(t["metric"])
        ]
        sign = 1 if stage.get("mode", "min") == "min" else -1
        best = min(finished, key=lambda t: (sign * t["metric"], t["id"])) if finished else None
        out.append(
            {
                "name": stage["name"],
                "trials": len(stage["trials"]),
                **counts,
                "waiting_for": stage.get("waiting_for") or [],
                "best": best["id"] if best else None,
                "best_metric": best["metric"] if best else None,
                "metric": stage.get("metric"),
            }
        )
    return out


def _num(v: Any, spec: str = ".4g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    from flame.components.metrics import format_duration

    return format_duration(seconds)


def render(status: dict[str, Any], records: Records, line: str | None = None, now: float | None = None):
    """The live view as one rich renderable: the stages table, the running trials table, the line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    stages = Table(title=f"experiment {status['experiment']}", title_justify="left", expand=False)
    for col in ("stage", "trials", "done", "running", "failed", "pruned", "pending", "best so far"):
        stages.add_column(col, justify="right" if col not in ("stage", "best so far") else "left")
    for s in stage_rows(status):
        if s["waiting_for"]:
            best = f"waits for {', '.join(s['waiting_for'])}"
        else:
            best = f"{s['best']}  {s['metric']} {_num(s['best_metric'])}" if s["best"] else "-"
        cells = [str(s[k]) for k in ("trials", "done", "running", "failed", "pruned", "pending")]
        stages.add_row(s["name"], *cells, best)
    parts: list[Any] = [stages]
    rows = running_rows(status, records, now)
    if rows:
        running = Table(title="running", title_justify="left")
        for col in ("trial", "step", "loss", "tokens/s", "ETA", "elapsed"):
            running.add_column(col, justify="left" if col == "trial" else "right")
        for r in rows:
            running.add_row(
                f"{r['stage']}/{r['id']}",
                f"{r['step']}/{r['steps']}" if r["steps"] else str(r["step"]),
                _num(r["loss"]),
                _num(r["tokens_per_second"], ",.0f"),
                _duration(r["eta_seconds"]),
                _duration(r["elapsed_seconds"]),
            )
        parts.append(running)
    if line:
        parts.append(Text(line))
    return Group(*parts)


def plain_counts(status: dict[str, Any]) -> str:
    """The stages in one line (the plain output's status line)."""
    out = []
    for s in stage_rows(status):
        if s["waiting_for"]:
            out.append(f"{s['name']}: waits")
            continue
        text = f"{s['name']}: {s['done']}/{s['trials']} done, {s['running']} running, {s['failed']} failed"
        text += f", {s['pruned']} pruned" if s["pruned"] else ""
        text += f"; best {s['best']} {_num(s['best_metric'])}" if s["best"] else ""
        out.append(text)
    return " | ".join(out)


class _Poller:
    """Reads the status in a background thread (every STATUS_EVERY seconds, and soon after ``poke``), so
    the driver's loop never waits for it; refreshes the TensorBoard view every TENSORBOARD_EVERY seconds."""

    def __init__(self, root: str, status_fn, tensorboard: bool) -> None:
        self.root, self.status_fn, self.tensorboard = root, status_fn, tensorboard
        self.status: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tb = 0.0
        self.thread = threading.Thread(target=self._loop, name="flame-live-status", daemon=True)
        self.thread.start()

    def poke(self) -> None:
        self._wake.set()

    def read(self) -> None:
        try:
            self.status = self.status_fn()
        except Exception as e:  # a view must never stop the experiment it shows
            print(f"flame: live status: {type(e).__name__}: {e}", file=sys.stderr)
            return
        if self.tensorboard and time.monotonic() - self._tb > TENSORBOARD_EVERY:
            self._tb = time.monotonic()
            from flame.experiments.report.tensorboard import sync

            try:
                sync(self.root, self.status, hparams=False)
            except OSError as e:
                print(f"flame: tensorboard view: {e}", file=sys.stderr)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.read()
            self._wake.wait(STATUS_EVERY)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join()


class LiveConsole(Console):
    """The driver's console (``run``): on a terminal the refreshing table, else ``Console``'s plain lines
    (each event, then the driver's counts line). ``status_fn()`` returns the status object."""

    def __init__(self, root: str, status_fn, stream=None, tensorboard: bool = True) -> None:
        super().__init__(stream=stream)
        self.root = root
        self.poller = _Poller(root, status_fn, tensorboard)
        self._drawn = 0.0
        self.live = None
        if self.tty:
            from rich.console import Console as RichConsole
            from rich.live import Live

            console = RichConsole(file=self.stream, force_terminal=True)
            self.live = Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
            self.live.start()

    def __call__(self, message: str | None = None, event: bool = False) -> None:
        if event:
            self.poller.poke()
        if self.live is None:
            super().__call__(message, event)
            return
        if message is not None:
            self.live.console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False, highlight=False)
        now = time.monotonic()
        status = self.poller.status
        if status is not None and (message is not None or now - self._drawn >= RENDER_EVERY):
            self._drawn = now
            line = self.line() if self.line is not None else None
            self.live.update(render(status, Records(self.root), line), refresh=True)

    def close(self) -> None:
        self.poller.stop()
        if self.live is not None:
            self.poller.read()  # the final state
            if self.poller.status is not None:
                self.live.update(render(self.poller.status, Records(self.root)), refresh=True)
            self.live.stop()
            self.live = None
            return
        super().close()


def ended(records: Records) -> bool:
    """The experiment's driver (or last controller) wrote its end after its last start."""
    starts = [e["time"] for e in records.events if e["event"] == "start"]
    ends = [e["time"] for e in records.events if e["event"] == "experiment"]
    return bool(ends) and (not starts or max(ends) >= max(starts))


def _event_line(e: dict[str, Any]) -> str | None:
    when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
    if e["event"] == "launch":
        return f"{when} {e['stage']}/{e['trial']}: started" + (
            f" (attempt {e['attempt']})" if e.get("attempt", 1) > 1 else ""
        )
    if e["event"] == "end":
        return f"{when} {e['stage']}/{e['trial']}: {e['status']} (exit {e.get('code')}, metric {_num(e.get('metric'))})"
    if e["event"] == "stage":
        return f"{when} stage {e['stage']} complete: survivors {', '.join(e['survivors']) or 'none'}"
    if e["event"] == "experiment":
        return f"{when} experiment {e['status']}" + (f": {e['message']}" if e.get("message") else "")
    return None


def watch(status_fn, root: str, stream=None, interval: float = 2.0, until_end: bool = True) -> int:
    """``status --watch``: show the experiment until it ends (or Ctrl-C), or until nothing drives it any
    more (its driver killed, its Slurm controller cancelled: exit code 1 and how to resume). On a
    terminal the live table; otherwise the table once, then one line per new event, then the table again."""
    from flame.experiments.status import table

    stream = stream or sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    seen = len(Records(root).events)
    lost = None  # what stopped driving the experiment, when it stopped without its end
    if not tty:
        stream.write(table(status_fn()) + "\n")
        stream.flush()
    live = None
    if tty:
        from rich.console import Console as RichConsole
        from rich.live import Live

        live = Live(console=RichConsole(file=stream, force_terminal=True), auto_refresh=False)
        live.start()
    try:
        while True:
            records = Records(root)
            status = status_fn()
            if live is not None:
                live.update(render(status, records, f"watching {root} (Ctrl-C stops watching)"), refresh=True)
            else:
                for e in records.events[seen:]:
                    text = _event_line(e)
                    if text:
                        stream.write(text + "\n")
                        if e["event"] in ("end", "stage"):
                            stream.write(f"{time.strftime('%H:%M:%S')} {plain_counts(status)}\n")
                stream.flush()
            seen = len(records.events)
            if until_end and ended(records):
                break
            if until_end and status.get("driver", {}).get("state") == "lost":
                lost = status["driver"]["hint"]
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    if not tty:
        stream.write(table(status_fn()) + "\n")
    elif lost:
        stream.write(f"not running: {lost}\n")
    stream.flush()
    return 1 if lost else 0
