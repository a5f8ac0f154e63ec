"""Flambé's Table 1 from a finished distillation experiment: teacher, scratch and distilled students by seed.

    python -m flame.distill.table configs/experiments/distill_demo.toml [--teacher teacher]
        [--pairs scratch:distilled,scratch_limited:distilled_limited] [--json]

For each pair of stages (the scratch students and the distilled ones, trials paired by ``training.seed``):
the validation loss (the experiment's metric) of each seed, the teacher's (the best trial of ``--teacher``),
parameters of each model, the paired improvement d = L_scratch − L_distilled, the gap closed
g = d / (L_scratch − L_teacher), and the mean of d against the spread of the paired differences (their
sample standard deviation and their range).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tomllib
from typing import Any


def _params(dump_folder: str) -> int:
    from flame.models.build import build_meta_model, load_model_config, load_tokenizer

    with open(f"{dump_folder}/config.toml", "rb") as f:
        model = tomllib.load(f)["model"]
    config = load_model_config(model["config"], load_tokenizer(model["tokenizer_path"]))
    return sum(p.numel() for p in build_meta_model(config).parameters())


def _by_seed(stage: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["params"]["training.seed"]: t for t in stage["trials"] if t["status"] == "done"}


def distill_table(status: dict[str, Any], teacher: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The numbers of the table from ``flame.experiment status --json`` output."""
    stages = {s["name"]: s for s in status["stages"]}
    best = min((t for t in stages[teacher]["trials"] if t["status"] == "done"), key=lambda t: t["metric"])
    out: dict[str, Any] = {
        "teacher": {"loss": best["metric"], "params": _params(best["dump_folder"])},
        "pairs": [],
    }
    for scratch_name, distilled_name in pairs:
        scratch, distilled = _by_seed(stages[scratch_name]), _by_seed(stages[distilled_name])
        seeds = sorted(set(scratch) & set(distilled))
        rows = []
        for seed in seeds:
            ls, ld = scratch[seed]["metric"], distilled[seed]["metric"]
            rows.append({"seed": seed, "scratch": ls, "distilled": ld, "d": ls - ld,
                         "g": (ls - ld) / (ls - best["metric"])})  # fmt: skip
        diffs = [r["d"] for r in rows]
        out["pairs"].append({
            "scratch": scratch_name, "distilled": distilled_name, "rows": rows,
            "params": _params(scratch[seeds[0]]["dump_folder"]) if seeds else None,
            "mean_d": statistics.mean(diffs) if diffs else None,
            "std_d": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "range_d": max(diffs) - min(diffs) if diffs else None,
            "mean_g": statistics.mean(r["g"] for r in rows) if rows else None,
        })  # fmt: skip
    return out


def markdown(numbers: dict[str, Any]) -> str:
    teacher = numbers["teacher"]
    lines = []
    for pair in numbers["pairs"]:
        lines += [
            f"| seed | teacher ({teacher['params'] / 1e6:.2f}M) | {pair['scratch']} ({pair['params'] / 1e6:.2f}M) "
            f"| {pair['distilled']} ({pair['params'] / 1e6:.2f}M) | d = scratch − distilled | gap closed g |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in pair["rows"]:
            lines.append(
                f"| {r['seed']} | {teacher['loss']:.4f} | {r['scratch']:.4f} | {r['distilled']:.4f} | "
                f"{r['d']:+.4f} | {100 * r['g']:.1f} % |"
            )
        lines.append(
            f"| mean | | | | **{pair['mean_d']:+.4f}** (spread: std {pair['std_d']:.4f}, range "
            f"{pair['range_d']:.4f}) | **{100 * pair['mean_g']:.1f} %** |"
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--teacher", default="teacher")
    parser.add_argument("--pairs", default="scratch:distilled")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from flame.experiments import api

    status = api.status(args.spec)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",")]
    numbers = distill_table(status, args.teacher, pairs)  # type: ignore[arg-type]
    print(json.dumps(numbers, indent=1) if args.json else markdown(numbers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
