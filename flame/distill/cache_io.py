"""The offline teacher cache's files: writing them, checking them against a run, reading them back.

``python -m flame.distill.cache`` (``flame/distill/cache.py``, the command) writes a cache with
``write_cache``; ``cache_problems`` (run by the config checks) says why a cache cannot serve a run;
``TeacherCache`` reads one data-parallel rank's rows during training. The format and the checks are
described in ``flame/distill/cache.py``'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import torch

from flame.config.errors import ConfigError

logger = logging.getLogger("flame.distill")

VERSION = 1
# [training] fields that do not change which rows a data-parallel rank sees (everything else counts)
_NOT_DATA = {
    "steps", "max_norm", "skip_nan_inf", "max_consecutive_bad_steps", "deterministic", "compile", "gc_freq",
    "mixed_precision_param", "mixed_precision_reduce", "data_parallel_replicate_degree",
    "data_parallel_shard_degree", "tensor_parallel_degree", "disable_loss_parallel", "enable_cpu_offload",
    "pin_memory", "prefetch_factor", "persistent_workers",
}  # fmt: skip


def row_fingerprints(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """One 64-bit hash per row of a loader batch (its input ids, labels and, for varlen, positions)."""
    parts = [batch["input_ids"], batch["labels"]] + ([batch["position_ids"]] if "position_ids" in batch else [])
    arrays = [p.detach().cpu().numpy().astype(np.int64) for p in parts]
    out = np.empty(arrays[0].shape[0], dtype=np.int64)
    for i in range(len(out)):
        digest = hashlib.blake2b(digest_size=8)
        for a in arrays:
            digest.update(a[i].tobytes())
        out[i] = int.from_bytes(digest.digest(), "little", signed=True)
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def data_settings(config: Any, world_size: int) -> dict[str, Any]:
    """What decides the rows: the data fields of ``[training]`` and the data-parallel world size."""
    import dataclasses

    from flame.distributed.parallel_dims import resolve_dp_shard

    fields = {f.name: getattr(config.training, f.name) for f in dataclasses.fields(config.training)}
    settings = {f"training.{k}": v for k, v in fields.items() if k not in _NOT_DATA}
    dp = config.training.data_parallel_replicate_degree * resolve_dp_shard(config, world_size)
    settings["data-parallel ranks"] = dp
    return settings


def read_meta(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "meta.json")
    if not os.path.isdir(folder):
        raise ConfigError(
            f"--distill.teacher_cache {folder!r} does not exist; write it with python -m flame.distill.cache"
        )
    if not os.path.isfile(path):
        raise ConfigError(
            f"--distill.teacher_cache {folder!r} holds no meta.json; write it with python -m flame.distill.cache"
        )
    with open(path) as f:
        return json.load(f)


def cache_problems(config: Any, world_size: int, tokenizer: Any) -> list[str]:
    """Why the cache at ``--distill.teacher_cache`` cannot serve this run (empty: it can)."""
    d = config.distill
    try:
        meta = read_meta(d.teacher_cache)
    except ConfigError as e:
        return e.problems
    where = f"--distill.teacher_cache {d.teacher_cache}"
    if not meta.get("complete"):
        return [f"{where} is incomplete (its writer stopped); write it again with python -m flame.distill.cache"]
    expected = {
        **data_settings(config, world_size),
        "distill.top_k": d.top_k,
        "distill.temperature": d.temperature,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    stored = {**meta["data"], "distill.top_k": meta["top_k"], "distill.temperature": meta["temperature"],
              "tokenizer": meta["tokenizer"]}  # fmt: skip
    differ = [
        f"{key} {stored.get(key)!r} there, {value!r} here"
        for key, value in expected.items()
        if stored.get(key) != (list(value) if isinstance(value, tuple) else value)
    ]
    problems = []
    if differ:
        problems.append(f"{where} was made for another config: {'; '.join(differ)}")
    if meta["steps"] < config.training.steps:
        problems.append(f"{where} covers {meta['steps']} steps, fewer than --training.steps {config.training.steps}")
    if d.teacher and meta["teacher"]["path"] != os.path.abspath(d.teacher):
        problems.append(f"{where} was made with teacher {meta['teacher']['path']}, not --distill.teacher {d.teacher}")
    return problems


class TeacherCache:
    """This data-parallel rank's cached rows, read (memory-mapped) micro-batch by micro-batch."""

    def __init__(self, folder: str, dp_rank: int, config: Any) -> None:
        self.folder, self.meta = folder, read_meta(folder)
        self.batch_size = config.training.batch_size
        self.accumulation = config.training.gradient_accumulation_steps
        rank = os.path.join(folder, f"rank-{dp_rank}")
        self.arrays = {n: np.load(os.path.join(rank, f"{n}.npy"), mmap_mode="r") for n in _ARRAYS}
        self.teacher = self.meta["teacher"]

    def targets(self, step: int, micro: int, batch: dict[str, torch.Tensor]):
        """The ``TopKTargets`` of micro-batch ``micro`` of optimizer step ``step`` (1-based) for the loader
        batch ``batch`` (before any sequence sharding); raises RuntimeError if its rows differ."""
        from flame.distill.divergences import TopKTargets

        first = ((step - 1) * self.accumulation + micro) * self.batch_size
        rows = slice(first, first + batch["input_ids"].shape[0])
        stored = np.asarray(self.arrays["fingerprints"][rows])
        actual = row_fingerprints(batch)
        if stored.shape != actual.shape or not np.array_equal(stored, actual):
            bad = int(np.argmax(stored != actual)) if stored.shape == actual.shape else 0
            raise RuntimeError(
                f"--distill.teacher_cache {self.folder}: row {bad} of micro-batch {micro} of step {step} is not the "
                "row the cache was made for (its token fingerprint differs): the data, seed, batch or layout changed "
                "since python -m flame.distill.cache ran; write the cache again for this config"
            )
        ids, logprobs, rest = (
            torch.from_numpy(np.array(self.arrays[n][rows])) for n in ("ids", "logprobs", "log_rest")
        )
        return TopKTargets(ids.long(), logprobs, rest)


