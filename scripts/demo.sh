#!/usr/bin/env bash
# The demo: a real corpus (this Python's standard library sources) and a tokenizer trained on it,
# 2-rank FSDP2 training of a small Llama on CPU, conversion of the last checkpoint to a Hugging
# Face folder, and text generated from that folder by plain transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
start=$(date +%s)
"$PY" -m flame.data.demo --out data/demo
dump="$("$PY" -m flame.utils.resolve --job.config_file configs/demo.toml "$@" | sed -n 's/^FLAME_DUMP_FOLDER=//p')"
NGPU="${NGPU:-2}" PYTHON="$PY" bash train.sh --job.config_file configs/demo.toml "$@"
"$PY" scripts/generate.py "$dump" --prompt "def " --prompt "import " --prompt "class Config"
echo "demo finished in $(( $(date +%s) - start )) s; metrics in $dump/metrics.jsonl"
