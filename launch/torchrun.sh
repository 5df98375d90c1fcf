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
# The run directory (train.run_dir) must be on a file system shared by all nodes.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

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

exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  -m lmstack.cli train "$@" --resume "$RESUME"
