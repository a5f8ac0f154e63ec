"""GPU throughput and MFU: Llama 340M and 1B and fla GLA 340M, bf16, with and without compile and varlen.

    python benchmarks/gpu_mfu.py [--quick] [--models llama_340m,llama_1b,gla_340m]
        [--variants base,compile,varlen,compile+varlen] [--steps 30] [--log-freq 5] [--seq-len 2048]
        [--tokenizer PATH] [--rounds 1] [--no-append] [--json-out FILE]

GPU only: without CUDA it prints why and exits with code 2. Not yet measured: no GPU was lent to the
sessions that wrote it (benchmarks/RESULTS.md says so); run it on a machine with one or more GPUs.

Every run is flame's real launcher, ``NGPU=<visible GPUs> bash train.sh`` (torchrun, FSDP2 over all
GPUs), on ``configs/models/<model>.json`` with ``--training.mixed_precision_param bfloat16``, a temporary
dump folder, validation and checkpoints off, and one of the variants: ``base``, ``compile``
(``--training.compile``: each decoder layer compiled), ``varlen`` (``--training.varlen``: documents packed
with per-document attention, ``context_len`` = ``--seq-len``), ``compile+varlen``. Batch per GPU (rows of
``--seq-len`` tokens): 16 for the 340M models, 8 for 1B (``--batch-size`` overrides; H100/H200-sized
memory without activation checkpointing).

Data: the demo corpus (this Python's standard library sources, ``flame.data.demo``; nothing is
downloaded) with a 32,000-token BPE tokenizer trained on it (``data/demo_32k``, built once, about a
minute), so that the models keep their 32k vocabulary and FLOPs; ``--tokenizer`` takes another local
tokenizer. Tokenization runs in 2 loader workers per rank.

Read from each run's ``metrics.jsonl`` (rank 0): ``tokens_per_second`` (per GPU), ``tflops``, ``mfu``
(percent of the bf16 peak flame knows for the GPU's name, flame/models/flops.py; empty for an unknown
GPU), ``data_wait_share`` and peak memory, as medians over the logging windows after the first (start-up
and compilation excluded). A run that flame refuses (e.g. fla not installed, exit code 2) is reported
with its message and the others go on.

Duration: about 1-2 minutes per run on an H100/H200 (start-up, compilation, ``--steps`` steps), 12 runs
in all; ``--quick``: llama_340m, base and compile, 12 steps, not appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

ROOT = common.ROOT
MODELS = {
    "llama_340m": ("configs/models/llama_340m.json", 16),
    "llama_1b": ("configs/models/llama_1b.json", 8),
    "gla_340m": ("configs/models/gla_340m.json", 16),
}
VARIANTS = {
    "base": [],
    "compile": ["--training.compile", "true"],
    "varlen": ["--training.varlen", "true"],
    "compile+varlen": ["--training.compile", "true", "--training.varlen", "true"],
}
DEMO_DIR = ROOT / "data" / "demo_32k"


def gpus() -> tuple[int, str]:
    import torch

    if not torch.cuda.is_available():
        return 0, ""
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def run(model: str, variant: str, a: argparse.Namespace, ngpu: int) -> dict:
    config, default_batch = MODELS[model]
    with tempfile.TemporaryDirectory() as dump:
        cmd = [
            "bash", "train.sh", "--job.dump_folder", dump, "--model.config", config,
            "--model.tokenizer_path", a.tokenizer, "--training.dataset", "json", "--training.data_files", a.data,
            "--training.seq_len", str(a.seq_len), "--training.context_len", str(a.seq_len),
            "--training.batch_size", str(a.batch_size or default_batch), "--training.steps", str(a.steps),
            "--training.mixed_precision_param", "bfloat16", "--training.num_workers", "2",
            "--training.pin_memory", "true", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", str(a.log_freq),
            "--validation.enable", "false", "--checkpoint.enable_checkpoint", "false", *VARIANTS[variant],
        ]  # fmt: skip
        env = dict(os.environ, NGPU=str(ngpu), NO_COLOR="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT))
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        out = proc.stdout + proc.stderr
        result: dict = {"model": model, "variant": variant, "seconds": seconds, "exit_code": proc.returncode}
        route = re.search(r"varlen attention route: ([^\n]+)", out)
        if route:
            result["varlen_route"] = route.group(1).strip()
        path = os.path.join(dump, "metrics.jsonl")
        if proc.returncode != 0 or not os.path.exists(path):
            errors = [line for line in out.splitlines() if "error" in line.lower()]
            result["error"] = (errors[-1] if errors else out.strip().splitlines()[-1:] or ["no output"])[0][-300:]
            sys.stderr.write(out[-3000:])
            return result
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    steady = records[1:] or records

    def med(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    result.update(
        tokens_per_second=med("tokens_per_second"),
        tflops=med("tflops"),
        mfu=med("mfu"),
        data_wait_share=med("data_wait_share"),
        memory_gib=max((r.get("memory_reserved_gib") or 0.0) for r in records),
        final_loss=records[-1]["loss"],
    )
    return result


def report(a: argparse.Namespace, results: list[dict], ngpu: int, name: str, seconds: float) -> str:
    def num(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["variant"], "failed", "", "", "", "", r["error"].replace("|", "/")])
            continue
        rows.append(
            [
                r["model"],
                r["variant"],
                num(r["tokens_per_second"], ",.0f"),
                num(r["tflops"], ".1f"),
                f"**{num(r['mfu'], '.1f')} %**" if r["mfu"] is not None else "unknown peak",
                num(100 * r["data_wait_share"], ".1f") + " %",
                num(r["memory_gib"], ".1f"),
                r.get("varlen_route", ""),
            ]
        )
    header = [
        "model",
        "variant",
        "tokens/s per GPU",
        "TFLOP/s per GPU",
        "MFU",
        "data wait",
        "peak reserved GiB",
        "note",
    ]
    batches = ", ".join(f"{m} {a.batch_size or MODELS[m][1]}" for m in a.models)
    return f"""Command: `{common.command_line()}`

