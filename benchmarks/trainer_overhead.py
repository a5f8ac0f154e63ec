"""Trainer overhead: flame against a hand-written PyTorch loop and ``transformers.Trainer``.

    python benchmarks/trainer_overhead.py [--quick] [--rounds 5] [--steps 40] [--warmup 8]
        [--batch-size 8] [--seq-len 256] [--threads 2] [--no-append] [--json-out FILE]

The same model (``configs/llama_demo.json``: Llama-style, 3.9M parameters, the demo tokenizer's
4,096-token vocabulary), the same batch (8 x 256 tokens), float32, the same thread count, the same
fixed synthetic tokens (uniform random ids, seed 0; each row is ``seq_len`` tokens plus EOS) and the
same number of steps, trained by:

* **flame**: one process through the Python API (``flame.Trainer(flame.parse_args([...]))``, then
  ``train()``), defaults otherwise (AdamW foreach, metrics every 10 steps, gc every 50 steps; no
  checkpoints, no validation). Its data is a pre-tokenized folder (the format of
  ``python -m flame.utils.preprocess``) holding the same rows as documents: each step's data path is
  flame's real one without the tokenizer (Arrow rows -> seeded document order -> packing into
  ``seq_len + 1`` windows -> collate, in the training process: ``num_workers`` 0);
* **raw**: a minimal loop: slice the next rows of the token tensor, forward, cross entropy, backward,
  ``clip_grad_norm_(1.0)``, ``AdamW.step()`` (foreach, as flame), ``zero_grad``; loss and gradient norm
  printed every 10 steps;
* **Trainer**: ``transformers.Trainer`` (``use_cpu``, ``max_grad_norm`` 1.0, ``logging_steps`` 10, no saving,
  no reporting, its default optimizer ``adamw_torch_fused``) on a ``Dataset`` of the same rows.

Each run is a fresh process (``OMP_NUM_THREADS`` = ``torch.set_num_threads`` = ``--threads``); runs are
interleaved (flame, raw, Trainer, flame, raw, Trainer, ...). Start-up (imports, model build, the first
``--warmup`` steps) is excluded: every variant records a timestamp at the start of each step (flame:
entry of ``train_step``; raw: top of the loop; Trainer: ``on_step_begin``), and tokens/s is the tokens of
the steps from ``warmup + 1`` to ``steps - 1`` over the time between the starts of step ``warmup + 1`` and
step ``steps``: whole loop iterations, data fetch and logging included. The report gives the medians over
rounds and the ratios of the medians; target flame/raw >= 0.97, flame/Trainer >= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

ROOT = common.ROOT
MODEL_CONFIG = ROOT / "configs" / "llama_demo.json"
# --model tiny: a 0.6M-parameter Llama (mostly embeddings) whose steps take milliseconds, so that
# per-step framework costs (data, logging, bookkeeping) stand out instead of drowning in compute.
TINY_MODEL = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048, "vocab_size": 4096,
    "tie_word_embeddings": False,
}  # fmt: skip
DEMO_DIR = ROOT / "data" / "demo"
LR, WEIGHT_DECAY, BETAS, EPS, MAX_NORM, LOG_EVERY = 1e-3, 0.1, (0.9, 0.95), 1e-8, 1.0, 10
VARIANTS = ("flame", "raw", "trainer")


# ---- data -------------------------------------------------------------------------------------------


def make_data(folder: str, tokenizer_path: str, rows: int, seq_len: int) -> None:
    """``rows.npy`` (rows x (seq_len + 1): random ids, then EOS) and the same documents as a flame
    pre-tokenized folder ``tokenized/`` (flame appends the EOS itself)."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from flame.data.tokenized import COLUMN, tokenizer_fingerprint, write_meta

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    docs = np.random.default_rng(0).integers(0, vocab, size=(rows, seq_len), dtype=np.int64)
    docs[docs == eos] = (eos + 1) % vocab
    np.save(os.path.join(folder, "rows.npy"), np.concatenate([docs, np.full((rows, 1), eos)], axis=1))
    out = os.path.join(folder, "tokenized")
    features = datasets.Features({COLUMN: datasets.Sequence(datasets.Value("int32"))})
    datasets.Dataset.from_dict({COLUMN: docs.astype(np.int32).tolist()}, features=features).save_to_disk(out)
    meta = {
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "tokenizer_path": tokenizer_path,
        "eos_token_id": eos,
        "vocab_size": vocab,
        "num_documents": rows,
        "num_tokens": rows * seq_len,
    }
    write_meta(out, meta)


# ---- the three workers (each in its own process) ------------------------------------------------------


def now() -> tuple[float, float]:
    """Wall-clock and this process's CPU time (all its threads), in seconds."""
    return time.perf_counter(), time.process_time()


