"""Build the demo corpus: the Python standard library's own sources, plus a BPE tokenizer.

Every machine with Python has this corpus (about 1,800 files, 30 MB), so examples, tests and
benchmarks can train on real text without network access.

    python -m flame.data.demo [--out data/demo] [--vocab-size 4096] [--force] [--max-files N]

Output folder::

    train.jsonl        {"text", "path", "chunk"} records: files (~98 %) cut at blank lines into pieces of
                       about 2,000 characters, so that a shuffled batch mixes many files
    validation.jsonl   the other files, chosen by a stable hash of the file's relative path
    tokenizer/         byte-level BPE, loadable with transformers.AutoTokenizer
    manifest.json      what was built; a rerun with the same settings reuses the outputs

Train with ``--training.dataset data/demo`` (``load_dataset`` finds both splits by file name)
or ``--training.dataset data/demo/train.jsonl``, and ``--model.tokenizer data/demo/tokenizer``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from typing import Any

from flame.config.errors import ConfigError

EOS = "<|endoftext|>"
MANIFEST_FORMAT = 2
CHUNK_CHARS = 2000  # documents are pieces of files, so a batch mixes many files
VALIDATION_PER_10K = 200  # 2 % of files go to validation
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(max_files: int | None = None) -> tuple[str, list[str]]:
    """The stdlib root and its ``.py`` files as sorted relative POSIX paths.

    ``max_files`` keeps an evenly spaced subset (for tests), still sorted and deterministic.
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        rel = os.path.relpath(folder, root)
        for name in names:
            if name.endswith(".py"):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    found.sort()
    if max_files is not None and 0 < max_files < len(found):
        step = len(found) / max_files
        found = [found[int(i * step)] for i in range(max_files)]
    return root, found


def _hash_bucket(rel_path: str) -> int:
    """A stable bucket in 0..9999 for a path (sha1: the same on every machine and run)."""
    return int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big") % 10_000


def split_documents(docs: list[dict[str, str]]) -> tuple[list[dict], list[dict]]:
    """Split documents into (train, validation) by the stable hash of their path.

    About 2 % land in validation; if the hash picks none (tiny corpora), the document with the
    smallest bucket does, so both splits exist whenever there are at least two documents.
    """
    val_paths = {d["path"] for d in docs if _hash_bucket(d["path"]) < VALIDATION_PER_10K}
    if not val_paths and len(docs) >= 2:
        val_paths = {min((d["path"] for d in docs), key=_hash_bucket)}
    train = [d for d in docs if d["path"] not in val_paths]
    val = [d for d in docs if d["path"] in val_paths]
    return train, val


def chunk_documents(docs: list[dict[str, str]], max_chars: int = CHUNK_CHARS) -> list[dict[str, Any]]:
    """Cut each file at blank lines into pieces of at most about ``max_chars`` characters.

    A whole stdlib file is ~5,000 tokens: packed rows would then come from one or two files per
    batch and the loss would swing with the file at hand. Pieces keep their file's path; the
    train/validation split is made on whole files before this, so no file is in both.
    """
    out: list[dict[str, Any]] = []
    for doc in docs:
        pieces, current = [], ""
        for paragraph in doc["text"].split("\n\n"):
            if current and len(current) + len(paragraph) + 2 > max_chars:
                pieces.append(current)
                current = paragraph
            else:
                current = f"{current}\n\n{paragraph}" if current else paragraph
        if current.strip():
            pieces.append(current)
        out.extend({"text": piece, "path": doc["path"], "chunk": i} for i, piece in enumerate(pieces))
    return out


