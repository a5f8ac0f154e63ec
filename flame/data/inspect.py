"""``python -m flame.data.inspect``: look at exactly the batches training would see.

    python -m flame.data.inspect --job.config_file configs/demo.toml [--steps 20] [--rank 0]
        [--world_size 2] [--samples 2] [--json] [any --section.key flag of flame.train]

It builds the data loader of one data-parallel rank (``--rank``, out of the data-parallel ranks
that ``--world_size`` processes give under the config's parallel degrees; default ``$NGPU x
$NNODE`` or 1) with the training code itself, draws ``--steps`` optimizer steps of batches
(``gradient_accumulation_steps`` micro-batches each) and reports:

* decoded sample rows with every document boundary marked;
* each source's realized share of documents and tokens next to its requested probability;
* packing efficiency: the fraction of label positions that carry a target (flame never pads;
  varlen masks the last token of every document piece);
* the loader's throughput in tokens per second (after its first batch, i.e. without start-up);
* how many distinct documents a batch holds, with the config's sequence shuffle and in stream
  order (``--training.sequence_shuffle_buffer 0``: flame's order before the shuffle) side by side.

``--json`` prints the same facts as one JSON object (``sources``, ``packing_efficiency``,
``tokens_per_second``, ...). Exit codes: 0, 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from typing import Any

from flame.config.errors import ConfigError

BOUNDARY = "\n═════ document boundary ═════\n"
PIECE = "\n───── piece boundary (the document goes on; attention restarts) ─────\n"


def _segments(row: dict[str, Any], eos_id: int) -> list[list[int]]:
    """A row's token runs between document boundaries (varlen: segments; plain: after each EOS)."""
    ids = row["input_ids"].tolist()
    if "position_ids" in row:
        starts = [i for i, p in enumerate(row["position_ids"].tolist()) if p == 0]
    else:
        starts = [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t == eos_id]
    bounds = [*starts, len(ids)]
    return [ids[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def inspect_batches(config: Any, tokenizer: Any, *, rank: int, dp_world_size: int, steps: int, samples: int) -> dict:
    """Draw ``steps`` steps of batches for data-parallel ``rank`` and collect the report's facts."""
    from flame.data import build_dataloader
    from flame.data.sequence_shuffle import distinct_documents
    from flame.data.varlen import label_stats

    t = config.training
    loader = build_dataloader(t, tokenizer, dp_rank=rank, dp_world_size=dp_world_size, document_spans=True)
    batches_per_step = t.gradient_accumulation_steps
    iterator = iter(loader)
    start = time.perf_counter()
    first_done = start
    positions = targets = tokens = 0
    sample_rows: list[list[dict[str, Any]]] = []
    distinct: list[int] = []
    for i in range(steps * batches_per_step):
        batch = next(iterator)
        distinct.append(distinct_documents(batch.pop("document_span")))
        if i == 0:
            first_done = time.perf_counter()
            for r in range(min(samples, batch["input_ids"].shape[0])):
                row = {k: v[r] for k, v in batch.items() if k in ("input_ids", "position_ids")}
                segments = _segments(row, tokenizer.eos_token_id)
                eos = tokenizer.eos_token_id
                sample_rows.append(
                    [
                        # a segment after one that ended with EOS starts a document; else it continues one
                        {
                            "text": tokenizer.decode(seg, skip_special_tokens=False),
                            "starts_document": not j or segments[j - 1][-1] == eos,
                        }
                        for j, seg in enumerate(segments)
                    ]
                )
        else:
            tokens += batch["input_ids"].numel()
        n, k = label_stats(batch["labels"])
        positions, targets = positions + n, targets + k
    seconds = time.perf_counter() - first_done
    counts = loader.source_counts()
    dataset = loader.dataset
    stream_order = distinct
    if dataset.window_steps > 1:  # the same batches in stream order, for comparison
        unshuffled = dataclasses.replace(t, sequence_shuffle_buffer=0)
        plain = iter(build_dataloader(unshuffled, tokenizer, dp_rank=rank, dp_world_size=dp_world_size,
                                      document_spans=True))  # fmt: skip
        stream_order = [distinct_documents(next(plain)["document_span"]) for _ in distinct]
    num_docs, num_tokens = max(int(counts[0].sum()), 1), max(int(counts[1].sum()), 1)
    sources = [
        {
            "name": name,
            "dataset": source.spec,
            "requested": prob,
            "realized_documents": int(counts[0][i]),
            "realized_tokens": int(counts[1][i]),
            "document_share": int(counts[0][i]) / num_docs,
            "token_share": int(counts[1][i]) / num_tokens,
        }
        for i, (name, source, prob) in enumerate(zip(dataset.names, dataset.sources, dataset.probs, strict=True))
    ]
    return {
        "rank": rank,
        "dp_world_size": dp_world_size,
        "steps": steps,
        "batches": steps * batches_per_step,
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "varlen": bool(t.varlen),
        "context_len": t.context_len if t.varlen else t.seq_len,
        "streaming": bool(t.streaming),
        "num_workers": t.num_workers,
        "sources": sources,
        "label_positions": positions,
        "packing_efficiency": targets / max(positions, 1),
        "boundary_masked_fraction": (positions - targets) / max(positions, 1),
        "padding_fraction": 0.0,  # rows are always full: flame packs, it never pads
        "tokens_per_second": tokens / seconds if tokens and seconds > 0 else None,
        "sequence_shuffle_window_steps": dataset.window_steps,
        "sequence_shuffle_rows": dataset.window_steps * dataset.window_lanes,
        "documents_per_batch": sum(distinct) / len(distinct),
        "documents_per_batch_stream_order": sum(stream_order) / len(stream_order),
        "samples": sample_rows,
    }


def format_report(report: dict) -> str:
    """The human-readable report."""
    lines = [
        f"data-parallel rank {report['rank']} of {report['dp_world_size']}: {report['batches']} batches of "
        f"{report['batch_size']} x {report['seq_len']} tokens ({'varlen, context_len ' + str(report['context_len']) if report['varlen'] else 'plain windows'}"
        f"{', streaming' if report['streaming'] else ''}, {report['num_workers']} workers)",
        "",
    ]
    for r, segments in enumerate(report["samples"]):
        lines.append(f"──── sample row {r} of the first batch: {len(segments)} segment(s) ────")
        text = ""
        for j, seg in enumerate(segments):
            if j:
                text += BOUNDARY if seg["starts_document"] else PIECE
            text += seg["text"]
        lines += [text, ""]
    lines.append(f"{'source':<24} {'requested':>9} {'documents':>10} {'share':>7} {'tokens':>12} {'share':>7}")
    for s in report["sources"]:
        lines.append(
            f"{s['name'][:24]:<24} {s['requested']:>9.1%} {s['realized_documents']:>10,} {s['document_share']:>7.1%} "
            f"{s['realized_tokens']:>12,} {s['token_share']:>7.1%}"
        )
    lines.append(
        f"packing efficiency: {report['packing_efficiency']:.2%} of label positions carry a target "
        f"({report['boundary_masked_fraction']:.2%} masked at document and piece ends, {report['padding_fraction']:.0%} padding)"
    )
    shuffle = (
        f"sequence shuffle: windows of {report['sequence_shuffle_window_steps']} steps, "
        f"{report['sequence_shuffle_rows']} rows on this rank"
        if report["sequence_shuffle_window_steps"] > 1
        else "no sequence shuffle"
    )
    lines.append(
        f"distinct documents per batch: {report['documents_per_batch']:.2f} ({shuffle}); "
        f"{report['documents_per_batch_stream_order']:.2f} in stream order (--training.sequence_shuffle_buffer 0)"
    )
    tps = report["tokens_per_second"]
    lines.append(f"loader throughput: {tps:,.0f} tokens/s" if tps else "loader throughput: needs --steps >= 2")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m flame.data.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of batches to draw (default 10)")
    parser.add_argument("--rank", type=int, default=0, help="data-parallel rank to inspect (default 0)")
    default_world = int(os.environ.get("NGPU", "1")) * int(os.environ.get("NNODE", "1"))
    parser.add_argument(
        "--world_size", type=int, default=default_world, help="processes of the run (default NGPU x NNODE)"
    )
    parser.add_argument("--samples", type=int, default=2, help="rows of the first batch to decode")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        from flame.config.loader import parse_args
        from flame.data.checks import data_problems, shuffle_problems
        from flame.distributed.parallel_dims import resolve_dp_shard

        config = parse_args(rest)
        problems = data_problems(config.training, ignored_flags=True)
        if args.steps < 1:
            problems.append(f"--steps must be >= 1, got {args.steps}")
        dp_world = config.training.data_parallel_replicate_degree * resolve_dp_shard(config, args.world_size)
        problems += shuffle_problems(config.training, dp_world)
        if not 0 <= args.rank < dp_world:
            problems.append(
                f"--rank {args.rank} is outside the {dp_world} data-parallel ranks of --world_size {args.world_size}"
            )
        if problems:
            raise ConfigError(problems)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model.tokenizer_path {config.model.tokenizer_path!r} cannot be loaded: {e}") from e
        report = inspect_batches(
            config, tokenizer, rank=args.rank, dp_world_size=dp_world, steps=args.steps, samples=args.samples
        )
    except ConfigError as e:
        print(f"flame: error: {e.format()}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
