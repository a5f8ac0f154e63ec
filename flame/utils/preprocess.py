"""``python -m flame.utils.preprocess``: tokenize a dataset offline, into a folder training reads directly.

    python -m flame.utils.preprocess --dataset json --data_files data/demo/train.jsonl \\
        --tokenizer_path data/demo/tokenizer --output data/demo_tokenized [--num_proc 4]

The dataset flags mean what ``--training.*`` flags of the same names mean (one dataset per
call). The output is a ``Dataset.save_to_disk`` folder with an ``input_ids`` column, one row per
source document in the source's order (empty documents kept as empty rows, so the seeded
document order equals the online one), plus ``flame_tokenized.json`` with the tokenizer's
fingerprint. Pass the folder as ``--training.dataset``: training detects it, checks the tokenizer
against ``--model.tokenizer_path`` and skips tokenization; the batches are the same as with
online tokenization of the same data and seed. Tokenization runs in ``--num_proc`` processes
(``datasets.map``). Exit codes: 0 done, 2 bad input (one message, nothing written).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from typing import Any

from flame.config.errors import ConfigError

_TOKENIZER: Any = None  # the backend tokenizer, inherited by datasets.map's worker processes


def _tokenize(batch: dict[str, list], column: str) -> dict[str, list]:
    from flame.data.documents import encode_documents

    return {"input_ids": encode_documents(_TOKENIZER, batch[column])}


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--tokenizer_path {path!r} cannot be loaded by AutoTokenizer: {first}") from e


def preprocess(args: argparse.Namespace) -> dict[str, Any]:
    """Tokenize the dataset named by ``args`` into ``args.output``; returns the metadata written."""
    global _TOKENIZER
    import datasets
    import pyarrow.compute as pc

    from flame.config.schema import Training
    from flame.data.flags import training_flags
    from flame.data.loader import backend_tokenizer
    from flame.data.sources import load_source, pick_text_column, resolve_source
    from flame.data.tokenized import COLUMN, tokenizer_fingerprint, write_meta

    if os.path.exists(args.output) and os.listdir(args.output) and not args.overwrite:
        raise ConfigError(f"--output {args.output!r} exists and is not empty; pass --overwrite to replace it")
    if args.num_proc < 1:
        raise ConfigError(f"--num_proc must be >= 1, got {args.num_proc}")
    tokenizer = _load_tokenizer(args.tokenizer_path)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"--tokenizer_path {args.tokenizer_path!r}: the tokenizer has no eos_token")
    training = dataclasses.replace(
        Training(),
        dataset=[args.dataset],
        dataset_name=[args.dataset_name],
        dataset_split=[args.dataset_split],
        data_dir=[args.data_dir],
        data_files=[args.data_files],
    )
    src = resolve_source(training_flags(training, section=""), 0)  # messages name this tool's --data_files
    if src.kind == "tokenized":
        raise ConfigError(f"--dataset {args.dataset!r} is already a preprocessed folder")
    ds = load_source(src)
    column = pick_text_column(ds, args.text_column, src.described, "--text_column")
    _TOKENIZER = backend_tokenizer(tokenizer)
    start = time.perf_counter()
    features = datasets.Features({COLUMN: datasets.Sequence(datasets.Value("int32"))})
    out = ds.select_columns([column]).map(
        _tokenize,
        batched=True,
        batch_size=args.batch_size,
        num_proc=args.num_proc if args.num_proc > 1 else None,
        remove_columns=[column],
        features=features,
        fn_kwargs={"column": column},
        desc="tokenizing",
    )
    if os.path.exists(args.output):
        shutil.rmtree(args.output)
    out.save_to_disk(args.output)
    num_tokens = pc.sum(pc.list_value_length(out.data.column(COLUMN))).as_py() or 0
    meta = {
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "tokenizer_path": args.tokenizer_path,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "source": {k: getattr(args, k) for k in ("dataset", "dataset_name", "dataset_split", "data_dir", "data_files")},
        "text_column": column,
        "num_documents": len(out),
        "num_tokens": num_tokens,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_meta(args.output, meta)
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flame.utils.preprocess",
        description="Tokenize a dataset offline into a folder that --training.dataset reads without a tokenizer.",
    )
    parser.add_argument("--dataset", required=True, help="hub name, local file or folder, or a builder (json, ...)")
    parser.add_argument("--dataset_name", default="", help="the dataset's config name")
    parser.add_argument("--dataset_split", default="train", help="the split to tokenize (default train)")
    parser.add_argument("--data_dir", default="", help="data_dir of the dataset")
    parser.add_argument("--data_files", default="", help="data files or globs, ';' between several")
    parser.add_argument("--text_column", default="", help="column with the text (default: text, else content)")
    parser.add_argument(
        "--tokenizer_path", required=True, help="the tokenizer training will use (--model.tokenizer_path)"
    )
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--batch_size", type=int, default=1000, help="documents per tokenizer call")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (2: bad input)."""
    args = build_parser().parse_args(argv)
    try:
        meta = preprocess(args)
    except ConfigError as e:
        print(f"flame: error: {e.format()}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['num_documents']:,} documents ({meta['num_tokens']:,} tokens) to {args.output} "
        f"in {meta['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