def run_flame(a: argparse.Namespace, stamps: list) -> float:
    from flame import parse_args
    from flame.trainer import Trainer

    flags = {
        "job.dump_folder": os.path.join(a.work, "flame_dump"),
        "model.config": a.model_config,
        "model.tokenizer_path": a.tokenizer,
        "training.dataset": os.path.join(a.data, "tokenized"),
        "training.seq_len": a.seq_len,
        "training.batch_size": a.batch_size,
        "training.steps": a.steps,
        "training.max_norm": MAX_NORM,
        "training.mixed_precision_param": "float32",
        "training.seed": 0,
        "optimizer.name": "AdamW",
        "optimizer.lr": LR,
        "optimizer.weight_decay": WEIGHT_DECAY,
        "optimizer.beta1": BETAS[0],
        "optimizer.beta2": BETAS[1],
        "optimizer.eps": EPS,
        "lr_scheduler.warmup_steps": 0,
        "checkpoint.enable_checkpoint": "false",
        "validation.enable": "false",
        "metrics.log_freq": LOG_EVERY,
    }
    trainer = Trainer(parse_args([x for k, v in flags.items() for x in (f"--{k}", str(v))]))
    train_step = trainer.train_step

    def timed_train_step(batches):
        stamps.append(now())
        return train_step(batches)

    trainer.train_step = timed_train_step  # type: ignore[method-assign]
    try:
        last = trainer.train()
    finally:
        trainer.close()
    return float(last["loss"])


def _model(a: argparse.Namespace):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(a.model_config)
    config.use_cache = False
    config.vocab_size = len(AutoTokenizer.from_pretrained(a.tokenizer))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def run_raw(a: argparse.Namespace, stamps: list) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F

    rows = torch.from_numpy(np.load(os.path.join(a.data, "rows.npy")))
    model = _model(a)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=True
    )
    loss = torch.zeros(())
    for step in range(a.steps):
        stamps.append(now())
        start = (step * a.batch_size) % len(rows)
        batch = rows[start : start + a.batch_size]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % LOG_EVERY == 0:
            print(f"step {step + 1} loss {loss.item():.4f} grad_norm {grad_norm.item():.3f}", flush=True)
    return float(loss)


def run_trainer(a: argparse.Namespace, stamps: list) -> float:
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = torch.from_numpy(np.load(os.path.join(a.data, "rows.npy")))

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict:
            # The model shifts the labels itself.
            return {"input_ids": rows[i, :-1], "labels": rows[i, :-1]}

    class Stamps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            stamps.append(now())

    args = TrainingArguments(
        output_dir=os.path.join(a.work, "trainer_out"),
        per_device_train_batch_size=a.batch_size,
        max_steps=a.steps,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        max_grad_norm=MAX_NORM,
        logging_steps=LOG_EVERY,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=_model(a), args=args, train_dataset=Rows(), callbacks=[Stamps()])
    out = trainer.train()
    return float(out.training_loss)


