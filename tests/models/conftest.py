"""The checkpoint tests' run fixtures, shared with the model tests."""

from tests.checkpoint.conftest import llama_json, run_flags

__all__ = ["llama_json", "run_flags"]
