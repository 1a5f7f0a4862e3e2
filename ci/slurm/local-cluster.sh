#!/usr/bin/env bash
# Vendored from the shared, verified recipe (../shared/slurm/local-cluster.sh, see its README.md),
# so that CI needs nothing outside this repository.
# slurm-local-cluster.sh - a real single-node SLURM cluster (slurmctld + slurmd +
# munged, optionally slurmdbd + MariaDB) on loopback, for CI runs of
# `snakemake --executor slurm`.
#
# Verified on Debian 12 (bookworm), slurm-wlm 22.05.8, munge 0.5.15,
# mariadb 10.11, as root, without systemd: every daemon is started directly in
# its foreground mode (-D / -F) as a background child, and its PID is written
# to the state dir. `stop` signals only those PIDs (after checking that each
# still is the daemon it recorded); it never kills by name.
#
# Usage:  slurm-local-cluster.sh start|stop|status|restart|clean
#   start   apt-get install the packages if missing, write /etc/slurm/slurm.conf
#           (+ slurmdbd.conf), start the daemons, wait until `sinfo` shows the
#           node idle (timeout). Idempotent: no-op if the cluster is up.
#   stop    stop the daemons this script started (SIGTERM, SIGKILL after 20 s).
#           Idempotent. Leaves packages, config and state in place.
#   status  PIDs + sinfo; exit 0 only if the node is idle/mixed/allocated.
#   restart stop + start (needed to switch SLURM_LOCAL_ACCOUNTING on/off).
#   clean   stop, then delete the state dir (controller state, logs, spool).
#
# Environment (all optional):
#   SLURM_LOCAL_STATE       state dir: pids, logs, spool, ctld state [/var/tmp/slurm-local]
#   SLURM_LOCAL_TIMEOUT     seconds to wait for the node to be idle  [60]
#   SLURM_LOCAL_INSTALL     1 = apt-get install missing packages     [1]
#   SLURM_LOCAL_CPUS        CPUs of the node                         [nproc]
#   SLURM_LOCAL_MEM_MB      RealMemory of the node (MB)              [90% of MemTotal]
#   SLURM_LOCAL_ACCOUNTING  0 = no accounting: `sacct` fails, so run Snakemake
#                           with --slurm-status-command squeue;
#                           1 = also run MariaDB + slurmdbd so `sacct` works
#                           (the plugin's default status command)     [0]
#
# The node is "localhost" (NodeAddr 127.0.0.1) whatever the hostname; the
# partition is "debug" (Default=YES); the accounting account is "ci".
# Ports: slurmctld 6817, slurmd 6818, slurmdbd 6819, all on 127.0.0.1;
# MariaDB runs with --skip-networking (unix socket only).
set -euo pipefail

STATE="${SLURM_LOCAL_STATE:-/var/tmp/slurm-local}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
INSTALL="${SLURM_LOCAL_INSTALL:-1}"
ACCOUNTING="${SLURM_LOCAL_ACCOUNTING:-0}"
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
NODE=localhost
PARTITION=debug
CLUSTER=localcluster
ACCOUNT=ci
DB_SOCK=/run/mysqld/mysqld.sock
DB_PASS=slurm-local-ci   # MariaDB is reachable only through its unix socket

log() { echo "[slurm-local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

# --- helpers ---------------------------------------------------------------
# pid_alive NAME: 0 if STATE/NAME.pid holds a live, non-zombie process whose
# argv[0] is NAME (so a stale pid file never makes us signal another process).
pid_alive() {
  local f="$STATE/$1.pid" pid st
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  case "$pid" in ''|*[!0-9]*) return 1 ;; esac
  [ -d "/proc/$pid" ] || return 1
  st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z)
  [ "$st" != Z ] || return 1
  [ "$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | head -1 | xargs -r basename)" = "$1" ]
}

