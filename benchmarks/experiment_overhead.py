"""The experiment layer's overhead: 8 one-rank trials, max_parallel 2, against the trials' own wall times.

Two stages of real ``train.sh`` trials on a tiny Llama (a 40-file slice of the demo corpus, a 512-token
tokenizer): ``search`` (3 learning rates x 2 seeds) and ``more`` (its top 2, ``pick = "each"``):

* efficiency = (sum of the trials' own wall times / max_parallel) / the experiment's wall time (target
  >= 0.9 on the local launcher): the time the launcher, the expansion and the records add;
* stage gap = from the end of the last trial of ``search`` to the start of the first trial of ``more``
  (target < 2 s locally; on Slurm it is the controller job's start latency, reported).

    .venv/bin/python benchmarks/experiment_overhead.py [--launcher local|slurm] [--steps 40] [--no-write]

Trial wall times are each trial process's own (train.sh start to exit, from the records); the experiment's
is from the first launch to the last end. Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import append_section, command_line, load_average, machine, table, today


def build(folder: str, steps: int) -> dict:
    import tomli_w

    from flame.data.demo import build_demo

    demo = build_demo(os.path.join(folder, "data"), vocab_size=512, max_files=40, verbose=False)
    model = os.path.join(folder, "model.json")
    with open(model, "w") as f:
        json.dump(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "vocab_size": 512,
                "tie_word_embeddings": False,
            },
            f,
        )
    base = {
        "model": {"config": model, "tokenizer_path": demo["paths"]["tokenizer"]},
        "lr_scheduler": {"warmup_steps": 5},
        "training": {
            "batch_size": 4,
            "seq_len": 128,
            "steps": steps,
            "dataset": "json",
            "data_files": demo["paths"]["train"],
            "mixed_precision_param": "float32",
        },
        "metrics": {"log_freq": 10},
        "validation": {
            "enable": True,
            "dataset": "json",
            "data_files": demo["paths"]["validation"],
            "freq": steps,
            "steps": 2,
            "batch_size": 4,
        },
    }
    with open(os.path.join(folder, "base.toml"), "wb") as f:
        tomli_w.dump(base, f)
    return {
        "experiment": {"name": "overhead", "root": os.path.join(folder, "exp"), "max_parallel": 2},
        "stage": [
            {
                "name": "search",
                "config": os.path.join(folder, "base.toml"),
                "reduce": {"top_k": 2},
                "space": {"optimizer.lr": {"grid": [1e-3, 3e-3, 1e-2]}, "training.seed": {"grid": [0, 1]}},
            },
            {
                "name": "more",
                "config": os.path.join(folder, "base.toml"),
                "override": {
                    "training.seed": 2,
                    "optimizer.lr": {"link": "search", "field": "optimizer.lr", "pick": "each"},
                },
            },
        ],
    }


def measure(root: str, launcher: str) -> dict:
    """Each trial's own (start, end): the driver's records locally; on Slurm the array task's exit.json
    (the controller records a trial's end only when it next runs)."""
    records = [json.loads(line) for line in open(os.path.join(root, "records.jsonl"))]
    spans: dict[str, list[tuple[float, float]]] = {"search": [], "more": []}
    for e in records:
        if e["event"] != "end" or e["status"] != "done":
            continue
        if launcher == "local":
            spans[e["stage"]].append((e["time"] - e["seconds"], e["time"]))
        else:
            info = json.load(open(os.path.join(root, e["stage"], e["trial"], "exit.json")))
            spans[e["stage"]].append((info["start"], info["end"]))
    every = spans["search"] + spans["more"]
    own = [b - a for a, b in every]
    wall = max(b for _, b in every) - min(a for a, _ in every)
    gap = min(a for a, _ in spans["more"]) - max(b for _, b in spans["search"])
    return {
        "trials": len(every),
        "own": own,
        "wall": wall,
        "gap": gap,
        "efficiency": sum(own) / 2 / wall,
        "done": len(every),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import flame

    folder = tempfile.mkdtemp(prefix="flame-experiment-overhead-")
    spec = build(folder, args.steps)
    start = time.time()
    flame.experiment.run(spec, launcher=args.launcher, echo=lambda *a, **k: None)
    if args.launcher == "slurm":  # the controller jobs carry it on: wait for the end
        path = os.path.join(spec["experiment"]["root"], "records.jsonl")
        while not any(json.loads(line)["event"] == "experiment" for line in open(path)):
            time.sleep(1)
    total = time.time() - start
    m = measure(spec["experiment"]["root"], args.launcher)
    rows = [
        ["trials (done)", f"{m['trials']} ({m['done']})"],
        ["sum of the trials' own wall times", f"{sum(m['own']):.1f} s"],
        ["the same / max_parallel 2", f"{sum(m['own']) / 2:.1f} s"],
        ["experiment wall time (first launch to last end)", f"{m['wall']:.1f} s"],
        ["**efficiency**", f"**{m['efficiency']:.3f}**"],
        ["**stage gap** (last `search` end -> first `more` start)", f"**{m['gap']:.2f} s**"],
        ["whole call (checks, first expansion, summary)", f"{total:.1f} s"],
    ]
    body = (
        f"Command: `{command_line()}`\n\nMachine: {machine()}; load average {load_average()} at the end. "
        f"Date: {today()}. Launcher: {args.launcher}; {args.steps} steps per trial (tiny Llama, batch 4 x 128).\n\n"
        + table(["measurement", "value"], rows)
    )
    print(body)
    if not args.no_write:
        append_section(f"Experiment overhead, {args.launcher} launcher (`benchmarks/experiment_overhead.py`)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
