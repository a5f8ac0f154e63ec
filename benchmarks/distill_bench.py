"""Distillation cost: a distilled step against the student's own step plus one teacher forward, and the KD
term's peak memory with and without chunking, and the offline teacher cache against online distillation.

    python benchmarks/distill_bench.py [--quick] [--rounds 5] [--steps 8] [--device cpu|cuda] [--no-append]
        [--json-out FILE] [--parts steps,kd_term,memory,cache]

Builds the demo corpus (``data/demo``) first when it is missing. ``--device cuda`` without a CUDA GPU prints
why and exits with code 2 (the GPU check's dry run expects that); ``--parts`` runs some of the four parts
(the GPU check runs the first three); results are appended only for a full run.

1. **Step time.** Two ``flame.trainer.Trainer`` objects in one process on the same batch (no data wait):
   the student alone (``configs/distill_demo.toml``: 0.6M parameters, batch 8 x 128) and the same student
   distilled from a teacher (``configs/tiny/llama_distill_teacher.json``, 1.9M parameters, random weights saved
   as a Hugging Face folder; α 0.5, dense forward KL, chunks of 1,024 tokens). Timed per round, interleaved:
   ``train_step`` of each (forward, loss, backward, clip, optimizer step) and ``teacher.logits`` alone.
   Ratio = distilled step / (student step + teacher forward); target <= 1.15 (the KD term, its chunked
   gradient and the bookkeeping cost at most 15 % on top of the two models' own work). Medians over rounds
   of the per-step wall time and process CPU time (all threads; less sensitive to other jobs). Measured
   eager and with ``--training.compile`` (both trainers: the decoder layers, and the distilled one's fused
   CE + KD kernel; warmed up before the timed rounds).
2. **Peak memory of the KD term.** ``kd_loss_sum`` forward + backward on student and teacher logits of
   4,096 tokens x a 32,768-token vocabulary (fp32, 512 MiB each), with ``chunk_size`` 0 (all tokens at
   once) and 1,024 / 256, each in a fresh process: the peak resident memory (CPU: ``ru_maxrss``; CUDA:
   ``max_memory_allocated``) above what the logits and their gradient buffer take.

3. **The offline teacher cache** (top-k 32) against online distillation at the same top-k: the cache's
   build time and disk per token, and the per-step time of training from it, online, and without a teacher.

The results are appended to benchmarks/RESULTS.md (not with ``--quick`` or ``--no-append``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, append_section, command_line, load_average, machine, median, table, today

TOKENS, VOCAB = 4096, 32768
PARTS = ("steps", "kd_term", "memory", "cache")


def _teacher_folder(folder: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(ROOT / "configs" / "tiny" / "llama_distill_teacher.json"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(ROOT / "data" / "demo" / "tokenizer")).save_pretrained(folder)
    return folder


def step_times(rounds: int, steps: int, device: str, compiled: bool = False) -> dict:
    import torch

    from flame.config.loader import parse_args
    from flame.trainer import Trainer

    os.chdir(ROOT)
    teacher = _teacher_folder(tempfile.mkdtemp(prefix="distill_bench_teacher_"))
    common = ["--job.config_file", "configs/distill_demo.toml", "--training.steps", "100000",
              "--checkpoint.enable_checkpoint", "false", "--validation.enable", "false"]  # fmt: skip
    if device == "cuda":
        common += ["--training.mixed_precision_param", "bfloat16"]
    if compiled:
        common += ["--training.compile", "true"]
    dump = tempfile.mkdtemp(prefix="distill_bench_")
    plain = Trainer(parse_args([*common, "--job.dump_folder", f"{dump}/plain"]))
    kd = Trainer(parse_args([*common, "--job.dump_folder", f"{dump}/kd", "--distill.teacher", teacher]))
    batch = next(iter(plain.dataloader))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn) -> tuple[float, float]:
        fn()  # one untimed call per round: caches warm after the other variant ran
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    def step(trainer):
        def run():
            trainer.state.step += 1
            trainer.train_step([batch])

        return run

    def teacher_forward():
        kd.loss.teacher.logits(kd.shard_batch(batch))

    variants = {"student": step(plain), "distilled": step(kd), "teacher_forward": teacher_forward}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    loads = []
    for r in range(rounds + 1):  # the first round warms up and is not counted
        loads.append(load_average())
        order = list(variants)[r % 3 :] + list(variants)[: r % 3]
        for name in order:
            value = timed(variants[name])
            if r:
                results[name].append(value)
    plain.close()
    kd.close()
    out = {
        name: {"wall": median([v[0] for v in vals]), "cpu": median([v[1] for v in vals])}
        for name, vals in results.items()
    }
    for clock in ("wall", "cpu"):
        out[f"ratio_{clock}"] = out["distilled"][clock] / (out["student"][clock] + out["teacher_forward"][clock])
    out["loads"] = loads
    out["params"] = {"student": plain.built.num_params, "teacher": kd.loss.teacher.num_params}
    return out


def cache_costs(steps: int, top_k: int = 32) -> dict:
    """The offline teacher cache against online distillation at the same top-k: the cache's build time and
    disk per token, and the per-step time of training from it, online and without distillation (the same
    ``steps`` real batches in order, steps 2.. timed: the cache is read by step)."""
    from flame.config.loader import parse_args
    from flame.distill.cache_io import write_cache
    from flame.trainer import Trainer

    os.chdir(ROOT)
    teacher = _teacher_folder(tempfile.mkdtemp(prefix="distill_bench_teacher_"))
    dump = tempfile.mkdtemp(prefix="distill_bench_cache_")
    common = ["--job.config_file", "configs/distill_demo.toml", "--training.steps", str(steps),
              "--checkpoint.enable_checkpoint", "false", "--validation.enable", "false"]  # fmt: skip
    k = ["--distill.top_k", str(top_k)]
    cache = os.path.join(dump, "cache")
    config = parse_args([*common, "--job.dump_folder", f"{dump}/writer", "--distill.teacher", teacher,
                         "--distill.teacher_cache", cache, *k])  # fmt: skip
    t = config.training
    tokens = steps * t.gradient_accumulation_steps * t.batch_size * t.seq_len
    start = time.perf_counter()
    write_cache(config, 1)
    build = time.perf_counter() - start
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(cache) for f in files)

    def per_step(flags: list[str], name: str) -> float:
        trainer = Trainer(parse_args([*common, "--job.dump_folder", f"{dump}/{name}", *flags]))
        data = trainer._batches()
        elapsed = 0.0
        for step in range(1, steps + 1):
            batches = [next(data) for _ in range(t.gradient_accumulation_steps)]
            trainer.state.step = step
            begin = time.perf_counter()
            trainer.train_step(batches)
            if step > 1:  # the first step warms up
                elapsed += time.perf_counter() - begin
        trainer.close()
        return elapsed / (steps - 1)

    return {
        "steps": steps, "top_k": top_k, "tokens": tokens, "build_s": build, "build_us_per_token": 1e6 * build / tokens,
        "disk_bytes_per_token": disk / tokens,
        "student_s": per_step([], "student"),
        "online_s": per_step(["--distill.teacher", teacher, *k], "online"),
        "cached_s": per_step(["--distill.teacher_cache", cache, *k], "cached"),
    }  # fmt: skip


def kd_memory(chunk_size: int, device: str) -> dict:
    """Run in a child process: peak memory of one KD forward + backward above the logits' own."""
    import resource

    import torch

    from flame.distill.divergences import KDSpec
    from flame.distill.losses import kd_loss_sum

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    student = torch.randn(TOKENS, VOCAB, device=dev, generator=g).requires_grad_(True)
    teacher = torch.randn(TOKENS, VOCAB, device=dev, generator=g)
    labels = torch.zeros(TOKENS, dtype=torch.long, device=dev)
    grad = torch.zeros_like(student)  # the gradient buffer the backward fills anyway
    student.grad = grad
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    loss = kd_loss_sum(student, labels, teacher, KDSpec("forward_kl", 1.0, 0.5, None, chunk_size), VOCAB)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"chunk_size": chunk_size, "extra_gib": (peak - before) / 2**30, "logits_gib": student.numel() * 4 / 2**30}


