#!/usr/bin/env bash
# Launch `lmstack train` under torchrun: one node (default) or many (c10d rendezvous).
#
#   launch/torchrun.sh CONFIG [section.field=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, else 1)
#   NNODES          number of nodes (default 1). With NNODES > 1 run this script on every node with
#                   the same MASTER_ADDR / MASTER_PORT / RDZV_ID; ranks are assigned by the rendezvous.
#   MASTER_ADDR     host of the c10d rendezvous (node 0; default localhost)
#   MASTER_PORT     its port (default 29500)
#   RDZV_ID         job id shared by the nodes (default lmstack)
#   RESUME          passed to --resume (default auto: continue from the run's latest checkpoint)
#   MAX_RESTARTS    torchrun restarts of the whole group after a failure (default 0)
#   STOP_GRACE_S    seconds the workers get, after a stop signal, to finish their step and save before
#                   torchrun kills them (default 120; SLURM's KillWait bounds it too)
# The run directory (train.run_dir) must be on a file system shared by all nodes.
#
# Stop signals: SIGTERM, SIGINT, SIGHUP, SIGQUIT or SIGUSR1 to this script or to torchrun makes every
# worker finish its step and save (lmstack.train.stop); the script then exits 75 ("stopped, resume
# me"), or torchrun's own code for anything else (0: the run finished).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi

STOP_SIGNALS=(TERM INT HUP QUIT USR1)
# Traps first: a signal that comes before torchrun runs is passed on as soon as it does.
pid="" pending=""
for sig in "${STOP_SIGNALS[@]}"; do
  # shellcheck disable=SC2064  # $sig expands now, $pid when the signal comes
  trap "pending=$sig; [[ -n \$pid ]] && kill -$sig \$pid 2>/dev/null || true" "$sig"
done

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  fi
  [[ "${NPROC_PER_NODE:-0}" -ge 1 ]] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
RESUME=${RESUME:-auto}
# One CPU thread per process unless set (torchrun's default too); raise for CPU-only runs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ "$NNODES" -eq 1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}"
        --rdzv_id "${RDZV_ID:-lmstack}")
fi

# torchrun forwards the signals it handles to the workers (then SIGKILL after --shutdown-timeout);
# SIGUSR1 (SLURM's time-limit warning) is not among its defaults and would end torchrun itself.
handle=(--signals-to-handle "$(printf 'SIG%s,' "${STOP_SIGNALS[@]}" | sed 's/,$//')" --shutdown-timeout "${STOP_GRACE_S:-120}")
torchrun --help 2>/dev/null | grep -q -- --signals-to-handle || handle=()

# Every worker exits 75 after a stop, but torchrun then exits 1 (it was signalled): local rank 0 leaves
# a stop record, which is how this script knows.
stop_dir=$(mktemp -d)
export LMSTACK_STOP_FILE="$stop_dir/stopped.json"
trap 'rm -rf "$stop_dir"' EXIT

torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" "${handle[@]}" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  -m lmstack.cli train "$@" --resume "$RESUME" &
pid=$!
[[ -z $pending ]] || kill "-$pending" "$pid" 2>/dev/null || true
# `wait` returns early when a trapped signal arrives: wait again until torchrun has really exited.
rc=0
while true; do
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [[ -f "$LMSTACK_STOP_FILE" ]]; then
  echo "lmstack: stopped by a signal, checkpoint saved: $(cat "$LMSTACK_STOP_FILE")" >&2
  exit 75
fi
exit "$rc"
