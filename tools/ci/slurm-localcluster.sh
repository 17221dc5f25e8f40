#!/usr/bin/env bash
# A real Slurm cluster on this one host, for CI and for trying launch/slurm/tide.sbatch by hand.
# Debian 12 (Slurm 22.05, munge 0.5), run as root, no systemd needed.
#
#   tools/ci/slurm-localcluster.sh install   apt-get install munge slurmctld slurmd slurm-client (skipped when present)
#   tools/ci/slurm-localcluster.sh start     write the config, start munged, slurmctld and one slurmd per node, wait until idle
#   tools/ci/slurm-localcluster.sh stop      cancel jobs, stop what `start` started (by pid file), undo /etc/hosts, cgroup dirs
#   tools/ci/slurm-localcluster.sh status
#   eval "$(tools/ci/slurm-localcluster.sh env)"   export SLURM_CONF for sbatch/srun/squeue/scontrol
#
# Environment:
#   SLURM_LC_DIR    (/tmp/tide-slurm-lc) config, state, spool, logs and pid files
#   SLURM_LC_NODES  (2) emulated nodes node01..nodeNN, one slurmd each (`slurmd -N nodeXX`, Port 1700X,
#                   NodeAddr 127.0.0.1X; Debian's slurmd is built with MULTIPLE_SLURMD). The node names are added
#                   to /etc/hosts with a marker and removed again by `stop`.
#   SLURM_LC_CPUS   ($(nproc)) CPUs declared per node (may exceed the real count: SlurmdParameters=config_overrides)
#   SLURM_LC_GPUS   (0) fake GPUs per node (gres/gpu backed by mknod'ed char devices): `--gpus-per-node=K` submissions
#                   are accepted and CUDA_VISIBLE_DEVICES is set, torch stays on the CPU
#   SLURM_LC_CRED_EXPIRE (10) seconds a job credential lives (AuthInfo=cred_expire; Slurm's default is 120). A requeued
#                   job may start again only after it (EligibleTime): its old credential must have expired, or
#                   slurmd refuses the launch ("Job credential revoked") and the job fails.
#
# Both emulated nodes share the host's hostname, /dev/shm, pids and file system (like nodes with a shared file
# system); only their Slurm names and addresses differ. Every wait has a timeout; every daemon is stopped by the
# pid it wrote, never by name. Recipe and pitfalls: docs/infra.md §1.
set -euo pipefail

DIR=${SLURM_LC_DIR:-/tmp/tide-slurm-lc}
NODES=${SLURM_LC_NODES:-2}
CPUS=${SLURM_LC_CPUS:-$(nproc)}
GPUS=${SLURM_LC_GPUS:-0}
CRED_EXPIRE=${SLURM_LC_CRED_EXPIRE:-10}
CONF=$DIR/etc/slurm.conf
MARK="# tide-slurm-localcluster $DIR"
H=$(hostname -s)

log() { echo "[slurm-lc] $*" >&2; }

node_names() { for i in $(seq 1 "$NODES"); do printf 'node%02d\n' "$i"; done; }

cmd_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    log "Slurm already installed: $(slurmctld -V)"
  else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: 8 small packages instead of slurm-wlm's 43 (hdf5, rrd, ipmi plugins ...)
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
    log "installed $(slurmctld -V)"
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
}

write_config() {
  mkdir -p "$DIR"/{etc,state,spool,log,run,dev}
  cat > "$CONF" <<EOF
ClusterName=tideci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
MailProg=/bin/true
EOF
  local gres=""
  if [ "$GPUS" -gt 0 ]; then
    echo "GresTypes=gpu" >> "$CONF"
    gres="Gres=gpu:$GPUS"
    # gres/gpu drops GPUs that have no File= ("Removing file-less GPU"): back each by a char device
    for i in $(seq 0 $((GPUS - 1))); do [ -e "$DIR/dev/fakegpu$i" ] || mknod "$DIR/dev/fakegpu$i" c 1 3; done
    : > "$DIR/etc/gres.conf"
    for n in $(node_names); do echo "NodeName=$n Name=gpu File=$DIR/dev/fakegpu[0-$((GPUS - 1))]" >> "$DIR/etc/gres.conf"; done
  fi
  local mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 / NODES ))
  local i=0 n
  for n in $(node_names); do
    i=$((i + 1))
    echo "NodeName=$n NodeHostname=$H NodeAddr=127.0.0.$((10 + i)) Port=$((17000 + i)) CPUs=$CPUS Sockets=1" \
         "CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem $gres State=UNKNOWN" >> "$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=120 State=UP" >> "$CONF"
}