def kd_term_times(device: str, rounds: int = 21) -> dict:
    """Forward + backward of the KD term (dense forward KL per chunk size, and top-k 32 from logits and from
    stored targets) against cross-entropy on the same 1,024 x 4,096 student logits (the step-time batch's
    shape), medians over ``rounds``."""
    import torch
    import torch.nn.functional as F

    from flame.distill.divergences import KDSpec, topk_targets
    from flame.distill.losses import fused_loss_sums, kd_loss_sum
    from flame.distill.vocab import VocabView

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    student = torch.randn(1024, 4096, device=dev, generator=g).requires_grad_(True)
    teacher = torch.randn(1024, 4096, device=dev, generator=g)
    labels = torch.randint(0, 4096, (1024,), device=dev, generator=g)

    def median_ms(fn) -> float:
        fn()
        samples = []
        for _ in range(rounds):
            student.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(1000 * (time.perf_counter() - t0))
        return median(samples)

    out = {"cross_entropy_ms": median_ms(lambda: F.cross_entropy(student, labels, reduction="sum"))}
    for chunk in (1024, 256):
        spec = KDSpec("forward_kl", 1.0, 0.5, None, chunk)
        out[f"kd_{chunk}_ms"] = median_ms(lambda spec=spec: kd_loss_sum(student, labels, teacher, spec, 4096))
    # the trainer's path on plain logits: CE and KD in one pass, against the two terms apart
    dense = KDSpec("forward_kl", 1.0, 0.5, None, 1024)
    out["fused_ms"] = median_ms(lambda: fused_loss_sums(student, labels, teacher, dense, 4096, 0.5)[0])
    compiled = KDSpec("forward_kl", 1.0, 0.5, None, 1024, compiled=True)  # --training.compile's kernel
    out["fused_compiled_ms"] = median_ms(lambda: fused_loss_sums(student, labels, teacher, compiled, 4096, 0.5)[0])
    out["separate_ms"] = median_ms(
        lambda: (
            0.5 * F.cross_entropy(student, labels, reduction="sum")
            + 0.5 * kd_loss_sum(student, labels, teacher, dense, 4096)
        )
    )
    # top-k 32: from the teacher's logits (online: its top-k extracted in the term) and from stored targets
    top = KDSpec("forward_kl", 1.0, 0.5, 32, 1024)
    targets = topk_targets(teacher, VocabView(4096), 32, 1.0)
    out["topk_online_ms"] = median_ms(lambda: kd_loss_sum(student, labels, teacher, top, 4096))
    out["topk_cached_ms"] = median_ms(lambda: kd_loss_sum(student, labels, targets, top, 4096))
    return out


