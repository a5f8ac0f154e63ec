"""Where the teacher comes from, what it is, and whether it speaks the student's tokenizer.

``--distill.teacher`` is either

* a **flame run folder** (``config.toml`` and ``checkpoint/step-N``): the checkpoint at ``teacher_step``
  (-1: the latest complete one) is read directly from DCP, with the run's own model config, norm type,
  custom model path and tokenizer (from its ``config.toml``); or
* a **Hugging Face folder** (``config.json`` and ``*.safetensors``).

A run folder that also holds a Hugging Face export (train.sh writes one into the dump folder) is read as a
run, so ``teacher_step`` picks among its checkpoints.

The teacher's **identity** is recorded in the student's checkpoints: its path, step and a fingerprint
(SHA-256 over the model config's bytes and, for every weights file, its name, size and three 1 MiB samples
of its bytes: the start, the middle and the end; files up to 3 MiB are hashed whole). Sampling keeps a
70B teacher's fingerprint to a few reads while any retraining or conversion changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from flame.config.errors import ConfigError

_SAMPLE = 1 << 20  # bytes per sample of a weights file


@dataclass(frozen=True)
class TeacherSource:
    """A resolved ``--distill.teacher``."""

    kind: str  # "run" (flame DCP checkpoint) or "hf" (Hugging Face folder)
    path: str  # the folder the user named, absolute
    weights: str  # the DCP step folder, or the Hugging Face folder
    step: int | None  # run: the checkpoint step
    model_config: str  # a JSON file or folder AutoConfig reads
    tokenizer: str  # the teacher's tokenizer folder ("" when the folder has none)
    norm_type: str = ""
    custom_model_path: str = ""

    def describe(self) -> str:
        return f"{self.path} (step {self.step})" if self.kind == "run" else self.path


def _is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.toml")) and os.path.isdir(os.path.join(path, "checkpoint"))


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(path)
    )


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


def resolve_teacher(path: str, step: int = -1) -> TeacherSource:
    """The teacher at ``path`` (``step``: a run folder's checkpoint, -1 the latest), or a ConfigError."""
    from flame.utils._checkpoint_io import available_steps

    flag = "--distill.teacher"
    if not os.path.exists(path):
        raise ConfigError(f"{flag}: {path!r} does not exist (a Hugging Face model folder or a flame run folder)")
    if not os.path.isdir(path):
        raise ConfigError(f"{flag}: {path!r} is not a folder (a Hugging Face model folder or a flame run folder)")
    path = os.path.abspath(path)
    if _is_run(path):
        root = os.path.join(path, "checkpoint")
        steps = available_steps(root)
        if not steps:
            raise ConfigError(f"{flag} {path}: the run has no complete checkpoint (step-N/.metadata) in {root}")
        if step == -1:
            step = steps[-1]
        if step not in steps:
            raise ConfigError(
                f"--distill.teacher_step {step}: {os.path.join(root, f'step-{step}')} is not a complete checkpoint of "
                f"the teacher run (complete steps: {', '.join(map(str, steps))})"
            )
        with open(os.path.join(path, "config.toml"), "rb") as f:
            run = tomllib.load(f)
        model = run.get("model", {})
        model_config = str(model.get("config", ""))
        tokenizer = str(model.get("tokenizer_path", ""))
        if not model_config or not os.path.exists(model_config):
            raise ConfigError(
                f"{flag} {path}: its config.toml names model.config {model_config!r}, which does not exist from "
                f"here ({os.getcwd()}); run from the folder the teacher was trained from"
            )
        return TeacherSource(
            "run",
            path,
            os.path.join(root, f"step-{step}"),
            step,
            model_config,
            tokenizer if os.path.exists(tokenizer) else "",  # elsewhere: checked on sizes only
            str(model.get("norm_type", "")),
            str(run.get("experimental", {}).get("custom_model_path", "")),
        )
    if step != -1:
        raise ConfigError(
            f"--distill.teacher_step {step} only applies to a flame run folder (config.toml and checkpoint/); "
            f"{path} is not one"
        )
    if not _is_hf(path):
        raise ConfigError(
            f"{flag}: {path} is neither a Hugging Face model folder (config.json and *.safetensors) nor a flame "
            "run folder (config.toml and checkpoint/step-N)"
        )
    return TeacherSource("hf", path, path, None, path, path if _has_tokenizer(path) else "")


def config_vocab_size(source: TeacherSource) -> int | None:
    """The ``vocab_size`` the teacher's model config declares (None if it declares none)."""
    file = (
        os.path.join(source.model_config, "config.json") if os.path.isdir(source.model_config) else source.model_config
    )
    with open(file) as f:
        data = json.load(f)
    value = data.get("vocab_size", data.get("text_config", {}).get("vocab_size"))
    return int(value) if value is not None else None


def _vocab(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def tokenizer_problem(student_tokenizer_path: str, source: TeacherSource, student_tokenizer: Any = None) -> str | None:
    """Why the teacher cannot teach a student with this tokenizer (None when it can).

    Token-level KD compares the two distributions id by id, so the tokenizers must map the same strings to
    the same ids. A teacher without a tokenizer of its own is accepted when its output layer covers the
    student's vocabulary (the check is then on sizes only)."""
    from transformers import AutoTokenizer

    student = student_tokenizer or AutoTokenizer.from_pretrained(student_tokenizer_path)
    size = len(student)
    teacher_vocab = config_vocab_size(source)
    if source.tokenizer:
        try:
            teacher = AutoTokenizer.from_pretrained(source.tokenizer)
        except (OSError, ValueError) as e:
            return f"--distill.teacher {source.describe()}: its tokenizer {source.tokenizer!r} cannot be loaded ({e})"
        if _vocab(teacher) != _vocab(student):
            return (
                f"--distill.teacher {source.describe()}: its tokenizer {source.tokenizer} ({len(teacher):,} tokens) "
                f"differs from the student's --model.tokenizer_path {student_tokenizer_path} ({size:,} tokens); "
                "token-level distillation compares the distributions id by id and needs the same tokenizer"
            )
    if teacher_vocab is not None and teacher_vocab < size:
        return (
            f"--distill.teacher {source.describe()}: its output layer has {teacher_vocab:,} rows, fewer than the "
            f"{size:,} tokens of --model.tokenizer_path {student_tokenizer_path}; it cannot have been trained with it"
        )
    return None


def _file_digest(path: str, digest: Any) -> None:
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        if size <= 3 * _SAMPLE:
            digest.update(f.read())
            return
        for offset in (0, size // 2, size - _SAMPLE):
            f.seek(offset)
            digest.update(f.read(_SAMPLE))


def fingerprint(source: TeacherSource) -> str:
    """SHA-256 (hex, first 16 characters) of the teacher's model config and weights files (see module doc)."""
    digest = hashlib.sha256()
    config = (
        os.path.join(source.model_config, "config.json") if os.path.isdir(source.model_config) else source.model_config
    )
    _file_digest(config, digest)
    for name in sorted(os.listdir(source.weights)):
        file = os.path.join(source.weights, name)
        if os.path.isfile(file) and (source.kind == "run" or name.endswith(".safetensors")):
            _file_digest(file, digest)
    return digest.hexdigest()[:16]


def identity(source: TeacherSource) -> dict[str, Any]:
    """What the student's checkpoint records about its teacher."""
    return {"path": source.path, "kind": source.kind, "step": source.step, "fingerprint": fingerprint(source)}
