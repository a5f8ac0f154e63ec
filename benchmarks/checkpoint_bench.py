"""Checkpoint save and load: flame's checkpointer against raw ``torch.distributed.checkpoint``.

    python benchmarks/checkpoint_bench.py [--quick] [--model medium|demo] [--rounds 11]
        [--threads 2] [--no-append] [--json-out FILE]

One process (a one-rank process group, as ``flame.Trainer`` creates it outside torchrun), one model,
one optimizer, both measured on the same live state:

* **flame**: a ``flame.trainer.Trainer`` built by ``flame.parse_args([...])`` with checkpoints on
  (``keep_latest_k`` 0, synchronous saves), after one training step so that AdamW holds its moments.
  Save: ``trainer.checkpointer.save(step)`` (flame's folder checks and barrier, then torchtitan's
  ``CheckpointManager.save``: model, optimizer, lr schedule, data loader and train state, RNG
  included). Load: ``trainer.checkpointer.load()`` (rank 0 picks the newest complete step, keys and
  shapes are checked against the model, then ``CheckpointManager.load``);
* **raw**: ``get_state_dict(model, optimizer)`` then ``dcp.save({"model": ..., "optim": ...})``;
  load: ``get_state_dict``, ``dcp.load`` into it, ``set_state_dict`` back into the model and optimizer;
* **raw_flat**: the same with ``StateDictOptions(flatten_optimizer_state_dict=True)``, the optimizer
  format torchtitan's ``OptimizersContainer`` saves (one DCP entry per parameter for each state tensor
  and each hyperparameter, so that a checkpoint reshards across layouts): the raw baseline in flame's
  format, which separates the cost of the format from the cost of flame's code.

All write to the same file system with DCP's default ``FileSystemWriter`` (files fsync'ed). The order
of the variants rotates from round to round; each round saves a new step, loads it back and deletes the
folders outside the timed region. Before every timed operation ``os.sync()`` flushes earlier rounds'
dirty pages and the garbage collector is run, then disabled for the operation (flame's training loop
saves with it disabled; ``--gc`` leaves it on). The first round is a warm-up and not counted.
Reported: median and fastest seconds of save and load, the ratios flame/raw of the medians (target
<= 1.1) and of the fastest rounds (the disk of a shared machine adds outliers of up to a second to
fsync'ed writes), and for flame the share of its time spent inside ``dcp.save`` / ``dcp.load`` (the
rest is flame's and torchtitan's bookkeeping: state-dict building, folder checks, collectives).

Models: ``medium`` (default): a Llama-style 27.8M-parameter config (hidden 512, 8 layers, the demo
tokenizer's 4,096-token vocabulary), about 330 MB of model + AdamW state, so that a save takes well
over 0.2 s; ``demo``: ``configs/llama_demo.json`` (3.9M parameters). float32.

``--quick``: the demo model, 3 rounds, not appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

ROOT = common.ROOT
sys.path.insert(0, str(ROOT))
DEMO_DIR = ROOT / "data" / "demo"
MEDIUM_MODEL = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1408,
    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    "vocab_size": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}  # fmt: skip
VARIANTS = ("flame", "raw", "raw_flat")


class DcpTimer:
    """Wraps ``dcp.save`` / ``dcp.load`` (looked up at call time by torchtitan) to add up their seconds."""

    def __init__(self) -> None:
        import torch.distributed.checkpoint as dcp

        self.seconds = 0.0
        self._save, self._load = dcp.save, dcp.load

        def timed(fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            return wrapper

        dcp.save, dcp.load = timed(self._save), timed(self._load)  # type: ignore[assignment]


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def build_trainer(a: argparse.Namespace, work: str):
    from flame import parse_args
    from flame.trainer import Trainer

    # A few documents of the demo corpus: the loader only has to deliver one batch.
    data = os.path.join(work, "train.jsonl")
    with open(DEMO_DIR / "train.jsonl") as src, open(data, "w") as dst:
        dst.writelines(line for _, line in zip(range(64), src, strict=False))
    flags = {
        "job.dump_folder": os.path.join(work, "dump"),
        "model.config": a.model_config,
        "model.tokenizer_path": str(DEMO_DIR / "tokenizer"),
        "training.dataset": "json",
        "training.data_files": data,
        "training.seq_len": 64,
        "training.batch_size": 2,
        "training.steps": 1000,
        "training.mixed_precision_param": "float32",
        "checkpoint.enable_checkpoint": "true",
        "checkpoint.interval": 1000,
        "checkpoint.keep_latest_k": 0,
        "validation.enable": "false",
    }
    return Trainer(parse_args([x for k, v in flags.items() for x in (f"--{k}", str(v))]))


def measure(a: argparse.Namespace, work: str) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    torch.set_num_threads(a.threads)
    trainer = build_trainer(a, work)
    try:
        model = trainer.model
        optimizer = trainer.optimizers.optimizers[0]  # one model part: one optimizer
        trainer.train_step([next(iter(trainer.dataloader))])  # AdamW state (exp_avg, exp_avg_sq, step)
        num_params = sum(p.numel() for p in model.parameters())
        ckpt = trainer.checkpointer
        timer = DcpTimer()
        raw_folder = os.path.join(work, "raw")

        def flame_save(step: int) -> None:
            trainer.state.step = step
            ckpt.save(step)

        def flame_load(step: int) -> None:
            assert ckpt.load() and ckpt.loaded_from == f"resumed at step {step}", ckpt.loaded_from

        def raw_ops(name: str, options):
            def save(step: int) -> None:
                msd, osd = get_state_dict(model, optimizer, options=options)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(raw_folder, f"{name}-{step}"))

            def load(step: int) -> None:
                msd, osd = get_state_dict(model, optimizer, options=options)
                dcp.load({"model": msd, "optim": osd}, checkpoint_id=os.path.join(raw_folder, f"{name}-{step}"))
                set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=options)

            return save, load

        # raw_flat: the optimizer state dict flattened to one entry per parameter and hyperparameter, as
        # torchtitan's OptimizersContainer saves it (so that it reshards across layouts).
        ops = {
            "flame": (flame_save, flame_load),
            "raw": raw_ops("raw", None),
            "raw_flat": raw_ops("raw_flat", StateDictOptions(flatten_optimizer_state_dict=True)),
        }
        times: dict[str, dict[str, list[float]]] = {v: {"save": [], "load": []} for v in VARIANTS}
        inside: dict[str, list[float]] = {"save": [], "load": []}  # flame's seconds inside dcp.save/load
        sizes: dict[str, int] = {}
        entries: dict[str, int] = {}
        loads = []
        for r in range(a.rounds + 1):  # round 0: warm-up
            step = r + 1
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate: each variant first in turn
            if r:
                loads.append(common.load_average())
            for v in order:
                for kind, fn in zip(("save", "load"), ops[v], strict=True):
                    timer.seconds = 0.0
                    os.sync()  # earlier rounds' dirty pages are not this save's work
                    if not a.gc:
                        gc.collect()
                        gc.disable()
                    start = time.perf_counter()
                    fn(step)
                    seconds = time.perf_counter() - start
                    gc.enable()
                    if r:
                        times[v][kind].append(seconds)
                        if v == "flame":
                            inside[kind].append(timer.seconds)
            folders = {
                "flame": os.path.join(ckpt.folder, f"step-{step}"),
                **{v: os.path.join(raw_folder, f"{v}-{step}") for v in VARIANTS[1:]},
            }
            sizes = {v: folder_bytes(path) for v, path in folders.items()}
            entries = {
                v: len(dcp.FileSystemReader(path).read_metadata().state_dict_metadata) for v, path in folders.items()
            }
            for path in folders.values():
                shutil.rmtree(path)
            if r:
                done = "  ".join(
                    f"{v} save {times[v]['save'][-1]:.3f} s, load {times[v]['load'][-1]:.3f} s" for v in order
                )
                print(f"round {r}/{a.rounds}: {done}", flush=True)
            else:
                print(f"warm-up round done; checkpoint bytes {sizes}, entries {entries}", flush=True)
    finally:
        trainer.close()
    return {
        "times": times,
        "inside": inside,
        "sizes": sizes,
        "entries": entries,
        "loads": loads,
        "num_params": num_params,
    }


NAMES = {
    "flame": "flame",
    "raw": "raw DCP",
    "raw_flat": "raw DCP, flattened optimizer state",
}


def report(a: argparse.Namespace, res: dict, seconds: float) -> str:
    times, inside = res["times"], res["inside"]
    med = {v: {k: common.median(times[v][k]) for k in ("save", "load")} for v in VARIANTS}
    best = {v: {k: min(times[v][k]) for k in ("save", "load")} for v in VARIANTS}
    rows = []
    for kind in ("save", "load"):
        for v in VARIANTS:
            rows.append(
                [
                    f"{NAMES[v]}: {kind}",
                    f"{med[v][kind]:.3f}",
                    f"{best[v][kind]:.3f}",
                    common.spread(times[v][kind]),
                    f"{common.median(inside[kind]) / med[v][kind]:.0%}" if v == "flame" else "",
                    " ".join(f"{x:.3f}" for x in times[v][kind]),
                ]
            )

    def ratio(v: str, kinds: tuple[str, ...], of=med) -> str:
        return f"{sum(of['flame'][k] for k in kinds) / sum(of[v][k] for k in kinds):.3f}"

    def line(v: str, label: str, of, bold: bool, target: str) -> list[str]:
        cells = [ratio(v, ("save",), of), ratio(v, ("load",), of)]
        cells = [f"**{c}**" for c in cells] if bold else cells
        return [label, *cells, ratio(v, ("save", "load"), of), target]

    ratios = common.table(
        ["ratio", "save", "load", "save + load", "target"],
        [
            line("raw", "flame / raw DCP, medians", med, True, "≤ 1.1"),
            line("raw", "flame / raw DCP, fastest rounds", best, False, ""),
            line("raw_flat", "flame / raw DCP with flattened optimizer state, medians", med, False, ""),
            line("raw_flat", "flame / raw DCP with flattened optimizer state, fastest rounds", best, False, ""),
        ],
    )
    sizes = ", ".join(
        f"{NAMES[v]} {res['sizes'][v] / 2**20:.0f} MiB in {res['entries'][v]:,} entries" for v in VARIANTS
    )
    model = "configs/llama_demo.json" if a.model == "demo" else "medium (benchmarks/checkpoint_bench.py MEDIUM_MODEL)"
    return f"""Command: `{common.command_line()}`

