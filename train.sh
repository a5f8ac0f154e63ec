#!/usr/bin/env bash
# Launch flame training: `NGPU=8 bash train.sh --job.config_file X.toml --section.key value ...`
#
# Environment: NGPU (processes per node; default: visible GPUs, else 1), NNODE (nodes, default 1),
# NODE_RANK (this node's index, default 0), LOG_RANK (ranks shown on the console, default 0; e.g. 0,1),
# MASTER_ADDR / MASTER_PORT (rendezvous endpoint; default localhost and a free port on one node),
# MAX_RESTARTS (torchrun restarts after a failure, default 0), PYTHON (interpreter, default: the
# .venv next to this script if present, else python3). Every argument goes to `python -m flame.train`.
# When training ends and checkpoints are on, the last checkpoint is converted to a Hugging Face folder.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then exec "$PYTHON" -m flame.train -h; fi
done

# The resolved config (defaults < TOML < flags); bad input stops here with exit code 2.
resolved="$("$PYTHON" -m flame.utils.resolve "$@")" || exit $?
eval "$resolved"

if [ -z "${NGPU:-}" ]; then
  NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)"
fi
NNODE="${NNODE:-1}"
NODE_RANK="${NODE_RANK:-0}"
LOG_RANK="${LOG_RANK:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
if [ -z "${MASTER_PORT:-}" ]; then
  if [ "$NNODE" -gt 1 ]; then MASTER_PORT=29500; else
    MASTER_PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
  fi
fi
# torchrun pins OMP_NUM_THREADS=1; on a CPU-only machine share the cores among the ranks instead.
if [ -z "${OMP_NUM_THREADS:-}" ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  cores="$(nproc)"
  export OMP_NUM_THREADS=$(( cores / NGPU > 0 ? cores / NGPU : 1 ))
fi

logs="$FLAME_DUMP_FOLDER/logs"
mkdir -p "$logs"
echo "flame: $NNODE node(s) x $NGPU process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, logs in $logs"
set +e
LOG_RANK=all "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODE" --nproc_per_node="$NGPU" --node_rank="$NODE_RANK" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-flame}" \
  --max_restarts="$MAX_RESTARTS" \
  --log_dir="$logs" --redirects=3 --tee=3 --local_ranks_filter="$LOG_RANK" \
  -m flame.train "$@"
status=$?
set -e
[ "$status" -eq 0 ] || exit "$status"

# Export the last checkpoint as a Hugging Face model (once, on the first node).
if [ "$FLAME_CHECKPOINT" = 1 ] && [ "$FLAME_SEED_CHECKPOINT" = 0 ] && [ "$NODE_RANK" = 0 ]; then
  extra=()
  [ -n "$FLAME_CUSTOM_MODEL_PATH" ] && extra+=(--custom_model_path "$FLAME_CUSTOM_MODEL_PATH")
  "$PYTHON" -m flame.utils.convert_dcp_to_hf --path "$FLAME_DUMP_FOLDER" --step "$FLAME_STEPS" \
    --config "$FLAME_MODEL_CONFIG" --tokenizer "$FLAME_TOKENIZER" "${extra[@]}"
fi