_ARRAYS = ("ids", "logprobs", "log_rest", "fingerprints")


def write_cache(config: Any, world_size: int) -> dict[str, Any]:
    """Run the teacher over every row of the run and write the cache (see the module docstring)."""
    from flame.data.loader import build_dataloader
    from flame.distill.divergences import topk_targets
    from flame.distill.source import resolve_teacher
    from flame.distill.teacher import Teacher
    from flame.distill.vocab import VocabView
    from flame.distributed.setup import device_for_rank, init_distributed
    from flame.models.build import load_tokenizer

    from torchtitan.distributed.parallel_dims import ParallelDims

    d, t = config.distill, config.training
    folder = d.teacher_cache
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    source = resolve_teacher(d.teacher, d.teacher_step)
    owns = init_distributed(config.comm.init_timeout_seconds)
    try:
        dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
        dims.build_mesh()
        device = device_for_rank()
        teacher = Teacher(source, tokenizer, config, dims, device)
        settings = data_settings(config, world_size)
        num_ranks = settings["data-parallel ranks"]
        rows = t.steps * t.gradient_accumulation_steps * t.batch_size
        os.makedirs(folder, exist_ok=True)
        meta = {
            "version": VERSION, "complete": False, "teacher": teacher.identity, "top_k": d.top_k,
            "temperature": d.temperature, "tokenizer": tokenizer_fingerprint(tokenizer), "data": settings,
            "steps": t.steps, "rows_per_rank": rows, "bytes_per_token": 8 * d.top_k + 4,
        }  # fmt: skip
        _write_meta(folder, meta)
        view = VocabView(len(tokenizer))
        for rank in range(num_ranks):
            out = os.path.join(folder, f"rank-{rank}")
            os.makedirs(out, exist_ok=True)
            shape = (rows, t.seq_len, d.top_k)
            arrays = {
                "ids": np.lib.format.open_memmap(os.path.join(out, "ids.npy"), "w+", np.int32, shape),
                "logprobs": np.lib.format.open_memmap(os.path.join(out, "logprobs.npy"), "w+", np.float32, shape),
                "log_rest": np.lib.format.open_memmap(os.path.join(out, "log_rest.npy"), "w+", np.float32, shape[:2]),
                "fingerprints": np.lib.format.open_memmap(
                    os.path.join(out, "fingerprints.npy"), "w+", np.int64, (rows,)
                ),
            }
            loader = build_dataloader(t, tokenizer, dp_rank=rank, dp_world_size=num_ranks)
            batches = _forever(loader)
            done = 0
            while done < rows:
                batch = next(batches)
                n = batch["input_ids"].shape[0]
                logits = teacher.logits(batch)
                flat = logits.reshape(-1, logits.shape[-1])
                chunk = d.chunk_size or flat.shape[0]
                parts = [
                    topk_targets(flat[i : i + chunk], view, d.top_k, d.temperature) for i in range(0, len(flat), chunk)
                ]
                for name in ("ids", "logprobs", "log_rest"):
                    values = torch.cat([getattr(p, name) for p in parts]).cpu().numpy()
                    arrays[name][done : done + n] = values.reshape(n, *arrays[name].shape[1:])
                arrays["fingerprints"][done : done + n] = row_fingerprints(batch)
                done += n
            for array in arrays.values():
                array.flush()
            logger.info("teacher cache: data-parallel rank %d: %d rows written to %s", rank, rows, out)
        meta["complete"] = True
        _write_meta(folder, meta)
        return meta
    finally:
        if owns:
            torch.distributed.destroy_process_group()


def _forever(loader):
    while True:
        yield from loader


def _write_meta(folder: str, meta: dict[str, Any]) -> None:
    tmp = os.path.join(folder, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, default=str)
    os.replace(tmp, os.path.join(folder, "meta.json"))