Machine: {common.machine()}. Date: {common.today()}. Load average (`uptime`) before each round:
{"; ".join(res["loads"])}. Run time {seconds / 60:.1f} min.

Setup: one process (one-rank gloo group), model {model} ({res["num_params"] / 1e6:.1f}M parameters,
float32) with AdamW state after one step, {a.threads} torch thread(s); {a.rounds} timed rounds after a warm-up
round, the order rotating; checkpoints on the local disk: {sizes} (flame also holds the lr
schedule, the loader state and the train state). "inside dcp": the share of flame's time spent in
`dcp.save` / `dcp.load` (which also call the optimizer's and loader's `state_dict` / `load_state_dict`).

{common.table(["operation", "seconds (median)", "fastest", "min / max vs median", "flame: inside dcp", "per round"], rows)}

{ratios}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="demo model, 3 rounds (a smoke run; not appended)")
    p.add_argument("--model", choices=("medium", "demo"), default="medium")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gc", action="store_true", help="leave the garbage collector on in the timed regions")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--json-out", default="")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.rounds = "demo", 3
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    from flame.data.demo import build_demo

    build_demo(str(DEMO_DIR), verbose=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        if a.model == "demo":
            a.model_config = str(ROOT / "configs" / "llama_demo.json")
        else:
            a.model_config = os.path.join(work, "llama_medium.json")
            with open(a.model_config, "w") as f:
                json.dump(MEDIUM_MODEL, f)
        res = measure(a, work)
    text = report(a, res, time.perf_counter() - start)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)
    if not a.quick and not a.no_append:
        common.append_section(
            "Checkpoint save and load: flame against raw DCP (`benchmarks/checkpoint_bench.py`)", text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