def worker(a: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(a.threads)
    stamps: list[tuple[float, float]] = []
    run = {"flame": run_flame, "raw": run_raw, "trainer": run_trainer}[a.worker]
    loss = run(a, stamps)
    with open(a.out, "w") as f:
        json.dump({"stamps": stamps, "loss": loss, "threads": torch.get_num_threads()}, f)
    return 0


# ---- the driver ---------------------------------------------------------------------------------------


def steady_tokens_per_second(stamps: list[list[float]], warmup: int, tokens_per_step: int) -> tuple[float, float]:
    """Tokens per wall-clock second and per CPU second of steps ``warmup + 1 .. len(stamps) - 1``
    (1-based), from the (wall, CPU) timestamps taken at the start of every step."""
    first, last = stamps[warmup], stamps[-1]
    tokens = (len(stamps) - warmup - 1) * tokens_per_step
    return tokens / (last[0] - first[0]), tokens / (last[1] - first[1])


def launch(variant: str, a: argparse.Namespace, work: str) -> dict:
    out = os.path.join(work, f"{variant}.json")
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", variant, "--out", out, "--work", work,
        "--data", a.data, "--tokenizer", a.tokenizer, "--model-config", a.model_config, "--steps", str(a.steps),
        "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--threads", str(a.threads),
    ]  # fmt: skip
    threads = str(a.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{variant} run failed (exit code {proc.returncode})")
    with open(out) as f:
        result = json.load(f)
    if len(result["stamps"]) != a.steps:
        raise SystemExit(f"{variant}: {len(result['stamps'])} step timestamps for {a.steps} steps")
    result["process_seconds"] = time.perf_counter() - start
    wall, cpu = steady_tokens_per_second(result["stamps"], a.warmup, a.batch_size * a.seq_len)
    result["tokens_per_second"], result["tokens_per_cpu_second"] = wall, cpu
    return result


NAMES = {"flame": "flame (1 process, Python API)", "raw": "raw PyTorch loop", "trainer": "transformers.Trainer"}


def report(a: argparse.Namespace, runs: dict[str, list[dict]], loads: list[str], seconds: float) -> str:
    tps = {v: [r["tokens_per_second"] for r in runs[v]] for v in VARIANTS}
    cps = {v: [r["tokens_per_cpu_second"] for r in runs[v]] for v in VARIANTS}
    med = {v: common.median(tps[v]) for v in VARIANTS}
    cpu = {v: common.median(cps[v]) for v in VARIANTS}
    rows = [
        [NAMES[v], f"{med[v]:,.0f}", f"{1000 * a.batch_size * a.seq_len / med[v]:,.1f}", common.spread(tps[v]),
         f"{cpu[v]:,.0f}", " ".join(f"{x:,.0f}" for x in tps[v])]
        for v in VARIANTS
    ]  # fmt: skip
    ratios = common.table(
        ["ratio of the medians", "wall clock", "CPU time", "target"],
        [
            ["flame / raw", f"**{med['flame'] / med['raw']:.3f}**", f"{cpu['flame'] / cpu['raw']:.3f}", "≥ 0.97"],
            ["flame / Trainer", f"**{med['flame'] / med['trainer']:.3f}**", f"{cpu['flame'] / cpu['trainer']:.3f}", "≥ 1.2"],
        ],
    )  # fmt: skip
    pairs = zip(runs["flame"], runs["raw"], runs["trainer"], strict=True)
    per_round = "; ".join(
        f"{f['tokens_per_second'] / r['tokens_per_second']:.3f} / {f['tokens_per_second'] / t['tokens_per_second']:.3f}"
        for f, r, t in pairs
    )
    return f"""Command: `{common.command_line()}`

Machine: {common.machine()}. Date: {common.today()}. Load average (`uptime`) before each round:
{"; ".join(loads)}. Run time {seconds / 60:.1f} min.

Setup: model `{os.path.relpath(a.model_config, ROOT) if a.model != "tiny" else "tiny (benchmarks/trainer_overhead.py TINY_MODEL)"}`
({a.num_params / 1e6:.2f}M parameters), float32, batch {a.batch_size} x {a.seq_len} tokens, {a.threads} thread(s),
{a.steps} steps per run, {a.rounds} rounds interleaved flame, raw, Trainer, each run a fresh process.
Steady state only: tokens/s over steps {a.warmup + 1}–{a.steps - 1} (whole loop iterations, data and
logging included); start-up (imports, model build, data set-up) and the first {a.warmup} steps excluded.
"CPU" is tokens per CPU-second of the process (all threads), less sensitive to other jobs on the machine.

{common.table(["variant", "tokens/s (median)", "ms/step", "min / max vs median", "tokens/CPU-s", "per round"], rows)}

{ratios}

flame/raw / flame/Trainer per round: {per_round}."""


def count_params(model_config: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_config))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 14 steps (a smoke run; not appended)")
    p.add_argument("--model", choices=("demo", "tiny"), default="demo", help="demo: configs/llama_demo.json")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every variant (default 1, see RESULTS.md)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--json-out", default="")
    # worker mode (internal)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-config", default=str(MODEL_CONFIG), help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default=str(DEMO_DIR / "tokenizer"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.quick:
        a.rounds, a.steps, a.warmup = 2, 14, 4
    if a.steps < a.warmup + 3:
        p.error("--steps must exceed --warmup by at least 3")

    from flame.data.demo import build_demo

    build_demo(str(DEMO_DIR), verbose=False)  # the tokenizer (built once if missing)
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = []
    with tempfile.TemporaryDirectory() as work:
        a.data = work
        if a.model == "tiny":
            a.model_config = os.path.join(work, "llama_tiny.json")
            with open(a.model_config, "w") as f:
                json.dump(TINY_MODEL, f)
        a.num_params = count_params(a.model_config)
        make_data(work, a.tokenizer, a.steps * a.batch_size, a.seq_len)
        for r in range(a.rounds):
            loads.append(common.load_average())
            for v in VARIANTS:
                result = launch(v, a, work)
                runs[v].append(result)
                print(
                    f"round {r + 1}/{a.rounds} {v:8s} {result['tokens_per_second']:9,.0f} tokens/s "
                    f"{result['tokens_per_cpu_second']:9,.0f} tokens/CPU-s (loss {result['loss']:.3f}, "
                    f"process {result['process_seconds']:.1f} s)",
                    flush=True,
                )
    text = report(a, runs, loads, time.perf_counter() - start)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"runs": runs, "loads": loads}, f)
    if not a.no_append and not a.quick:
        title = f"Trainer overhead, {a.model} model: flame, a raw PyTorch loop, transformers.Trainer (`benchmarks/trainer_overhead.py`)"
        common.append_section(title, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
