#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for trying and testing launch/slurm.sbatch.
#
#   launch/local_slurm.sh start    # installs slurm-wlm + munge if missing (Debian/Ubuntu, root), starts
#                                  # munged, slurmctld and slurmd on localhost; prints `export SLURM_CONF=...`
#   eval "$(launch/local_slurm.sh env)"   # SLURM_CONF for sbatch / squeue / scontrol in this shell
#   launch/local_slurm.sh status   # sinfo, or exit 1 when the cluster is not running
#   launch/local_slurm.sh stop     # cancels every job, stops the three daemons (nothing left running)
#
# Everything lives in LMSTACK_SLURM_DIR (default /tmp/lmstack-slurm): slurm.conf, the munge key and
# socket, the daemons' state, spool, pid and log files. Nothing is written to /etc. The node has this
# machine's CPUs and memory (`slurmd -C`) and no GPUs; one partition `debug`, the default. KillWait (the
# seconds between a job's SIGTERM and its SIGKILL) is LMSTACK_SLURM_KILL_WAIT (default 30, SLURM's).
set -euo pipefail

DIR=${LMSTACK_SLURM_DIR:-/tmp/lmstack-slurm}
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket.2"

die() { echo "local_slurm: $*" >&2; exit 1; }

install_missing() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) -eq 0 ]] || die "slurm-wlm and munge are not installed, and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them"
  echo "local_slurm: installing slurm-wlm and munge (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
  local host node
  host=$(hostname)
  # `slurmd -C`: this node's real CPUs, sockets, cores and memory, as a NodeName line.
  node=$(slurmd -C | head -n 1)
  cat >"$CONF" <<EOF
ClusterName=lmstack-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=${LMSTACK_SLURM_KILL_WAIT:-30}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
$node
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start() {
  install_missing
  if running slurmctld && running slurmd && running munged; then
    echo "export SLURM_CONF=$CONF"
    return
  fi
  stop >/dev/null 2>&1 || true
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
  [[ -f "$DIR/munge.key" ]] || mungekey -c -k "$DIR/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
  chmod 600 "$DIR/munge.key"
  chmod 700 "$DIR/munge"
  # --force: munged refuses to run as root (and with keys in a world-readable tree) without it.
  munged --force --key-file "$DIR/munge.key" --socket "$SOCKET" --pid-file "$DIR/munged.pid" \
    --log-file "$DIR/munged.log" --seed-file "$DIR/munge.seed"
  write_conf
  export SLURM_CONF="$CONF"
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "export SLURM_CONF=$CONF"
      return
    fi
    sleep 0.5
  done
  die "the cluster did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log"
}

stop() {
  export SLURM_CONF="$CONF"
  if running slurmctld; then
    scancel --full --signal=KILL --state=RUNNING "$(squeue -h -o %i | paste -sd, -)" 2>/dev/null || true
    scancel -u "$(id -un)" 2>/dev/null || true
  fi
  for daemon in slurmd slurmctld munged; do
    if running "$daemon"; then
      pid=$(cat "$DIR/$daemon.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$daemon.pid"
  done
  # Job steps that outlived slurmd (proctrack/linuxproc tracks them by parentage only): this cluster's
  # only, known by the SLURM_CONF they inherited from our slurmd.
  for pid in $(pgrep -f slurmstepd || true); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status)
    export SLURM_CONF="$CONF"
    running slurmctld && running slurmd && sinfo ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
