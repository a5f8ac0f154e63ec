"""Validation loss of flame against a minimal PyTorch loop that draws packed rows in a random order.

    python benchmarks/training_quality.py [--quick] [--steps 300] [--seeds 42] [--corpora stdlib,docs]
        [--no-append] [--json-out results.json]

Same model, data, hyper-parameters and steps for every loop: a Llama-style model (4 layers, hidden 96,
4 heads with 2 KV heads, MLP 256) on a 2,048-token byte-level BPE trained on each corpus' train split,
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), 20 warmup steps then cosine decay to 0.1 x lr,
batches of 8 x 128 tokens, fp32, gradient clipping at 1.0, one process. The loops:

* ``flame``: flame's Trainer with the default data order (the sequence shuffle on);
* ``flame, stream order``: ``--training.sequence_shuffle_buffer 0`` (flame's order before the shuffle:
  documents shuffled, consecutive packed rows batched);
* ``reference``: a plain loop over the same train documents (seeded document order, joined with EOS,
  cut into rows of 129 tokens) whose batches are rows drawn in a random order from all of them.

Every model's validation loss is computed the same way, here: the mean token cross entropy over the
same held-out rows (the validation documents joined with EOS, cut into 129-token rows, 256 of them
evenly spaced).
The reference's learning rate at every step is checked against the one flame logged.

Corpora: ``stdlib``, the demo corpus (``python -m flame.data.demo``: this Python's standard library,
files cut into ~2,000-character pieces); ``docs``, the text documentation installed under
/usr/share/doc (Markdown, reStructuredText and plain-text files, gzipped ones included: the Node.js API
reference, git's release notes and manuals, pip's docs, protocol specifications, ...; licenses and
change logs left out), one document per file (long documents: up to half a million characters),
6 % of the files held out by a stable hash of the path (as the demo does with 2 %). Also reported: distinct
documents per batch of each loop's first ``--steps`` batches.

The results are appended to benchmarks/RESULTS.md (not with ``--quick``: 30 steps, small corpora, or
``--no-append``). Target: flame / reference <= 1.02 on every corpus.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SEQ_LEN, BATCH, VOCAB, VAL_ROWS = 128, 8, 2048, 256
HYPER = {"lr": 3e-3, "warmup": 20, "lr_min": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "clip": 1.0}
MODEL = {
    "model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": VOCAB,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}  # fmt: skip
DOC_SUFFIXES = (".md", ".txt", ".rst")
# Not documentation: licenses, and change logs (lists of commits and version numbers).
SKIP = re.compile(r"copyright|license|changelog|news|history|status|changes", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ corpora


def build_docs_corpus(out: str, max_files: int | None = None) -> dict[str, str]:
    """train.jsonl, validation.jsonl and a tokenizer from /usr/share/doc's text documentation (cached)."""
    from flame.data.demo import _hash_bucket, _write_jsonl, train_tokenizer

    paths = {k: os.path.join(out, f"{k}.jsonl") for k in ("train", "validation")}
    paths["tokenizer"] = os.path.join(out, "tokenizer")
    manifest = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest) and json.load(open(manifest)).get("max_files") == max_files:
        return paths
    docs, seen = [], set()
    for folder, _, names in sorted(os.walk("/usr/share/doc")):
        for name in sorted(names):
            stem = name[:-3] if name.endswith(".gz") else name
            if not stem.lower().endswith(DOC_SUFFIXES) or SKIP.search(os.path.join(folder, stem)):
                continue
            path = os.path.join(folder, name)
            try:
                raw = gzip.open(path).read() if name.endswith(".gz") else open(path, "rb").read()
                text = raw.decode("utf-8").strip()
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            if len(text) < 200 or text in seen:  # stubs; packages that ship the same file twice
                continue
            seen.add(text)
            docs.append({"text": text, "path": os.path.relpath(path, "/usr/share/doc")})
    docs = docs[:max_files] if max_files else docs
    # 6 % of the files held out (by a stable hash of the path, as the demo does with 2 %): enough rows
    held = {d["path"] for d in docs if _hash_bucket(d["path"]) < 600}
    train = [d for d in docs if d["path"] not in held]
    validation = [d for d in docs if d["path"] in held]
    os.makedirs(out, exist_ok=True)
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["validation"], validation)
    train_tokenizer([d["text"] for d in train], VOCAB, paths["tokenizer"])
    with open(manifest, "w") as f:
        json.dump({"max_files": max_files, "train": len(train), "validation": len(validation)}, f)
    return paths


