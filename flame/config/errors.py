"""The one error type for bad user input (flags, TOML, files, degrees)."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad user input, found before any work starts.

    Holds one or more problems; the CLI prints them as one message and exits with code 2.
    Each problem names the flag, section or file and what is allowed.
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.format())

    def format(self, head: str = "") -> str:
        """The one problem, or the list of them under ``head`` (``"invalid config"``) when there are several."""
        if len(self.problems) == 1:
            return self.problems[0]
        return (f"{head}:\n" if head else "") + "\n".join(f"  - {p}" for p in self.problems)
