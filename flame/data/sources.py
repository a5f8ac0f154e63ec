"""Finding, checking and loading the text sources named by ``--training.dataset`` (or ``--validation.dataset``).

A source is one of:

* a ``datasets`` builder name (``json``, ``parquet``, ``text``, ``arrow``, ``csv``, ...) with
  ``--training.data_files`` and/or ``--training.data_dir``;
* a local data file (``.jsonl``, ``.json``, ``.parquet``, ``.txt``, ``.csv``, ``.arrow``): its
  builder is taken from the extension;
* a local folder, either one written by ``python -m flame.utils.preprocess`` (pre-tokenized,
  see ``flame.data.tokenized``), one written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``
  (read with ``load_from_disk``) or a folder of data files (read with ``load_dataset``, which
  infers splits from the file names, e.g. ``train.jsonl`` and ``validation.jsonl``);
* anything else is taken as a Hugging Face hub dataset name.

``--training.data_files`` holds one entry per dataset; one entry may name several files or
globs separated by ``;`` (e.g. ``"a/*.jsonl;b/extra.jsonl"``). Relative entries are resolved
the way ``datasets`` resolves them: against ``--training.data_dir`` (or the working directory)
for a builder, against the folder (plus ``data_dir``) for a local folder. ``datasets`` puts
``data_files`` into one split named ``train``: when another split is asked of them (the validation
section's default is ``validation``), that one split is read and the choice logged.

Everything that can be checked on the local disk is checked before ``datasets`` does any work,
so a typo fails in milliseconds with a message naming the flag, not deep inside a worker. Every
message names the flags of the section the dataset came from (``DatasetFlags``).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from flame.config.errors import ConfigError
from flame.data.flags import DatasetFlags
from flame.data.tokenized import is_tokenized_folder

logger = logging.getLogger("flame.data")

# Builder names that `datasets` ships (datasets.packaged_modules); kept here so that checking a
# source does not need to import `datasets` (about a second) just to classify a name.
BUILDERS = frozenset({"csv", "json", "pandas", "parquet", "arrow", "text", "xml", "hdf5", "webdataset", "lance"})
# File extension -> builder, for a dataset given as a single local file.
EXTENSION_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}
_STRING_DTYPES = ("string", "large_string")


@dataclass
class Source:
    """One checked dataset source; ``kind`` is "builder", "folder", "disk", "tokenized" or "hub"."""

    spec: str  # the --training.dataset (or --validation.dataset) entry as given
    kind: str
    path: str  # what load_dataset / load_from_disk receives
    flags: DatasetFlags  # the section the entry came from: messages name its flags
    name: str = ""
    split: str = "train"
    data_dir: str = ""
    data_files: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The dataset as messages name it: the entry, plus its data files for a builder name."""
        if self.spec in BUILDERS and self.data_files:
            return f"{self.spec} ({';'.join(self.data_files)})"
        return self.spec

    @property
    def described(self) -> str:
        """The flag and the dataset, for messages: ``--validation.dataset 'json (valid.jsonl)'``; the
        training datasets read for validation say so."""
        text = f"{self.flags.flag('dataset')} {self.label!r}"
        return text + " (read for validation: --validation.dataset is empty)" if self.flags.borrowed else text


def split_data_files(entry: str) -> list[str]:
    """Split one ``--training.data_files`` entry on ``;`` into its paths/globs (blanks dropped)."""
    return [part.strip() for part in entry.split(";") if part.strip()]


def _entry(values: list[Any], index: int, default: Any, broadcast: bool = False) -> Any:
    """The per-dataset entry ``index`` of a list flag; a missing or empty entry means default.

    ``broadcast``: a single entry applies to every dataset (``--training.dataset_split``)."""
    if broadcast and len(values) == 1:
        index = 0
    if index < len(values) and values[index] not in ("", None):
        return values[index]
    return default


def _check_files(spec: str, patterns: list[str], base: str, flags: DatasetFlags) -> None:
    """Raise ConfigError for each data_files path/glob (relative to ``base``) that finds nothing."""
    problems = []
    files, data_dir = flags.flag("data_files"), flags.flag("data_dir")
    for pattern in patterns:
        if "://" in pattern:  # remote (hf://, s3://...): only datasets can check it
            continue
        path = os.path.expanduser(pattern)
        if not os.path.isabs(path):
            path = os.path.join(base, path)
        if glob.has_magic(path):
            if not [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]:
                problems.append(
                    f"{files} {pattern!r} (dataset {spec!r}): the glob matches no "
                    f"files (looked in {os.path.dirname(path) or '.'!r})"
                )
        elif os.path.isdir(path):
            problems.append(
                f"{files} {pattern!r} (dataset {spec!r}) is a folder; give files or "
                f"a glob such as 'folder/*.jsonl', or pass the folder as {data_dir}"
            )
        elif not os.path.isfile(path):
            problems.append(f"{files} {pattern!r} (dataset {spec!r}): no such file ({path!r})")
    if problems:
        raise ConfigError(problems)