def corpus_paths(name: str, cache: str, quick: bool) -> dict[str, str]:
    if name == "stdlib":
        from flame.data.demo import build_demo

        built = build_demo(os.path.join(cache, "stdlib"), vocab_size=VOCAB, max_files=150 if quick else None,
                           verbose=False)  # fmt: skip
        return built["paths"]
    return build_docs_corpus(os.path.join(cache, "docs"), max_files=150 if quick else None)


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def packed_rows(tokenizer, texts: list[str], order=None):
    """Texts (in ``order``) joined with EOS and cut into rows of SEQ_LEN + 1 tokens, with each row's
    first and last document (serial numbers in that order; an int64 tensor ``[rows, SEQ_LEN + 1]`` and
    ``[rows, 2]``)."""
    import numpy as np
    import torch

    ids, owner = [], []
    eos = tokenizer.eos_token_id
    encoded = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    for serial, k in enumerate(order if order is not None else range(len(texts))):
        if encoded[k].ids:
            ids += [*encoded[k].ids, eos]
            owner += [serial] * (len(encoded[k].ids) + 1)
    n = len(ids) // (SEQ_LEN + 1)
    rows = torch.tensor(ids[: n * (SEQ_LEN + 1)]).view(n, SEQ_LEN + 1)
    doc = np.asarray(owner[: n * (SEQ_LEN + 1)]).reshape(n, SEQ_LEN + 1)
    return rows, torch.from_numpy(np.stack([doc[:, 0], doc[:, -1]], axis=1))


# ----------------------------------------------------------------------------------------- training


def lr_factor(step: int, steps: int) -> float:
    """The learning-rate factor of 0-indexed ``step``: linear warmup, one step at the peak, then cosine
    down to lr_min over ``steps - warmup`` steps (torchtitan's schedule, which flame uses)."""
    warmup = HYPER["warmup"]
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (steps - warmup)
    return HYPER["lr_min"] + (1 - HYPER["lr_min"]) * 0.5 * (1 + math.cos(math.pi * progress))


def validation_loss(model, rows) -> float:
    """Mean token cross entropy of ``model`` over ``rows`` (inputs rows[:, :-1], targets rows[:, 1:])."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in rows.split(32):
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return total / count


def train_flame(paths: dict, model_config: str, steps: int, seed: int, buffer: int | None, folder: str, val_rows):
    """flame's Trainer in this process; returns (validation loss, logged lr per step, distinct documents
    per batch)."""
    import flame
    from flame.config.loader import parse_args
    from flame.data import build_dataloader
    from flame.data.sequence_shuffle import distinct_documents

    flags = {
        "job.dump_folder": folder, "model.config": model_config, "model.tokenizer_path": paths["tokenizer"],
        "training.dataset": "json", "training.data_files": paths["train"], "training.seq_len": SEQ_LEN,
        "training.batch_size": BATCH, "training.steps": steps, "training.mixed_precision_param": "float32",
        "training.max_norm": HYPER["clip"], "training.seed": seed, "optimizer.lr": HYPER["lr"],
        "optimizer.eps": HYPER["eps"], "optimizer.weight_decay": HYPER["weight_decay"],
        "optimizer.beta1": HYPER["betas"][0], "optimizer.beta2": HYPER["betas"][1],
        "lr_scheduler.warmup_steps": HYPER["warmup"], "lr_scheduler.decay_type": "cosine",
        "lr_scheduler.lr_min": HYPER["lr_min"], "metrics.log_freq": 1, "metrics.disable_color_printing": True,
    }  # fmt: skip
    if buffer is not None:
        flags["training.sequence_shuffle_buffer"] = buffer
    config = parse_args([item for k, v in flags.items() for item in (f"--{k}", str(v))])
    trainer = flame.Trainer(config)
    try:
        trainer.train()
        loader = iter(build_dataloader(config.training, trainer.tokenizer, document_spans=True))
        distinct = [distinct_documents(next(loader)["document_span"]) for _ in range(steps)]
        loss = validation_loss(trainer.model, val_rows)
    finally:
        trainer.close()
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        lrs = {r["step"]: r["lr"] for r in map(json.loads, f) if "lr" in r}
    return loss, lrs, distinct


def train_reference(paths: dict, model_config: str, steps: int, seed: int, tokenizer, val_rows):
    """The minimal loop: random rows of the seeded-document-order stream; returns (loss, lrs, distinct)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from flame.data.sequence_shuffle import distinct_documents

    texts = read_texts(paths["train"])
    order = np.random.default_rng(seed).permutation(len(texts))
    rows, spans = packed_rows(tokenizer, texts, order)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(rows), generator=generator)[: steps * BATCH].view(steps, BATCH)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_config)
    config.vocab_size = len(tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    h = HYPER
    opt = torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=h["betas"], eps=h["eps"],
                            weight_decay=h["weight_decay"], foreach=True)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps))
    lrs, distinct = {}, []
    model.train()
    for step in range(steps):
        batch = rows[pick[step]]
        distinct.append(distinct_documents(spans[pick[step]]))
        lrs[step + 1] = opt.param_groups[0]["lr"]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), h["clip"])
        opt.step()
        schedule.step()
    return validation_loss(model, val_rows), lrs, distinct


