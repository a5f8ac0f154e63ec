"""Data loader throughput against raw tokenization, and the data-wait share of the demo's steps.

    python benchmarks/data_throughput.py [--quick] [--docs 6000] [--seq-len 2048] [--batch-size 8]
        [--demo-steps 60] [--skip-demo] [--no-append] [--json-out results.json]

All in one run, on the demo corpus (the Python standard library's sources; built if missing):

1. raw: ``encode_batch_fast`` of the ``tokenizers`` tokenizer over the first ``--docs`` documents
   in chunks of 128 (the loader's chunk size), with the tokenizer's thread pool (as the loader's
   main process uses it), with ``TOKENIZERS_PARALLELISM=false`` (one thread, as in a worker), and in
   2 concurrent forked processes of one thread each, every one encoding half of the documents (as
   2 loader workers do, competing for the same cores): their total tokens over the wall time from the
   common start to the last one's end;
2. loader: tokens/s of ``build_dataloader`` (tokenize + mix two sources 0.7/0.3 + pack rows of
   ``--seq-len``) with 0, 1 and 2 workers over the same documents, after its first batch, plus
   the same with varlen packing (0 workers);
3. ratios: 0 workers against raw with the thread pool; N workers against N x raw on one thread
   (per worker). Target: >= 0.7. 2 workers also against the 2 concurrent raw processes: per
   worker, under the same core contention (on a machine with fewer free cores than processes,
   "2 x raw on one thread" is a throughput the machine cannot deliver);
4. the demo (``configs/demo.toml``, 2 ranks, ``--demo-steps`` steps): ``data_wait_share`` (time
   waiting for batches / step time) from its metrics. Target: < 2 %.

The results are appended to benchmarks/RESULTS.md (not with ``--quick``: 1,500 documents, 20 demo
steps, or ``--no-append``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

if TYPE_CHECKING:
    from flame.config.schema import Training


def raw_tokens_per_second(tokenizer, texts: list[str], chunk: int = 128) -> float:
    """Tokens/s of plain batched encoding (ids materialized, as the loader needs them)."""
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), chunk):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts[i : i + chunk], add_special_tokens=False))
    return tokens / (time.perf_counter() - start)


def _encode_share(tokenizer, texts: list[str], barrier, results, k: int) -> None:
    """One of the concurrent raw processes: wait for the others, encode, report (start, end, tokens)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as in a loader worker
    barrier.wait()
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 128):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts[i : i + 128], add_special_tokens=False))
    results.put((k, start, time.perf_counter(), tokens))


def raw_concurrent_tokens_per_second(tokenizer, texts: list[str], processes: int = 2) -> float:
    """Total tokens/s of ``processes`` forked one-thread processes encoding ``texts[k::processes]`` at once."""
    ctx = multiprocessing.get_context("fork")  # as the loader's workers
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_encode_share, args=(tokenizer, texts[k::processes], barrier, results, k))
        for k in range(processes)
    ]
    for proc in procs:
        proc.start()
    done = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(d[3] for d in done) / (max(d[2] for d in done) - min(d[1] for d in done))