def _is_saved_to_disk(folder: str) -> bool:
    """True for a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    return has("dataset_dict.json") or (has("state.json") and has("dataset_info.json"))


def _looks_local(spec: str) -> bool:
    """A spec that can only mean a local path (hub names are "owner/name" or "name")."""
    return (
        spec.startswith(("/", "./", "../", "~"))
        or os.path.splitext(spec)[1].lower() in EXTENSION_BUILDERS
        or spec.count("/") > 1
    )


def resolve_source(flags: DatasetFlags, index: int = 0) -> Source:
    """Classify and check dataset ``index`` of a section's dataset flags; no data is read.

    Raises ConfigError for a missing file/folder, a data_files glob matching nothing, a builder
    without files, or data_files/data_dir given where they cannot apply.
    """
    spec = str(flags.dataset[index]).strip()
    name = _entry(flags.dataset_name, index, "")
    # An empty split entry means the datasets library's own default split.
    split = _entry(flags.dataset_split, index, "train", broadcast=True)
    data_dir = _entry(flags.data_dir, index, "")
    files = split_data_files(_entry(flags.data_files, index, ""))
    src = Source(spec, "hub", spec, flags, name, split, data_dir, files)
    f_dataset, f_files, f_dir, f_name = (flags.flag(k) for k in ("dataset", "data_files", "data_dir", "dataset_name"))

    if spec in BUILDERS:
        src.kind = "builder"
        if not files and not data_dir:
            raise ConfigError(
                f"{f_dataset} {spec!r} is a datasets builder and needs {f_files} (paths or globs, several "
                f"separated by ';') or {f_dir}"
            )
        if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
            raise ConfigError(f"{f_dir} {data_dir!r} (dataset {spec!r}): no such folder")
        src.data_dir = os.path.expanduser(data_dir)
        _check_files(spec, files, src.data_dir or os.getcwd(), flags)
        return src

    local = os.path.expanduser(spec)
    if os.path.isfile(local):
        builder = EXTENSION_BUILDERS.get(os.path.splitext(local)[1].lower())
        if builder is None:
            raise ConfigError(
                f"{f_dataset} {spec!r} is a file with an unknown extension; allowed: "
                f"{', '.join(sorted(EXTENSION_BUILDERS))} (or name a builder such as 'json' and "
                f"pass the file as {f_files})"
            )
        if files or data_dir:
            raise ConfigError(f"{f_dataset} {spec!r} is a single file; {f_files} and {f_dir} do not apply to it")
        src.kind, src.path, src.data_files = "builder", builder, [local]
        return src

    if os.path.isdir(local):
        src.path = local
        if is_tokenized_folder(local) or _is_saved_to_disk(local):
            src.kind = "tokenized" if is_tokenized_folder(local) else "disk"
            if files or data_dir or name:
                what = (
                    "preprocessed (tokenized) folder" if src.kind == "tokenized" else "folder written by save_to_disk"
                )
                raise ConfigError(
                    f"{f_dataset} {spec!r} is a {what}; {f_name}, {f_files} and {f_dir} do not apply to it"
                )
            return src
        src.kind = "folder"
        base = os.path.join(local, data_dir) if data_dir else local
        if data_dir and not os.path.isdir(base):
            raise ConfigError(f"{f_dir} {data_dir!r} (dataset {spec!r}): no such folder {base!r}")
        _check_files(spec, files, base, flags)
        return src

    if _looks_local(spec):
        raise ConfigError(f"{f_dataset} {spec!r}: no such file or folder")
    return src  # a hub name: only `datasets` can tell whether it exists


def load_source(src: Source, *, streaming: bool = False, num_shards: int = 1):
    """Load a checked source as one split: a ``datasets.Dataset``, or with ``streaming`` a
    ``datasets.IterableDataset`` (folders on disk become one with ``num_shards`` shards, so
    that each data shard reads its own part).

    Any error from ``datasets`` is re-raised as ConfigError naming the dataset, with the
    original error chained for debugging.
    """
    import datasets

    label = src.described
    try:
        if src.kind in ("disk", "tokenized"):
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(src, ds)
        else:
            ds = datasets.load_dataset(
                src.path,
                name=src.name or None,
                # data files: load the splits they form (one, "train"), then pick; else only the one asked for
                split=None if src.data_files else src.split,
                data_dir=src.data_dir or None,
                data_files=src.data_files or None,
                streaming=streaming,
            )
            if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
                ds = _pick_split(src, ds)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises many types (ValueError, FileNotFoundError, ...)
        while exc.__cause__ is not None and "generating the dataset" in str(exc):
            exc = exc.__cause__  # type: ignore[assignment]  # the real reason (bad UTF-8, JSON, ...)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = " (no local file or folder has that name either)" if src.kind == "hub" else ""
        keys = ", ".join(src.flags.flag(k) for k in ("dataset_name", "dataset_split", "data_files", "data_dir"))
        raise ConfigError(
            f"{label}: the datasets library could not load it{where} ({type(exc).__name__}: "
            f"{detail}); check the name, {keys}"
        ) from exc
    if isinstance(ds, datasets.IterableDataset):
        return ds
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"{label}: expected one split, got {type(ds).__name__}")
    if len(ds) == 0:
        raise ConfigError(f"{label} (split {src.split!r}) has no rows")
    if streaming:  # a folder on disk, streamed: contiguous row ranges as shards
        return ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
    return ds


def _pick_split(src: Source, found: Any) -> Any:
    """Split ``src.split`` of ``found`` (a DatasetDict); when data files were given and form one other
    split (datasets names it ``train``), that one, logged: ``[validation] dataset = "json"`` with
    ``data_files = "valid.jsonl"`` reads valid.jsonl although the section's default split is
    ``validation``. Not for training datasets read for validation: that would validate on training data."""
    if src.split in found:
        return found[src.split]
    names, flag = sorted(found), src.flags.flag("dataset_split")
    if src.data_files and len(names) == 1 and not src.flags.borrowed:
        logger.info("%s: its data files form the one split %r; reading it for %s %r", src.described, names[0],
                    flag, src.split)  # fmt: skip
        src.split = names[0]
        return found[names[0]]
    hint = (
        "; give held-out data with --validation.dataset and --validation.data_files, or name one of these splits"
        if src.flags.borrowed
        else ""
    )
    raise ConfigError(f"{flag} {src.split!r}: {src.described} has the split(s) {names}{hint}")


def _first_row(ds: Any, spec: str) -> dict[str, Any]:
    """The first row of a stream (to learn its columns when the schema is not declared); ``spec``:
    the dataset as ``Source.described`` names it."""
    try:
        return next(iter(ds.take(1)))
    except StopIteration:
        raise ConfigError(f"{spec} (streaming) has no rows") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{spec} (streaming): reading failed ({type(exc).__name__}: {first})") from exc


def pick_text_column(ds: Any, requested: str, spec: str, column_flag: str = "--training.text_column") -> str:
    """Return the text column to train on: ``requested``, else ``text``, else ``content``.

    Raises ConfigError naming the dataset (``spec``, as ``Source.described`` names it), the columns
    found and ``column_flag`` when the column is missing or does not hold strings.
    """
    features = ds.features
    first = _first_row(ds, spec) if features is None else None  # a stream that declares no schema
    columns = list(first if first is not None else features)
    if requested:
        if requested not in columns:
            raise ConfigError(f"{column_flag} {requested!r}: {spec} has no such column (columns found: {columns})")
        column = requested
    else:
        column = next((c for c in ("text", "content") if c in columns), "")
        if not column:
            raise ConfigError(
                f"{spec} has neither a 'text' nor a 'content' column (columns found: "
                f"{columns}); name the column to train on with {column_flag}"
            )
    if first is not None:
        from flame.data.documents import check_text

        check_text(first[column], spec, column, tokenized=False)
        return column
    feature = features[column]
    if getattr(feature, "dtype", None) not in _STRING_DTYPES:
        raise ConfigError(
            f"column {column!r} of {spec} holds non-string values ({feature}); "
            f"{column_flag} must name a column of strings"
        )
    return column


def source_names(sources: list[Source]) -> list[str]:
    """Short, unique names for the sources, used in logs and metric keys (``source_tokens/<name>``).

    A local file gives its stem, a folder its base name, a builder its first data file's stem
    (or its data_dir's name), a hub dataset its name (plus ``:config``); repeats get ``_<i>``.
    """
    names: list[str] = []
    for src in sources:
        if src.kind == "hub":
            name = src.spec + (f":{src.name}" if src.name else "")
        elif src.kind == "builder" and src.data_files:
            folder, first = os.path.split(src.data_files[0].rstrip("/"))
            stem = first.split(".")[0].replace("*", "").replace("?", "").strip("_-")
            # a glob such as wiki/*.jsonl is named by its folder
            name = stem or os.path.basename(folder.replace("*", "").rstrip("/")) or src.spec
        elif src.kind == "builder":
            name = os.path.basename(os.path.normpath(src.data_dir)) or src.spec
        else:
            name = os.path.basename(os.path.normpath(src.path))
        names.append(name.replace(" ", "_") or f"source{len(names)}")
    for i, name in enumerate(names):
        if names.count(name) > 1:
            names[i] = f"{name}_{i}"
    return names