def run_corpus(name: str, args: argparse.Namespace, tmp: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    paths = corpus_paths(name, args.cache, args.quick)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model_config = os.path.join(tmp, "model.json")
    with open(model_config, "w") as f:
        json.dump({**MODEL, "vocab_size": len(tokenizer)}, f)
    train_texts = read_texts(paths["train"])
    val_rows, _ = packed_rows(tokenizer, read_texts(paths["validation"]))
    # VAL_ROWS rows evenly spaced over all held-out rows: not all from the first (maybe long) file
    val_rows = val_rows[torch.linspace(0, len(val_rows) - 1, min(VAL_ROWS, len(val_rows))).long()]
    lengths = [len(e.ids) + 1 for e in tokenizer.backend_tokenizer.encode_batch_fast(train_texts)]
    result: dict = {
        "corpus": name, "train_documents": len(train_texts), "train_tokens": sum(lengths),
        "tokens_per_document": sum(lengths) / len(lengths), "validation_rows": len(val_rows), "runs": {},
    }  # fmt: skip
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        loops = [("flame", None), ("flame, stream order", 0)]
        loops += [(f"flame, buffer {n}", n) for n in args.extra_buffers] + [("reference", None)]
        for loop, buffer in loops:
            start = time.perf_counter()
            if loop == "reference":
                loss, lrs, distinct = train_reference(paths, model_config, args.steps, seed, tokenizer, val_rows)
            else:
                folder = os.path.join(tmp, f"{name}-{seed}-{buffer}")
                loss, lrs, distinct = train_flame(paths, model_config, args.steps, seed, buffer, folder, val_rows)
                result.setdefault("flame_lrs", lrs)
            run = result["runs"].setdefault(loop, {"validation_loss": [], "distinct_documents": [], "seconds": []})
            run["validation_loss"].append(loss)
            run["distinct_documents"].append(sum(distinct) / len(distinct))
            run["seconds"].append(time.perf_counter() - start)
            if loop == "reference":  # the same schedule as flame's, step by step
                flame_lrs = result["flame_lrs"]
                differ = [(s, lrs[s], flame_lrs[s]) for s in flame_lrs if abs(lrs[s] - flame_lrs[s]) > 1e-12]
                assert not differ, f"learning rates differ from flame's (step, reference, flame): {differ[:3]}"
            print(f"{name} seed {seed} {loop}: validation loss {run['validation_loss'][-1]:.4f}, "
                  f"{run['distinct_documents'][-1]:.2f} documents per batch", flush=True)  # fmt: skip
    result.pop("flame_lrs", None)
    mean = {loop: sum(r["validation_loss"]) / len(r["validation_loss"]) for loop, r in result["runs"].items()}
    result["ratio_flame_vs_reference"] = mean["flame"] / mean["reference"]
    result["ratio_stream_order_vs_reference"] = mean["flame, stream order"] / mean["reference"]
    return result


def report(args: argparse.Namespace, results: list[dict]) -> str:
    import common

    lines = [
        f"Command: `{common.command_line()}`; {common.machine()}; {common.today()}; load average at the start "
        f"{args.load}. Llama 4 layers x hidden 96 (GQA 4/2 heads), {VOCAB}-token BPE per corpus, AdamW 3e-3, warmup "
        f"20, cosine to 0.1, batch {BATCH} x {SEQ_LEN}, {args.steps} steps, fp32, clip 1.0, one process; seeds "
        f"{', '.join(map(str, args.seeds))}. Validation loss: mean token cross entropy on the same "
        f"{VAL_ROWS} held-out rows of 129 tokens (evenly spaced over the held-out files) for every model, "
        "computed by this script.",
        "",
        "| corpus | documents (tokens/doc) | loop | validation loss | / reference | documents per batch |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        ref = sum(r["runs"]["reference"]["validation_loss"]) / len(r["runs"]["reference"]["validation_loss"])
        for loop, run in r["runs"].items():
            loss = sum(run["validation_loss"]) / len(run["validation_loss"])
            docs = sum(run["distinct_documents"]) / len(run["distinct_documents"])
            lines.append(
                f"| {r['corpus']} | {r['train_documents']:,} ({r['tokens_per_document']:,.0f}) | {loop} | "
                f"{loss:.3f} | {loss / ref:.3f} | {docs:.1f} |"
            )
    lines.append("")
    ok = all(r["ratio_flame_vs_reference"] <= 1.02 for r in results)
    lines.append(f"Target flame / reference <= 1.02: {'met' if ok else 'NOT met'} on every corpus.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import common

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42])
    parser.add_argument("--corpora", default="stdlib,docs")
    parser.add_argument("--cache", default=str(ROOT / "data" / "training_quality"), help="built corpora (reused)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--extra-buffers", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                        help="also train flame with these --training.sequence_shuffle_buffer values")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="30 steps, 150 files per corpus; not appended")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 30)
    args.load = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_corpus(name, args, tmp) for name in args.corpora.split(",")]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    text = report(args, results)
    print(text)
    if not args.quick and not args.no_append:
        common.append_section(
            "Training quality: flame against a random-row reference loop (`benchmarks/training_quality.py`)", text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
