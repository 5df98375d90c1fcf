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
#                   torchrun kills them (default 120; SLURM's KillWait bounds it too): raise it for
#                   checkpoints that take longer to write
#   LMSTACK_STOP_FILE  where local rank 0 writes the stop record (default: a temporary file)
# The run directory (train.run_dir) must be on a file system shared by all nodes.
#
# Stop signals: SIGTERM or SIGUSR1 (train.stop_signals) to this script or to torchrun makes every
# worker finish its step and save (lmstack.train.stop); the script then exits 75 ("stopped, resume
# me"), or torchrun's own code for anything else (0: the run finished). SIGINT, SIGHUP and SIGQUIT
# reach the workers as they are (torchrun's defaults): they end the run without a save.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi

# Traps first: a signal that comes before torchrun runs is passed on as soon as it does. Only the
# first is passed on: torchrun gives up waiting for its workers (still saving) at a third signal.
pid="" pending=""
for sig in TERM USR1; do
  # shellcheck disable=SC2064  # $sig expands now, $pid and $pending when the signal comes
  trap "if [[ -z \$pending ]]; then pending=$sig; [[ -z \$pid ]] || kill -$sig \$pid 2>/dev/null || true; fi" "$sig"
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
handle=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${STOP_GRACE_S:-120}")
torchrun --help 2>/dev/null | grep -q -- --signals-to-handle || handle=()

# Every worker exits 75 after a stop, but torchrun then exits 1 (it was signalled): local rank 0 leaves
# a stop record, which is how this script knows.
if [[ -z "${LMSTACK_STOP_FILE:-}" ]]; then
  stop_dir=$(mktemp -d)
  export LMSTACK_STOP_FILE="$stop_dir/stopped.json"
  trap 'rm -rf "$stop_dir"' EXIT
fi
rm -f "$LMSTACK_STOP_FILE"

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
# torchrun gives up on its workers at a repeated signal (e.g. SLURM's to every process and srun's to
# its task) while they may still be saving, and they write the stop record last: wait for this
# launch's workers (known by the LMSTACK_STOP_FILE in their environment) for up to STOP_GRACE_S.
workers_alive() {
  local p
  for p in $(pgrep -f "lmstack.cli train" || true); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qxF "LMSTACK_STOP_FILE=$LMSTACK_STOP_FILE" && return 0
  done
  return 1
}
deadline=$((SECONDS + ${STOP_GRACE_S:-120}))
while workers_alive && ((SECONDS < deadline)); do sleep 0.2 || true; done  # a signal may end the sleep
if [[ -f "$LMSTACK_STOP_FILE" ]]; then
  echo "lmstack: stopped by a signal, checkpoint saved: $(cat "$LMSTACK_STOP_FILE")" >&2
  exit 75
fi
exit "$rc"
