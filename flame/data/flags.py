"""The dataset flags a loader reads, taken from the ``[training]`` or ``[validation]`` section.

Both sections name their datasets with the same keys (``dataset``, ``dataset_name``,
``dataset_split``, ``data_dir``, ``data_files``); ``DatasetFlags`` holds those values together with
the section they came from, so that every data error names the flag the user wrote
(``--validation.data_files ...`` for validation data, ``--training.data_files ...`` for training data).
Built only from the schema's dataclasses (``training_flags``, ``validation_flags``): the values and
their defaults are the schema's.
"""

from __future__ import annotations

from dataclasses import dataclass

from flame.config.schema import Training, Validation


@dataclass(frozen=True)
class DatasetFlags:
    """The dataset entries of one section (lists hold one entry per dataset, ``""`` = not given).

    ``section`` owns the dataset entries, ``split_section`` the split: they differ only for a
    validation that reads the training datasets (``--validation.dataset`` empty), whose split is
    ``--validation.dataset_split``. An empty section means a tool's own top-level flags (``--data_files``).
    """

    section: str
    dataset: list[str]
    dataset_name: list[str]
    dataset_split: list[str]
    data_dir: list[str]
    data_files: list[str]
    data_probs: list[float]
    split_section: str

    def flag(self, key: str) -> str:
        """The command-line flag of ``key`` as the user writes it (``--validation.data_files``)."""
        section = self.split_section if key == "dataset_split" else self.section
        return f"--{section}.{key}" if section else f"--{key}"

    @property
    def borrowed(self) -> bool:
        """True when these are the training datasets read for validation."""
        return self.section != self.split_section


def training_flags(training: Training, section: str = "training") -> DatasetFlags:
    """The training datasets (``section=""`` for a tool whose flags have no section prefix)."""
    t = training
    return DatasetFlags(
        section, list(t.dataset), list(t.dataset_name), list(t.dataset_split), list(t.data_dir),
        list(t.data_files), list(t.data_probs), section,
    )  # fmt: skip


def validation_flags(validation: Validation, training: Training) -> DatasetFlags:
    """The validation datasets: ``--validation.dataset`` and its entries, or, when that is empty, the
    training datasets (and their sampling probabilities) read with ``--validation.dataset_split``."""
    v, t = validation, training
    if v.dataset:
        return DatasetFlags(
            "validation", list(v.dataset), list(v.dataset_name), list(v.dataset_split), list(v.data_dir),
            list(v.data_files), [], "validation",
        )  # fmt: skip
    return DatasetFlags(
        "training", list(t.dataset), list(t.dataset_name), list(v.dataset_split), list(t.data_dir),
        list(t.data_files), list(t.data_probs), "validation",
    )  # fmt: skip