hosts_add() {  # the node names must resolve (MASTER_ADDR=node01, DeepSpeed hostfiles)
  local i=0 n
  for n in $(node_names); do
    i=$((i + 1))
    getent hosts "$n" >/dev/null || echo "127.0.0.$((10 + i)) $n $MARK" >> /etc/hosts
  done
  getent hosts "$H" >/dev/null || echo "127.0.0.1 $H $MARK" >> /etc/hosts
}

hosts_remove() {  # rewrite in place (sed -i would replace the inode, which fails on a bind-mounted /etc/hosts)
  if grep -qF "$MARK" /etc/hosts; then
    grep -vF "$MARK" /etc/hosts > "$DIR/hosts.new" || true
    cat "$DIR/hosts.new" > /etc/hosts
    rm -f "$DIR/hosts.new"
  fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then log "munged already running (not ours: left alone by stop)"; return; fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$DIR/run/munged.pid"
  for _ in $(seq 1 50); do munge_ok && return; sleep 0.1; done
  log "munged did not come up"; return 1
}

cmd_start() {
  for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null || { log "$b not found: run '$0 install' first"; return 1; }
  done
  if [ -s "$DIR/run/slurmctld.pid" ] && alive "$(cat "$DIR/run/slurmctld.pid")"; then
    log "a cluster from $DIR is already running; stop it first"; return 1
  fi
  write_config
  hosts_add
  export SLURM_CONF=$CONF
  start_munge
  /usr/sbin/slurmctld -f "$CONF" -i
  local n
  for n in $(node_names); do mkdir -p "$DIR/spool/$n"; /usr/sbin/slurmd -f "$CONF" -N "$n"; done
  local st=""
  for _ in $(seq 1 160); do  # 40 s
    st=$(sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ')
    if [ "$st" = "idle " ]; then log "cluster up: $(sinfo -h -N -o '%N' | tr '\n' ' ')(SLURM_CONF=$CONF)"; return 0; fi
    sleep 0.25
  done
  log "nodes not idle after 40 s: '$st'"
  sinfo -N -o '%N %T %E' >&2 || true
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

alive() {  # a daemon that exited stays a zombie until PID 1 reaps it: treat state Z as gone
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

kill_pidfiles() {  # TERM, wait up to 10 s, then KILL; only the pids our own pid files name
  local pids=() f p any
  for f in "$@"; do [ -s "$f" ] && pids+=("$(cat "$f")"); done
  [ ${#pids[@]} -gt 0 ] || { rm -f "$@"; return 0; }
  for p in "${pids[@]}"; do alive "$p" && kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    any=0
    for p in "${pids[@]}"; do alive "$p" && any=1; done
    [ $any = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do alive "$p" && kill -9 "$p" 2>/dev/null || true; done
  rm -f "$@"
}

cmd_stop() {
  export SLURM_CONF=$CONF
  if [ -e "$CONF" ] && [ -s "$DIR/run/slurmctld.pid" ] && alive "$(cat "$DIR/run/slurmctld.pid")"; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel --quiet $jobs 2>/dev/null || true
      for _ in $(seq 1 80); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
    fi
  fi
  kill_pidfiles "$DIR"/run/slurmd-*.pid
  kill_pidfiles "$DIR/run/slurmctld.pid"
  kill_pidfiles "$DIR/run/munged.pid"  # only when `start` started it
  hosts_remove
  local d
  for d in $(find /sys/fs/cgroup/*/slurm_* -depth -type d 2>/dev/null); do rmdir "$d" 2>/dev/null || true; done
  log "stopped"
}

cmd_status() {
  export SLURM_CONF=$CONF
  local f
  for f in "$DIR"/run/*.pid; do
    [ -e "$f" ] && echo "$(basename "$f" .pid) pid=$(cat "$f") $(alive "$(cat "$f")" && echo alive || echo gone)"
  done
  sinfo -N -o '%N %T %c %G %E' || true
  squeue || true
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
