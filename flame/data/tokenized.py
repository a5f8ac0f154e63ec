"""Folders of pre-tokenized documents, as written by ``python -m flame.utils.preprocess``.

Such a folder is a ``Dataset.save_to_disk`` folder with one ``input_ids`` column (one row per
source document, in the source's order, empty documents kept as empty rows so that the seeded
document order is the one online tokenization gives) plus ``flame_tokenized.json``, which names
the tokenizer by a fingerprint. Training reads it without running the tokenizer, after checking
that the fingerprint matches ``--model.tokenizer_path``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from flame.config.errors import ConfigError

META_FILE = "flame_tokenized.json"
FORMAT = 1
COLUMN = "input_ids"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, pre-tokenizer),
    truncation and padding left out since flame never uses them."""
    from tokenizers import Tokenizer

    inner = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    copy = Tokenizer.from_str(inner.to_str())
    copy.no_truncation()
    copy.no_padding()
    return hashlib.sha256(copy.to_str().encode("utf-8")).hexdigest()


def is_tokenized_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def read_meta(path: str, described: str = "") -> dict[str, Any]:
    """The metadata of a preprocessed folder; ConfigError when it is unreadable or of another format.

    ``described``: the folder as messages name it (``--training.dataset 'data/tok'``)."""
    described = described or repr(path)
    file = os.path.join(path, META_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{described}: cannot read {file} ({e})") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"{described} was written by another flame version (format {meta.get('format')}, "
            f"this one reads {FORMAT}); preprocess it again with python -m flame.utils.preprocess"
        )
    return meta


def check_tokenizer(described: str, meta: dict[str, Any], tokenizer: Any, eos_id: int) -> None:
    """Raise ConfigError unless ``tokenizer`` is the one the folder (``described``, as messages name it)
    was tokenized with."""
    if meta.get("tokenizer_sha256") != tokenizer_fingerprint(tokenizer) or meta.get("eos_token_id") != eos_id:
        raise ConfigError(
            f"{described} was tokenized with another tokenizer "
            f"({meta.get('tokenizer_path')!r}) than --model.tokenizer_path "
            f"{getattr(tokenizer, 'name_or_path', '') or '?'!r}; train with that tokenizer, or preprocess the data "
            "again with python -m flame.utils.preprocess --tokenizer_path <your tokenizer>"
        )


def write_meta(path: str, meta: dict[str, Any]) -> None:
    """Write the metadata last (atomically): its presence marks a finished folder."""
    tmp = os.path.join(path, META_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=2)
    os.replace(tmp, os.path.join(path, META_FILE))