Machine: {ngpu} x {name}; {common.machine()}. Date: {common.today()}. Run time {seconds / 60:.1f} min.

Setup: `NGPU={ngpu} bash train.sh`, bf16, sequence length {a.seq_len}, batch per GPU {batches}, {a.steps} steps
logged every {a.log_freq}; medians over the windows after the first (start-up and compilation excluded).
Tokenizer {os.path.relpath(a.tokenizer, ROOT)}, demo corpus, 2 loader workers per GPU.

{common.table(header, rows, right={2, 3, 4, 5, 6})}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="llama_340m, base and compile, 12 steps; not appended")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-freq", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=0, help="rows per GPU (default: per model, see above)")
    p.add_argument("--tokenizer", default="", help="a local tokenizer (default: data/demo_32k/tokenizer, built)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--json-out", default="")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.variants, a.steps = "llama_340m", "base,compile", 12
    a.models = [m for m in a.models.split(",") if m]
    variants = [v for v in a.variants.split(",") if v]
    unknown = [m for m in a.models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown model or variant: {', '.join(unknown)}")
    if a.steps < 2 * a.log_freq:
        p.error("--steps must cover at least two logging windows (2 x --log-freq)")

    ngpu, name = gpus()
    if ngpu == 0:
        print(
            "gpu_mfu.py: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing measured", file=sys.stderr
        )
        return 2

    from flame.data.demo import build_demo

    built = build_demo(str(DEMO_DIR), vocab_size=32000, verbose=True)
    a.data = built["paths"]["train"]
    a.tokenizer = a.tokenizer or built["paths"]["tokenizer"]
    start = time.perf_counter()
    results = []
    for r in range(a.rounds):
        for model in a.models:
            for variant in variants:
                result = run(model, variant, a, ngpu)
                result["round"] = r + 1
                results.append(result)
                print(json.dumps(result), flush=True)
    text = report(a, results, ngpu, name, time.perf_counter() - start)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=2)
    if not a.quick and not a.no_append:
        common.append_section("GPU tokens/s and MFU (`benchmarks/gpu_mfu.py`)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
