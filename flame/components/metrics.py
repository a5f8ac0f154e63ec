"""Where training metrics go: the console, ``metrics.jsonl``, TensorBoard and Weights & Biases.

``metrics.jsonl`` in the dump folder is the machine-readable record (one JSON object per logged
step) that sweeps and plots read. On resume, records past the resumed step are dropped first, so
the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from typing import Any

logger = logging.getLogger("flame")

_COLORS = {
    "step": "\033[36m",
    "loss": "\033[32m",
    "grad_norm": "\033[33m",
    "lr": "\033[35m",
    "speed": "\033[34m",
    "validation": "\033[1;32m",
    "reset": "\033[0m",
}


def device_name(device) -> str:
    """The accelerator's marketing name (for the peak-FLOPs table), or "cpu"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def memory_stats(device) -> dict[str, float]:
    """Memory in GiB: CUDA peak reserved and active since the last call, or the process RSS on CPU."""
    import torch

    if device.type == "cuda":
        stats = {
            "memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "memory_active_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"memory_rss_gib": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30}


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def console_color(disabled: bool, environ=os.environ, stdout=None) -> bool:
    """Whether the console lines get ANSI colours: only on a terminal, so log files stay plain text.

    Never with ``--metrics.disable_color_printing`` or a non-empty ``NO_COLOR`` (no-color.org). Else
    ``FLAME_COLOR`` decides (``1``/``0``): train.sh sets it from its own stdout, because a worker's stdout
    is torchrun's pipe even when the user watches a terminal. Without it (``python -m flame.train``,
    a notebook): whether this process's stdout is a terminal.
    """
    if disabled or environ.get("NO_COLOR"):
        return False
    if environ.get("FLAME_COLOR") in ("0", "1"):
        return environ["FLAME_COLOR"] == "1"
    return (stdout or sys.stdout).isatty()


class MetricsLogger:
    """Writes one record per logged step to every enabled sink (on the ranks that should)."""

    def __init__(self, config, *, rank: int, resume_step: int, run_config: dict[str, Any]) -> None:
        m = config.metrics
        self.rank = rank
        self.color = console_color(m.disable_color_printing)
        self.total_steps = config.training.steps
        self.path = os.path.join(config.job.dump_folder, "metrics.jsonl")
        self.tb = None
        self.wandb_run = None
        if rank == 0:
            self._truncate_after(resume_step)
        if m.enable_tensorboard and (rank == 0 or not m.rank_0_only):
            from torch.utils.tensorboard import SummaryWriter

            folder = os.path.join(config.job.dump_folder, m.save_tb_folder)
            if not m.rank_0_only:
                folder = os.path.join(folder, f"rank_{rank}")
            self.tb = SummaryWriter(folder, purge_step=resume_step + 1 if resume_step else None)
        if m.enable_wandb and rank == 0:
            self.wandb_run = _start_wandb(config, run_config)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Send one step's metrics (``step`` plus numbers) to every sink."""
        step = int(record["step"])
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._print(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def _print(self, r: dict[str, Any]) -> None:
        def paint(key: str, text: str) -> str:
            return f"{_COLORS[key]}{text}{_COLORS['reset']}" if self.color else text

        width = len(str(self.total_steps))
        parts = [
            paint("step", f"step {r['step']:>{width}}/{self.total_steps}"),
            paint("loss", f"loss {r['loss']:.4f} (max {r['loss_max']:.4f})"),
            *([f"ce {r['ce_loss']:.4f} kd {r['kd_loss']:.4f} alpha {r['alpha']:.2f}"] if "kd_loss" in r else []),
            paint("grad_norm", f"grad_norm {r['grad_norm']:.3f}"),
            paint("lr", f"lr {r['lr']:.2e}"),
            paint("speed", f"tok/s/device {r['tokens_per_second']:,.0f}"),
            f"TFLOP/s {r['tflops']:.2f}",
            f"MFU {r['mfu']:.1f}%" if r.get("mfu") is not None else "MFU unknown",
        ]
        if "memory_rss_gib" in r:
            parts.append(f"rss {r['memory_rss_gib']:.2f}GiB")
        else:
            parts.append(f"mem {r['memory_active_gib']:.2f}/{r['memory_reserved_gib']:.2f}GiB")
        parts.append(f"data {100 * r['data_wait_share']:.1f}%")
        if r.get("skipped_steps"):
            parts.append(f"skipped {r['skipped_steps']}")
        parts.append(f"elapsed {format_duration(r['elapsed_seconds'])} eta {format_duration(r['eta_seconds'])}")
        logger.info("  ".join(parts))
        if "validation_loss" in r:
            text = f"validation loss {r['validation_loss']:.4f}  perplexity {r['validation_perplexity']:.2f}"
            if "validation_kl_to_teacher" in r:  # distillation (flame/distill/mode.py)
                text += (
                    f"  KL to teacher {r['validation_kl_to_teacher']:.4f}  top-1 agreement "
                    f"{100 * r['validation_teacher_agreement']:.1f}%"
                )
            if "validation_teacher_loss" in r:
                text += f"  teacher's loss {r['validation_teacher_loss']:.4f}"
            logger.info(paint("validation", f"step {r['step']:>{width}}/{self.total_steps}  {text}"))

    def summary(self, summary: dict[str, Any]) -> None:
        """The end-of-training line and ``summary.json`` (rank 0 writes the file)."""
        if self.rank == 0:
            path = os.path.join(os.path.dirname(self.path), "summary.json")
            with open(path, "w") as f:
                json.dump(summary, f, indent=2)
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})

        def num(value: float | None, spec: str) -> str:
            return "n/a" if value is None else format(value, spec)

        text = (
            f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in "
            f"{format_duration(summary['wall_seconds'])} ({num(summary['tokens_per_second'], ',.0f')} tokens/s "
            f"this session); final loss {num(summary['final_loss'], '.4f')}, validation loss "
            f"{num(summary['final_validation_loss'], '.4f')}"
        )
        if summary["checkpoint"]:
            text += f"; checkpoint {summary['checkpoint']} (train.sh exports it to {summary['hf_export']})"
        logger.info(text)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_grouping(dump_folder: str) -> dict[str, Any]:
    """A trial of an experiment (its run folder holds the driver's trial.json): W&B group = the experiment,
    job type = the stage, so every variant of an experiment shows together. WANDB_RUN_GROUP and
    WANDB_JOB_TYPE, when set, win (wandb reads them itself)."""
    try:
        with open(os.path.join(dump_folder, "trial.json")) as f:
            trial = json.load(f)
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    if trial.get("experiment") and not os.environ.get("WANDB_RUN_GROUP"):
        out["group"] = str(trial["experiment"])
    if trial.get("stage") and not os.environ.get("WANDB_JOB_TYPE"):
        out["job_type"] = str(trial["stage"])
    return out


def _start_wandb(config, run_config: dict[str, Any]):
    """A W&B run whose id is stored in the dump folder, so a restarted run continues it."""
    import wandb

    id_file = os.path.join(config.job.dump_folder, "wandb_run_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:8]
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "flame"),
        name=os.path.basename(os.path.abspath(config.job.dump_folder)),
        id=run_id,
        resume="allow",
        dir=config.job.dump_folder,
        config=run_config,
        notes=config.job.description or None,
        **wandb_grouping(config.job.dump_folder),
    )
