#!/usr/bin/env bash
# The demo: a real corpus (this Python's standard library sources) and a tokenizer trained on it,
# 2-rank FSDP2 training of a small Llama on CPU, conversion of the last checkpoint to a Hugging
# Face folder, and text generated from that folder by plain transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
start=$(date +%s)
# DEMO_DATA_ARGS adds flags to the corpus builder (the tests build a smaller corpus elsewhere).
# shellcheck disable=SC2086
"$PY" -m flame.data.demo --out data/demo ${DEMO_DATA_ARGS:-}
resolved="$("$PY" -m flame.utils.resolve --job.config_file configs/demo.toml "$@")" || exit $?
eval "$resolved"
dump="$FLAME_DUMP_FOLDER"
NGPU="${NGPU:-2}" PYTHON="$PY" bash train.sh --job.config_file configs/demo.toml "$@"
"$PY" -m flame.utils.plot "$dump"
"$PY" scripts/generate.py "$dump" --prompt "def " --prompt "import " --prompt "class Config"
echo "demo finished in $(( $(date +%s) - start )) s; metrics in $dump/metrics.jsonl"
