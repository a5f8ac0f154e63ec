"""The golden record: per-step loss and gradient norm of one tiny CPU run, stored in the repository.

Layout and resume tests compare two runs with each other, so a change that shifts both sides alike (the
weight initialisation, the data order, the loss) passes them all. This record pins one run to numbers
measured once: ``tests/test_golden.py`` trains the same run and compares step by step.

    python -m tests.golden                     # train the run and compare it with the record (a table)
    python -m tests.golden --regenerate --reason "why the numbers moved"   # rewrite the record

Regenerate only for a change that is meant to move the numbers, and say why: the reason is kept in the
record (and belongs in the commit message too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

RECORD = Path(__file__).parent / "assets" / "golden" / "tiny_llama_cpu.json"

# Tolerances: the run is fp32 on one CPU process, so on one machine it repeats bit for bit; another x86
# CPU may pick other vector kernels and move the sums in the last bits. A changed init, data order or
# loss moves step losses by 1e-2 or more (tests/test_golden.py shows it).
LOSS_ABS_TOL = 1e-4
GRAD_NORM_REL_TOL = 1e-3

STEPS = 12


def flags(folder: Path) -> list[str]:
    """The run: the test fixtures' byte tokenizer, fixed documents and tiny Llama, written into ``folder``."""
    from tests.conftest import make_byte_tokenizer, write_fixed_docs, write_tiny_llama

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_byte_tokenizer(str(folder / "tokenizer"))
    docs = write_fixed_docs(folder / "train.jsonl")
    model = write_tiny_llama(folder / "llama_tiny.json")
    values = {
        "job.dump_folder": str(folder / "run"),
        "model.config": model,
        "model.tokenizer_path": tokenizer,
        "training.dataset": "json",
        "training.data_files": docs,
        "training.seq_len": "32",
        "training.batch_size": "4",
        "training.steps": str(STEPS),
        "training.mixed_precision_param": "float32",
        "training.seed": "42",
        "lr_scheduler.warmup_steps": "2",
        "optimizer.lr": "3e-3",
        "metrics.log_freq": "1",
    }
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def train(folder: Path, extra: list[str] = ()) -> list[dict]:
    """Train the golden run in this process; its per-step records (step, loss, grad_norm, lr)."""
    import flame
    from flame.config.loader import parse_args

    config = parse_args([*flags(folder), *extra])
    flame.train(config)
    with open(Path(config.job.dump_folder) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: row[k] for k in ("step", "loss", "grad_norm", "lr")} for row in rows]


def load() -> dict:
    return json.loads(RECORD.read_text())


def mismatches(records: list[dict], golden: dict) -> list[str]:
    """Every step where ``records`` leave the golden record's tolerances (empty: they match)."""
    expected = golden["records"]
    if [r["step"] for r in records] != [r["step"] for r in expected]:
        return [f"steps {[r['step'] for r in records]} != golden steps {[r['step'] for r in expected]}"]
    out = []
    for got, want in zip(records, expected, strict=True):
        if abs(got["loss"] - want["loss"]) > LOSS_ABS_TOL:
            out.append(f"step {got['step']}: loss {got['loss']:.6f} != golden {want['loss']:.6f}")
        if abs(got["grad_norm"] - want["grad_norm"]) > GRAD_NORM_REL_TOL * want["grad_norm"]:
            out.append(f"step {got['step']}: grad_norm {got['grad_norm']:.6f} != golden {want['grad_norm']:.6f}")
        if got["lr"] != want["lr"]:
            out.append(f"step {got['step']}: lr {got['lr']} != golden {want['lr']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--regenerate", action="store_true", help="rewrite the record from this run")
    parser.add_argument("--reason", default="", help="why the numbers moved (required with --regenerate)")
    args = parser.parse_args(argv)
    if args.regenerate and not args.reason.strip():
        parser.error("--regenerate needs --reason: say why the numbers are meant to move")
    with tempfile.TemporaryDirectory() as tmp:
        records = train(Path(tmp))
    if args.regenerate:
        import torch

        record = {
            "what": "per-step loss, gradient norm and lr of tests/golden.py's run (one CPU process, fp32)",
            "command": "python -m tests.golden --regenerate --reason '...'",
            "loss_abs_tol": LOSS_ABS_TOL,
            "grad_norm_rel_tol": GRAD_NORM_REL_TOL,
            "reason": args.reason.strip(),
            "generated": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "records": records,
        }
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({k: v for k, v in record.items() if k != "records"}, indent=1)[:-2]
        rows = ",\n".join("  " + json.dumps(r) for r in records)
        RECORD.write_text(f'{header},\n "records": [\n{rows}\n ]\n}}\n')
        print(f"wrote {RECORD} ({len(records)} steps)")
        return 0
    golden = load()
    print(f"{'step':>4} {'loss':>10} {'golden':>10} {'grad_norm':>10} {'golden':>10}")
    for got, want in zip(records, golden["records"], strict=False):
        print(
            f"{got['step']:>4} {got['loss']:>10.6f} {want['loss']:>10.6f} {got['grad_norm']:>10.6f} {want['grad_norm']:>10.6f}"
        )
    problems = mismatches(records, golden)
    print("\n".join(problems) if problems else "matches the golden record")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
