#!/usr/bin/env bash
# local-slurm.sh start|stop|env - a real SLURM cluster on this one machine, for fpm's tests.
#
# Starts munged, slurmctld and N slurmd "nodes" (node1..nodeN), each slurmd in its own UTS
# namespace so `hostname` in a job step prints its node name, and each node name resolving to its
# own loopback address (127.0.0.11, 127.0.0.12, ...) so MASTER_ADDR=<first node> works as on a
# cluster. Needs root and Debian's slurmctld slurmd slurm-client munge (installed by .ci/run).
#
# Everything lives in $FPM_SLURM_DIR (default /tmp/fpm-slurm): slurm.conf, state, spool, logs, and
# `pids` — the daemons this script started. `stop` kills exactly those PIDs (never by name) after
# cancelling this cluster's jobs. Clients need `export SLURM_CONF=$FPM_SLURM_DIR/slurm.conf`
# (`local-slurm.sh env` prints it).
#
# Settings: FPM_SLURM_DIR, FPM_SLURM_NODES (2), FPM_SLURM_CPUS (nproc), FPM_SLURM_PORT (6917),
#           FPM_SLURM_TIMEOUT (60 s to reach idle).
set -euo pipefail

DIR=${FPM_SLURM_DIR:-/tmp/fpm-slurm}
NODES=${FPM_SLURM_NODES:-2}
CPUS=${FPM_SLURM_CPUS:-$(nproc)}
PORT=${FPM_SLURM_PORT:-6917}
TIMEOUT=${FPM_SLURM_TIMEOUT:-60}
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
TAG="# fpm-local-slurm"
export SLURM_CONF=$CONF

say() { echo "[local-slurm] $*"; }
die() { echo "[local-slurm] error: $*" >&2; exit 1; }
ours() { [ -n "${2:-}" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }   # pid $2 still runs daemon $1

start() {
  [ "$(id -u)" = 0 ] || die "needs root (daemons, /etc/hosts, munge key)"
  for bin in munged slurmctld slurmd sbatch; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install slurmctld slurmd slurm-client munge"
  done
  mkdir -p "$DIR"/{state,spool,log}
  : > "$PIDS"

  # munge: one key, one daemon (reuse a daemon that already answers)
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
      >>"$DIR/log/munged.out" 2>&1 </dev/null &
    echo "munged $!" >> "$PIDS"
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see $DIR/log/munged.out)"

  # node names -> their own loopback addresses (lines tagged, removed by stop)
  local hosts; hosts=$(grep -v -- "$TAG\$" /etc/hosts || true)
  for i in $(seq "$NODES"); do hosts+=$'\n'"127.0.0.$((10 + i)) node$i $TAG"; done
  printf '%s\n' "$hosts" > /etc/hosts.fpm-tmp && cat /etc/hosts.fpm-tmp > /etc/hosts && rm -f /etc/hosts.fpm-tmp

  local mem=$(( $(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo) * 8 / 10 / NODES ))
  {
    echo "ClusterName=fpmtest"
    echo "SlurmctldHost=$(hostname)(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    # a requeued job waits cred_expire seconds before it may start again (default 120)
    echo "AuthInfo=cred_expire=10"
    echo "CredType=cred/munge"
    echo "MpiDefault=none"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$DIR/log/jobcomp.txt"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "MinJobAge=3600"
    echo "JobRequeue=1"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    for i in $(seq "$NODES"); do
      echo "NodeName=node$i NodeHostname=node$i NodeAddr=node$i Port=$((PORT + 100 + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$CONF"

  setsid /usr/sbin/slurmctld -D -i -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 </dev/null &
  echo "slurmctld $!" >> "$PIDS"
  local uts=1; unshare --uts true 2>/dev/null || uts=0
  for i in $(seq "$NODES"); do
    mkdir -p "$DIR/spool/node$i"
    if [ "$uts" = 1 ]; then
      setsid unshare --uts sh -c "hostname node$i && exec /usr/sbin/slurmd -D -N node$i -f '$CONF'" \
        >>"$DIR/log/slurmd-node$i.out" 2>&1 </dev/null &
    else
      setsid /usr/sbin/slurmd -D -N "node$i" -f "$CONF" >>"$DIR/log/slurmd-node$i.out" 2>&1 </dev/null &
    fi
    echo "slurmd $!" >> "$PIDS"
  done

  for _ in $(seq $((TIMEOUT * 5))); do
    while read -r name pid; do ours "$name" "$pid" || die "$name (pid $pid) died; see $DIR/log"; done < "$PIDS"
    local states; states=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ "$states" = "idle " ] && [ "$(sinfo -h -N -o %N 2>/dev/null | wc -l)" = "$NODES" ]; then
      say "ready: $NODES node(s), SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.2
  done
  sinfo -N -l || true
  die "nodes not idle after ${TIMEOUT}s; see $DIR/log"
}

stop() {
  [ -s "$PIDS" ] || { say "nothing to stop"; return 0; }
  if command -v squeue >/dev/null && [ -n "$(squeue -h -o %A 2>/dev/null)" ]; then
    scancel $(squeue -h -o %A) 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  # slurmd first, then slurmctld, then munged (only if we started it)
  for name in slurmd slurmctld munged; do
    while read -r n pid; do
      [ "$n" = "$name" ] || continue
      if ours "$n" "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do ours "$n" "$pid" || break; sleep 0.1; done
        ours "$n" "$pid" && kill -KILL "$pid" 2>/dev/null || true
      fi
    done < "$PIDS"
  done
  rm -f "$PIDS"
  if grep -q -- "$TAG\$" /etc/hosts; then
    grep -v -- "$TAG\$" /etc/hosts > /etc/hosts.fpm-tmp || true
    cat /etc/hosts.fpm-tmp > /etc/hosts && rm -f /etc/hosts.fpm-tmp
  fi
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