wait_for() {  # wait_for SECONDS CMD... : poll CMD every 0.2 s
  local n=$(( $1 * 5 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1 || true; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
db_ok() { mariadb --socket="$DB_SOCK" -e 'SELECT 1' >/dev/null 2>&1; }
dbd_ok() { sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

install_pkgs() {
  local need=() p
  for p in slurmctld slurmd sinfo munged; do
    command -v "$p" >/dev/null || { need=(slurm-wlm munge); break; }
  done
  if [ "$ACCOUNTING" = 1 ]; then
    command -v slurmdbd >/dev/null || need+=(slurmdbd)
    command -v mariadbd >/dev/null || need+=(mariadb-server)
  fi
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing packages (${need[*]}) and SLURM_LOCAL_INSTALL=0"
  log "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

write_conf() {
  local cpus mem acct
  cpus="${SLURM_LOCAL_CPUS:-$(nproc)}"
  mem="${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2/1024*0.9}' /proc/meminfo)}"
  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  mkdir -p /etc/slurm
  cat > "$CONF.tmp" <<EOF
# Written by slurm-local-cluster.sh - single-node loopback cluster for CI.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$STATE/run/slurmctld.daemon.pid
SlurmdPidFile=$STATE/run/slurmd.daemon.pid
SlurmctldPort=6817
SlurmdPort=6818
SlurmdSpoolDir=$STATE/slurmd
StateSaveLocation=$STATE/slurmctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Snakemake's slurm plugin with --slurm-status-command squeue needs finished
# jobs to stay visible to squeue for >= 3 x --slurm-init-seconds-before-status-checks.
MinJobAge=300
$acct
JobCompType=jobcomp/none
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv -f "$CONF.tmp" "$CONF"
  if [ "$ACCOUNTING" = 1 ]; then
    ( umask 077; cat > "$DBDCONF.tmp" <<EOF
# Written by slurm-local-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    chown slurm:slurm "$DBDCONF.tmp"; mv -f "$DBDCONF.tmp" "$DBDCONF"
  fi
}

start_munge() {
  pid_alive munged && return 0
  if munge_ok; then log "using an already running munged (not started by this script)"; return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  # setpriv execs (no fork), so $! is munged's own PID; -F logs to stderr.
  setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged -F \
    </dev/null >>"$STATE/log/munged.out" 2>&1 &
  echo $! > "$STATE/munged.pid"
  wait_for 10 munge_ok || die "munged did not come up; see $STATE/log/munged.out"
}

start_mariadb() {
  if pid_alive mariadbd; then :
  elif db_ok; then log "using an already running MariaDB (not started by this script)"
  else
    mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
    if [ ! -d /var/lib/mysql/mysql ]; then
      log "initialising /var/lib/mysql"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$STATE/log/mariadbd.out" 2>&1
    fi
    /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$DB_SOCK" \
      --pid-file=/run/mysqld/mysqld.pid </dev/null >>"$STATE/log/mariadbd.out" 2>&1 &
    echo $! > "$STATE/mariadbd.pid"
    wait_for 30 db_ok || die "MariaDB did not come up; see $STATE/log/mariadbd.out"
  fi
  mariadb --socket="$DB_SOCK" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  if ! pid_alive slurmdbd; then
    /usr/sbin/slurmdbd -D </dev/null >>"$STATE/log/slurmdbd.out" 2>&1 &
    echo $! > "$STATE/slurmdbd.pid"
  fi
  wait_for 30 dbd_ok || die "slurmdbd did not come up; see $STATE/log/slurmdbd.log"
  # cluster, account and user associations (idempotent)
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT" \
    || sacctmgr -i add account "$ACCOUNT" Description=ci Organization=ci >/dev/null
  if ! sacctmgr -n -P show assoc user=root format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
  fi
}

start_slurm() {
  if ! pid_alive slurmctld; then
    /usr/sbin/slurmctld -D -f "$CONF" </dev/null >>"$STATE/log/slurmctld.out" 2>&1 &
    echo $! > "$STATE/slurmctld.pid"
    wait_for 15 scontrol ping || true
  fi
  if ! pid_alive slurmd; then
    # -N: the node's name in slurm.conf ("localhost", not the machine's hostname)
    /usr/sbin/slurmd -D -N "$NODE" -f "$CONF" </dev/null >>"$STATE/log/slurmd.out" 2>&1 &
    echo $! > "$STATE/slurmd.pid"
  fi
}

wait_idle() {
  local deadline=$(( $(date +%s) + TIMEOUT )) st resumed=0
  while :; do
    st=$(node_state)
    case "$st" in
      idle|mixed|allocated) log "node $NODE is $st"; return 0 ;;
      down*|drain*|fail*)
        if [ $resumed = 0 ]; then
          log "node is '$st'; resuming it"
          scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "timeout (${TIMEOUT}s) waiting for node idle; state='$st'"
      sinfo -R >&2 2>&1 || true
      tail -n 20 "$STATE"/log/*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}

stop_one() {  # stop_one NAME: SIGTERM the recorded PID, SIGKILL after 20 s
  local name=$1 f="$STATE/$1.pid" pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if pid_alive "$name"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do pid_alive "$name" || break; sleep 0.2; done
    if pid_alive "$name"; then
      log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
  fi
  rm -f "$f"
}

all_up() {
  { pid_alive munged || munge_ok; } && pid_alive slurmctld && pid_alive slurmd || return 1
  if [ "$ACCOUNTING" = 1 ]; then dbd_ok || return 1; fi
  case "$(node_state)" in idle|mixed|allocated) return 0 ;; *) return 1 ;; esac
}

cmd_start() {
  if all_up; then log "already running"; sinfo; return 0; fi
  local t0; t0=$(date +%s.%N)
  install_pkgs
  mkdir -p "$STATE/log" "$STATE/run" "$STATE/slurmctld" "$STATE/slurmd"
  chown slurm:slurm "$STATE/log" "$STATE/run" "$STATE/slurmctld"
  chmod 0755 "$STATE" "$STATE/log" "$STATE/run"
  write_conf
  start_munge
  if [ "$ACCOUNTING" = 1 ]; then start_mariadb; start_slurmdbd; fi
  start_slurm
  wait_idle || die "cluster did not become ready; logs in $STATE/log"
  local n pids=""
  for n in munged mariadbd slurmdbd slurmctld slurmd; do
    [ -s "$STATE/$n.pid" ] && pids="$pids $n=$(cat "$STATE/$n.pid")"
  done
  log "ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s (accounting=$ACCOUNTING); pids:$pids"
  sinfo
}

cmd_stop() {
  # Cancel leftover jobs first so that slurmd can shut down cleanly.
  if pid_alive slurmctld; then scancel --user=root >/dev/null 2>&1 || true; fi
  stop_one slurmd
  stop_one slurmctld
  stop_one slurmdbd
  stop_one mariadbd
  stop_one munged
  log "stopped"
}

cmd_status() {
  local n
  for n in munged mariadbd slurmdbd slurmctld slurmd; do
    if pid_alive "$n"; then echo "$n: running (pid $(cat "$STATE/$n.pid"))"
    elif [ -e "$STATE/$n.pid" ] || [ "$n" = slurmctld ] || [ "$n" = slurmd ]; then echo "$n: not running"; fi
  done
  sinfo 2>&1 || true
  case "$(node_state)" in idle|mixed|allocated) return 0 ;; *) return 1 ;; esac
}

case "${1:-}" in
  start)   cmd_start ;;
  stop)    cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status)  cmd_status ;;
  clean)   cmd_stop; rm -rf "$STATE"; log "removed $STATE" ;;
  *) echo "usage: $0 start|stop|status|restart|clean" >&2; exit 2 ;;
esac
