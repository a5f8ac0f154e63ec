#!/usr/bin/env bash
# Launch flame training: `NGPU=8 bash train.sh --job.config_file X.toml --section.key value ...`
#
# Environment: NGPU (processes per node; default: visible GPUs, else 1), NNODE (nodes, default 1),
# NODE_RANK (this node's index, default 0), LOG_RANK (ranks shown on the console, default 0; e.g. 0,1),
# MASTER_ADDR / MASTER_PORT (rendezvous endpoint; default localhost and a free port on one node),
# MAX_RESTARTS (torchrun restarts of all workers after one fails; each restart resumes from the latest
# checkpoint; default 0), SHUTDOWN_TIMEOUT (seconds the workers get to finish the step and save after
# SIGTERM/SIGUSR1 before torchrun kills them, default 120), RDZV_ID (rendezvous id, default flame),
# PYTHON (interpreter, default: the .venv next to this script if present, else python3), FLAME_COLOR (1/0:
# colours in the console lines; default: whether this script's stdout is a terminal).
# Every argument goes to `python -m flame.train`. When training ends and checkpoints are on, the last
# checkpoint is converted to a Hugging Face folder (unless the run stopped before the end of its schedule).
#
# Exit codes: 0 done; 2 bad input; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (run the
# same command again to resume; scripts/slurm/train.sbatch requeues the job); else the failure's code.
#
# Signals. Each worker (flame/components/fault.py) turns SIGTERM/SIGUSR1 into "finish this step, agree
# with the other ranks, save, exit 0, leave <dump_folder>/preempted.json". torchrun's agent by default
# handles SIGTERM (and INT/HUP/QUIT) by sending it to its workers and killing them after a grace period,
# and does not handle SIGUSR1 at all (its default action would kill the agent and orphan the workers).
# So torchrun runs with --signals_to_handle including SIGUSR1 (the agent forwards both to its workers)
# and --shutdown_timeout SHUTDOWN_TIMEOUT (the grace period); flame.distributed.torchrun is torchrun
# minus the traceback it prints after such a stop. This script traps the signals as well:
# it forwards them to torchrun and stays alive to report the outcome; inside a Slurm step (srun) it
# does not forward, because Slurm signals every process of the step itself (agent and workers).
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

# Visible GPUs: 0 without asking torch when the machine has no GPU device nodes (saves an import of
# torch, ~1.3 s), else torch's count.
if ls /dev/nvidia[0-9]* /dev/kfd >/dev/null 2>&1; then
  CUDA_DEVICES="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
else
  CUDA_DEVICES=0
fi
if [ -z "${NGPU:-}" ]; then
  NGPU=$(( CUDA_DEVICES > 0 ? CUDA_DEVICES : 1 ))
fi
NNODE="${NNODE:-1}"
NODE_RANK="${NODE_RANK:-0}"
LOG_RANK="${LOG_RANK:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
# A dry run is one CPU process standing in for all NNODE x NGPU ranks (fake process group).
if [ "$FLAME_DRY_RUN" = 1 ]; then
  FLAME_DRY_RUN_WORLD_SIZE=$(( NNODE * NGPU )) exec "$PYTHON" -m flame.dry_run "$@"
fi
if [ -z "${MASTER_PORT:-}" ]; then
  if [ "$NNODE" -gt 1 ]; then MASTER_PORT=29500; else
    MASTER_PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
  fi
fi
# torchrun pins OMP_NUM_THREADS=1; on a CPU-only machine share the cores among the ranks instead.
if [ -z "${OMP_NUM_THREADS:-}" ] && [ "$CUDA_DEVICES" = 0 ]; then
  cores="$(nproc)"
  export OMP_NUM_THREADS=$(( cores / NGPU > 0 ? cores / NGPU : 1 ))
fi

# Colours on the console only for a terminal: the workers' stdout is torchrun's pipe, so train.sh, which
# sees where its own output goes (a terminal, a Slurm log, `make demo > log`), tells them. FLAME_COLOR=1/0
# set by the caller wins; NO_COLOR and --metrics.disable_color_printing turn colours off in any case.
if [ -z "${FLAME_COLOR:-}" ]; then
  if [ -t 1 ]; then FLAME_COLOR=1; else FLAME_COLOR=0; fi
fi
export FLAME_COLOR

logs="$FLAME_DUMP_FOLDER/logs"
mkdir -p "$logs"
preempted="$FLAME_DUMP_FOLDER/preempted.json"  # written by rank 0 after a preemption checkpoint
rm -f "$preempted"
echo "flame: $NNODE node(s) x $NGPU process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, logs in $logs"
set +e
# Workers see LOG_RANK=all (every rank logs to its file); the console filter uses the caller's LOG_RANK.
# shellcheck disable=SC2097,SC2098
LOG_RANK=all "$PYTHON" -m flame.distributed.torchrun \
  --nnodes="$NNODE" --nproc_per_node="$NGPU" --node_rank="$NODE_RANK" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-flame}" \
  --max_restarts="$MAX_RESTARTS" \
  --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout="${SHUTDOWN_TIMEOUT:-120}" \
  --log_dir="$logs" --redirects=3 --tee=3 --local_ranks_filter="$LOG_RANK" \
  -m flame.train "$@" &
launcher=$!
forward() { [ -n "${SLURM_STEP_ID:-}" ] || kill -s "$1" "$launcher" 2>/dev/null || true; }
# shellcheck disable=SC2064  # $sig is meant to expand now, once per trap
for sig in TERM USR1 INT HUP; do trap "forward $sig" "$sig"; done
wait "$launcher"
status=$?
# A trapped signal interrupts `wait` while torchrun still runs: wait again until it has exited.
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher"
  status=$?
done
trap - TERM USR1 INT HUP
set -e
if [ -f "$preempted" ]; then
  echo "flame: stopped by a preemption signal after saving a checkpoint: $(cat "$preempted")"
  echo "flame: run the same command again to resume (exit code 75)"
  exit 75
fi
[ "$status" -eq 0 ] || exit "$status"

# Export the last checkpoint as a Hugging Face model (once, on the first node); not for a run paused
# before the end of its schedule (lr_scheduler.schedule_steps > training.steps: a trunk to be continued).
if [ "$FLAME_CHECKPOINT" = 1 ] && [ "$FLAME_SEED_CHECKPOINT" = 0 ] && [ "$FLAME_PAUSED" = 0 ] && [ "$NODE_RANK" = 0 ]; then
  extra=()
  [ -n "$FLAME_CUSTOM_MODEL_PATH" ] && extra+=(--custom_model_path "$FLAME_CUSTOM_MODEL_PATH")
  "$PYTHON" -m flame.utils.convert_dcp_to_hf --path "$FLAME_DUMP_FOLDER" --step "$FLAME_STEPS" \
    --config "$FLAME_MODEL_CONFIG" --tokenizer "$FLAME_TOKENIZER" "${extra[@]}"
fi