def loader_tokens_per_second(training: Training, tokenizer, total_tokens: int) -> float:
    """Tokens/s of the loader over about ``total_tokens`` tokens, timed after its first batch."""
    from flame.data import build_dataloader

    it = iter(build_dataloader(training, tokenizer))
    next(it)
    start, tokens = time.perf_counter(), 0
    while tokens < total_tokens:
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_data_wait(steps: int, demo_dir: str) -> dict[str, float]:
    """Run the demo config on 2 ranks for ``steps`` steps; data_wait_share from its metrics."""
    with tempfile.TemporaryDirectory() as dump:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "-m", "flame.train", "--job.config_file", str(ROOT / "configs/demo.toml"),
            "--job.dump_folder", dump, "--training.steps", str(steps), "--metrics.log_freq", "10",
            "--checkpoint.enable_checkpoint", "false", "--model.tokenizer_path", f"{demo_dir}/tokenizer",
            "--training.data_files", f"{demo_dir}/train.jsonl",
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        with open(os.path.join(dump, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    steady = [r["data_wait_share"] for r in records[1:]] or [records[-1]["data_wait_share"]]  # first: start-up
    return {
        "demo_steps": steps,
        "data_wait_share_mean": statistics.mean(steady),
        "data_wait_share_max": max(steady),
        "demo_tokens_per_second_per_rank": statistics.mean(r["tokens_per_second"] for r in records[1:] or records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default=str(ROOT / "data/demo"), help="demo corpus (built if missing)")
    parser.add_argument("--docs", type=int, default=6000, help="documents to tokenize")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--demo-steps", type=int, default=60)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of (2 raw processes, 2-worker loader)")
    parser.add_argument("--quick", action="store_true", help="1,500 documents, 20 demo steps, 1 repeat; not appended")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.demo_steps, args.repeats = 1500, 20, 1
    import common

    loads = [common.load_average()]
    started = time.perf_counter()

    from transformers import AutoTokenizer

    from flame.config.schema import Training
    from flame.data.demo import build_demo
    from flame.data.loader import backend_tokenizer

    build_demo(args.demo_dir, verbose=False)
    with open(os.path.join(args.demo_dir, "train.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.docs), f, strict=False)]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.demo_dir, "tokenizer"))
    tok = backend_tokenizer(tokenizer)
    total_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))  # also warms up

    results: dict = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "documents": len(texts),
        "tokens": total_tokens,
        "raw_pool_tokens_per_second": raw_tokens_per_second(tok, texts),
    }
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at every call
    results["raw_one_thread_tokens_per_second"] = raw_tokens_per_second(tok, texts)
    del os.environ["TOKENIZERS_PARALLELISM"]

    with tempfile.TemporaryDirectory() as tmp:
        halves = []
        for k in range(2):
            path = os.path.join(tmp, f"half{k}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts[k::2])
            halves.append(path)
        base = dict(
            batch_size=args.batch_size, seq_len=args.seq_len, dataset=["json", "json"], dataset_name=[],
            dataset_split=["train"], data_dir=[], data_files=halves, data_probs=[0.7, 0.3], streaming=False,
            varlen=False, context_len=args.seq_len, text_column="", prefetch_factor=4, pin_memory=False,
            persistent_workers=False, seed=0,
        )  # fmt: skip
        # The 2-worker loader against 2 concurrent raw processes, interleaved (same load), medians.
        pairs = []
        for _ in range(args.repeats):
            raw2 = raw_concurrent_tokens_per_second(tok, texts, 2)
            loader2 = loader_tokens_per_second(
                dataclasses.replace(Training(), **base, num_workers=2), tokenizer, total_tokens
            )
            pairs.append((raw2, loader2))
        results["raw_2_processes_tokens_per_second"] = statistics.median(p[0] for p in pairs)
        results["loader_2_workers_paired_tokens_per_second"] = statistics.median(p[1] for p in pairs)
        results["ratio_2_workers_vs_2_processes"] = statistics.median(p[1] / p[0] for p in pairs)
        results["ratio_2_workers_vs_2_processes_each"] = [round(p[1] / p[0], 3) for p in pairs]
        loads.append(common.load_average())
        for workers in (0, 1, 2):
            tps = loader_tokens_per_second(
                dataclasses.replace(Training(), **base, num_workers=workers), tokenizer, total_tokens
            )
            raw = (
                results["raw_pool_tokens_per_second"]
                if workers == 0
                else workers * results["raw_one_thread_tokens_per_second"]
            )
            results[f"loader_{workers}_workers_tokens_per_second"] = tps
            results[f"ratio_{workers}_workers"] = tps / raw
        varlen = dataclasses.replace(
            Training(), **{**base, "varlen": True, "context_len": args.seq_len // 2}, num_workers=0
        )
        tps = loader_tokens_per_second(varlen, tokenizer, total_tokens)
        results["loader_varlen_0_workers_tokens_per_second"] = tps
        results["ratio_varlen_0_workers"] = tps / results["raw_pool_tokens_per_second"]
    if not args.skip_demo:
        loads.append(common.load_average())
        results.update(demo_data_wait(args.demo_steps, args.demo_dir))
    results["load_averages"] = loads
    results["seconds"] = time.perf_counter() - started

    for key, value in results.items():
        print(f"{key:45s} {value:,.3f}" if isinstance(value, float) else f"{key:45s} {value}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    text = report(args, results)
    print(text)
    if not args.quick and not args.no_append:
        common.append_section(
            "Data loader throughput, with a 2-process raw baseline (`benchmarks/data_throughput.py`)", text
        )
    return 0


def report(args: argparse.Namespace, r: dict) -> str:
    """The RESULTS.md section: the command, machine, date, load, and the tables."""
    import common

    def n(key: str) -> str:
        return f"{r[key]:,.0f}"

    rows = [
        ["raw `encode_batch_fast`, tokenizer thread pool", n("raw_pool_tokens_per_second"), "", ""],
        ["raw `encode_batch_fast`, one thread (`TOKENIZERS_PARALLELISM=false`)", n("raw_one_thread_tokens_per_second"), "", ""],
        ["raw, 2 concurrent one-thread processes (total)", n("raw_2_processes_tokens_per_second"), "", ""],
        ["loader, 0 workers (tokenize + mix + pack in the training process)", n("loader_0_workers_tokens_per_second"),
         f"**{r['ratio_0_workers']:.2f}**", "raw, thread pool"],
        ["loader, 1 worker", n("loader_1_workers_tokens_per_second"), f"**{r['ratio_1_workers']:.2f}**", "1 x raw, one thread"],
        ["loader, 2 workers", n("loader_2_workers_tokens_per_second"), f"{r['ratio_2_workers']:.2f} per worker",
         "2 x raw, one thread"],
        ["loader, 2 workers (paired with the 2-process raw runs)", n("loader_2_workers_paired_tokens_per_second"),
         f"**{r['ratio_2_workers_vs_2_processes']:.2f}** per worker", "2 concurrent raw processes"],
        [f"loader, varlen (context_len {args.seq_len // 2:,}), 0 workers",
         n("loader_varlen_0_workers_tokens_per_second"), f"**{r['ratio_varlen_0_workers']:.2f}**", "raw, thread pool"],
    ]  # fmt: skip
    text = f"""Command: `{common.command_line()}`

Machine: {common.machine()}. Date: {common.today()}. Load average (`uptime`) at the start, before the
loader runs and before the demo: {"; ".join(r["load_averages"])}. Run time {r["seconds"] / 60:.1f} min.

Data: the first {r["documents"]:,} documents of the demo corpus ({r["tokens"]:,} tokens), split into two
files mixed 0.7/0.3; rows of {args.seq_len:,} tokens, batch {args.batch_size}, prefetch 4. The loader is
timed after its first batch. The 2-worker loader and the 2 concurrent raw processes ran as
{args.repeats} interleaved pairs (median; ratio per pair: {", ".join(map(str, r["ratio_2_workers_vs_2_processes_each"]))}).

{common.table(["measurement", "tokens/s", "ratio", "compared with"], rows, right={1, 2})}"""
    if "data_wait_share_mean" in r:
        demo = common.table(
            ["measurement", "value"],
            [
                ["data wait share of step time, mean", f"**{100 * r['data_wait_share_mean']:.1f} %**"],
                ["data wait share of step time, worst window", f"{100 * r['data_wait_share_max']:.1f} %"],
                ["training tokens/s per rank", f"{r['demo_tokens_per_second_per_rank']:,.0f}"],
            ],
        )
        text += f"""

Demo (`configs/demo.toml`, 2 ranks of FSDP2 on the CPU cores, {r["demo_steps"]} steps, metrics every 10
steps, first window left out as start-up):

{demo}"""
    return text


if __name__ == "__main__":
    sys.exit(main())