def _write_jsonl(path: str, docs: list[dict]) -> None:
    """Write one JSON record per line, atomically (tmp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str) -> Any:
    """Train a byte-level BPE on ``texts`` and save it where AutoTokenizer can load it.

    ``<|endoftext|>`` is the only special token and serves as bos/eos/unk/pad (GPT-2 style;
    byte-level BPE never needs unk). Returns the transformers tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    wrapped.save_pretrained(out_dir)
    return wrapped


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_demo(
    out_dir: str = "data/demo",
    vocab_size: int = 4096,
    force: bool = False,
    max_files: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the stdlib demo corpus and tokenizer under ``out_dir``.

    Outputs are reused when ``manifest.json`` matches the vocab size, Python version, number of
    stdlib files and ``max_files``; ``force`` rebuilds. Returns the manifest plus ``out_dir``,
    the output paths and ``reused`` (bool). Raises ConfigError for a vocab size too small to
    hold the 256 byte symbols and the special token.
    """
    if vocab_size < 257:
        raise ConfigError(f"--vocab-size {vocab_size}: must be at least 257 (256 bytes + EOS)")
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    paths = {
        "train": os.path.join(out_dir, "train.jsonl"),
        "validation": os.path.join(out_dir, "validation.jsonl"),
        "tokenizer": os.path.join(out_dir, "tokenizer"),
        "manifest": os.path.join(out_dir, "manifest.json"),
    }
    root, files = stdlib_files(max_files)
    key = {
        "format": MANIFEST_FORMAT,
        "vocab_size": vocab_size,
        "python_version": platform.python_version(),
        "file_count": len(files),
        "max_files": max_files,
    }
    old = _read_manifest(paths["manifest"])
    outputs_exist = all(os.path.exists(p) for p in paths.values())
    if not force and old and outputs_exist and all(old.get(k) == v for k, v in key.items()):
        say(f"demo corpus in {out_dir} is up to date (manifest matches); reusing it")
        return {**old, "out_dir": out_dir, "paths": paths, "reused": True}

    say(f"reading {len(files)} .py files from {root}")
    docs, skipped_utf8, skipped_empty, text_bytes = [], 0, 0, {}
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped_utf8 += 1
            continue
        if not text.strip():  # empty __init__.py files would only add lone EOS tokens
            skipped_empty += 1
            continue
        docs.append({"text": text, "path": rel})
        text_bytes[rel] = len(raw)
    train_files, val_files = split_documents(docs)
    train, val = chunk_documents(train_files), chunk_documents(val_files)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(paths["manifest"]):
        os.remove(paths["manifest"])  # a half-finished rebuild must not look complete
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["validation"], val)
    train_bytes = sum(text_bytes[d["path"]] for d in train_files)  # UTF-8 text, not JSON
    val_bytes = sum(text_bytes[d["path"]] for d in val_files)
    say(
        f"wrote {len(train)} train / {len(val)} validation documents from "
        f"{len(train_files)} / {len(val_files)} files "
        f"({skipped_utf8} not UTF-8, {skipped_empty} empty skipped)"
    )

    t1 = time.perf_counter()
    say(f"training byte-level BPE tokenizer (vocab {vocab_size}) on the train split")
    train_texts = [d["text"] for d in train]
    wrapped = train_tokenizer(train_texts, vocab_size, paths["tokenizer"])
    encodings = wrapped.backend_tokenizer.encode_batch_fast(train_texts, add_special_tokens=False)
    train_tokens = sum(len(e.ids) for e in encodings)
    t2 = time.perf_counter()

    manifest = {
        **key,
        "train_files": len(train_files),
        "validation_files": len(val_files),
        "train_documents": len(train),
        "validation_documents": len(val),
        "train_bytes": train_bytes,
        "validation_bytes": val_bytes,
        "skipped_not_utf8": skipped_utf8,
        "skipped_empty": skipped_empty,
        "train_tokens": train_tokens,
        "tokens_per_document": round(train_tokens / max(1, len(train)), 1),
        "bytes_per_token": round(train_bytes / max(1, train_tokens), 2),
        "build_seconds": round(t2 - t0, 2),
        "tokenizer_seconds": round(t2 - t1, 2),
    }
    tmp = paths["manifest"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, paths["manifest"])  # written last: its presence means the build finished
    say(
        f"done in {t2 - t0:.1f}s: {len(docs)} documents, {train_bytes + val_bytes:,} text bytes, "
        f"{train_tokens:,} train tokens ({manifest['tokens_per_document']} tokens/doc, "
        f"{manifest['bytes_per_token']} bytes/token); tokenizer in {paths['tokenizer']}"
    )
    return {**manifest, "out_dir": out_dir, "paths": paths, "reused": False}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m flame.data.demo",
        description="Build a demo corpus from the Python standard library's sources and train "
        "a byte-level BPE tokenizer on it.",
    )
    parser.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--max-files", type=int, default=None, help="use only N evenly spaced files (quick tests)")
    args = parser.parse_args(argv)
    try:
        build_demo(args.out, args.vocab_size, args.force, args.max_files)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