def memory_rows(device: str) -> list[dict]:
    rows = []
    for chunk in (0, 1024, 256):
        code = (
            f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.distill_bench import kd_memory; "
            f"print('RESULT ' + json.dumps(kd_memory({chunk}, {device!r})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        rows.append(json.loads(line[7:]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps; not appended")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--json-out")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts: {sorted(set(parts) - set(PARTS))} unknown; allowed: {', '.join(PARTS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("distill_bench.py: no CUDA GPU is visible (torch.cuda.is_available() is False)", file=sys.stderr)
            sys.exit(2)
    if not (ROOT / "data" / "demo" / "tokenizer").is_dir():
        subprocess.run([sys.executable, "-m", "flame.data.demo", "--out", "data/demo"], cwd=ROOT, check=True)
    rounds, steps = (2, 3) if args.quick else (args.rounds, args.steps)
    start = time.perf_counter()
    result: dict = {"device": args.device, "quick": args.quick}
    if "steps" in parts:
        result["times"] = step_times(rounds, steps, args.device)
        result["times_compiled"] = step_times(rounds, steps, args.device, compiled=True)
    if "kd_term" in parts:
        result["kd_term"] = kd_term_times(args.device, 3 if args.quick else 21)
    if "memory" in parts:
        result["memory"] = memory_rows(args.device)
    if "cache" in parts:
        result["cache"] = cache_costs(4 if args.quick else 24)
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    if args.quick or args.no_append or parts != list(PARTS):
        return
    times, compiled, kd_term = result["times"], result["times_compiled"], result["kd_term"]
    memory, cache = result["memory"], result["cache"]
    ms = lambda x: f"{1000 * x:.1f}"  # noqa: E731
    rows = []
    for label, t in (("", times), (", compiled", compiled)):
        rows += [
            [name + label, ms(t[name]["wall"]), ms(t[name]["cpu"])]
            for name in ("student", "teacher_forward", "distilled")
        ]
        rows.append(
            [
                f"**distilled / (student + teacher forward){label}**",
                f"**{t['ratio_wall']:.3f}**",
                f"**{t['ratio_cpu']:.3f}**",
            ]
        )
    cache_rows = [
        [name, ms(cache[key]), f"{cache[key] / cache['student_s']:.2f}"]
        for name, key in (("student alone", "student_s"), ("online teacher, top-k", "online_s"),
                          ("from the cache", "cached_s"))
    ]  # fmt: skip
    mem_rows = [[str(m["chunk_size"] or "0 (all at once)"), f"{m['extra_gib']:.2f}"] for m in memory]
    body = f"""Command: `{command_line()}`

Machine: {machine()}, device {args.device}. Date: {today()}. Load average before each round: {"; ".join(times["loads"])}; compiled: {"; ".join(compiled["loads"])}.
Run time {result["seconds"] / 60:.1f} min.

Step time (median over {rounds} rounds of {steps} steps, per step; student {times["params"]["student"] / 1e6:.2f}M
parameters, teacher {times["params"]["teacher"] / 1e6:.2f}M, batch 8 x 128, vocabulary 4,096, α 0.5, dense forward KL;
eager, then both trainers with `--training.compile true`):

{table(["variant", "wall ms", "CPU ms"], rows)}

Target <= 1.15.

The KD term alone (dense forward KL, forward + backward, median of 21) on 1,024 x 4,096 student logits, against
cross-entropy on the same logits: {kd_term["kd_1024_ms"]:.1f} ms in 1,024-token chunks ({kd_term["kd_1024_ms"] / kd_term["cross_entropy_ms"]:.2f}x
cross-entropy's {kd_term["cross_entropy_ms"]:.1f} ms), {kd_term["kd_256_ms"]:.1f} ms in 256-token chunks ({kd_term["kd_256_ms"] / kd_term["cross_entropy_ms"]:.2f}x).
Cross-entropy and KD (α 0.5) in the trainer's one fused pass: {kd_term["fused_ms"]:.1f} ms, against {kd_term["separate_ms"]:.1f} ms for the two terms apart;
compiled (`--training.compile`): {kd_term["fused_compiled_ms"]:.1f} ms ({kd_term["fused_compiled_ms"] / kd_term["cross_entropy_ms"]:.2f}x cross-entropy alone).
Top-k 32 forward KL (1,024-token chunks): {kd_term["topk_online_ms"]:.1f} ms from the teacher's logits (its top-k taken in
the term, {kd_term["topk_online_ms"] / kd_term["cross_entropy_ms"]:.2f}x), {kd_term["topk_cached_ms"]:.1f} ms from stored top-k targets (the cache's case, {kd_term["topk_cached_ms"] / kd_term["cross_entropy_ms"]:.2f}x).

Peak memory of one KD forward + backward above its inputs ({TOKENS:,} tokens x {VOCAB:,} vocabulary, fp32 logits of
{memory[0]["logits_gib"]:.2f} GiB per model; fresh process each):

{table(["chunk_size (tokens)", "extra peak GiB"], mem_rows)}

Offline teacher cache against online distillation, top-k {cache["top_k"]} (`python -m flame.distill.cache`, then
`--distill.teacher_cache`), {cache["steps"]} steps of {cache["tokens"] // cache["steps"]:,} tokens:
building it took {cache["build_s"]:.1f} s ({cache["build_us_per_token"]:.0f} µs per token: the teacher's forward and the
top-k), and it takes **{cache["disk_bytes_per_token"]:.0f} bytes per token** on disk (8k + 4 = {8 * cache["top_k"] + 4}, plus the
fingerprints and headers). Per training step (mean over steps 2..{cache["steps"]}):

{table(["variant", "ms per step", "/ student"], cache_rows)}
"""
    append_section("Distillation: step time and KD memory (`benchmarks/distill_bench.py`)", body)


if __name__ == "__main__":
    main()
