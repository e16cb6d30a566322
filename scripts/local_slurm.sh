#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the integration tests and for trying the cluster launch
# (Debian 12, as root, without systemd).
#
#   bash scripts/local_slurm.sh start    install the Debian packages if missing, then start munged, MariaDB +
#                                        slurmdbd (so sacct works: submitit and trainer.launch need it to see
#                                        failed or cancelled jobs), slurmctld, slurmd; returns once the node
#                                        takes jobs. Running it again with everything up does nothing.
#   bash scripts/local_slurm.sh stop     cancel the jobs, stop only the daemons this script started
#   bash scripts/local_slurm.sh status
#
# Environment: LIGHTNING_SLURM_DIR (state, logs, database; default /tmp/lightning-slurm),
#   LIGHTNING_SLURM_PARTITION (default debug),
#   FAKE_GPUS=N (advertise N "gpu" GRES backed by copies of /dev/null, so that --gpus-per-node=N headers
#   are accepted on a machine without GPUs; Slurm then sets CUDA_VISIBLE_DEVICES, which a CPU torch ignores).
# A controller that answers but was not started by this script is left alone and used as it is.
set -euo pipefail

BASE=${LIGHTNING_SLURM_DIR:-/tmp/lightning-slurm}
PART=${LIGHTNING_SLURM_PARTITION:-debug}
FAKE_GPUS=${FAKE_GPUS:-0}
DB_PORT=3317
PIDS=$BASE/pids   # <daemon>.pid for each daemon this script started (and only those)
RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state DB=$BASE/mariadb
MARK="# written by lightning-distill scripts/local_slurm.sh"
CONF=/etc/slurm/slurm.conf

say() { echo "[local_slurm] $*" >&2; }
die() { say "$*"; exit 1; }

ours() { # ours <daemon>: true if the daemon we recorded is still that process
  local f=$PIDS/$1.pid p
  [[ -s $f ]] || return 1
  p=$(cat "$f")
  [[ -r /proc/$p/comm && $(cat "/proc/$p/comm") == "$1" ]]
}

retry() { # retry <seconds> <command...>: until it succeeds or the time is up
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.3; done
}

remember() { # remember <daemon> <pidfile the daemon writes>
  retry 30 test -s "$2" || die "$1 wrote no pid file $2"
  cp "$2" "$PIDS/$1.pid"
}

install_packages() {
  local missing=() p
  for p in slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get (Debian/Ubuntu only)"
  say "installing ${missing[*]}"
  apt-get update -qq >"$LOG/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 \
    || { tail -20 "$LOG/apt.log"; die "apt-get install failed"; }
}

write_config() {
  local host topo mem gres_types="" node_gres=""
  host=$(hostname -s)
  topo=$(slurmd -C | head -1 | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ')
  mem=$(slurmd -C | grep -oE 'RealMemory=[0-9]+' | cut -d= -f2)
  mkdir -p /etc/slurm
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF" && [[ ! -f $BASE/slurm.conf.orig ]]; then
    cp "$CONF" "$BASE/slurm.conf.orig"  # put back by `stop`
  fi
  if ((FAKE_GPUS > 0)); then
    gres_types="GresTypes=gpu" node_gres="Gres=gpu:$FAKE_GPUS "
    { echo "$MARK"; echo "AutoDetect=off"
      for ((g = 0; g < FAKE_GPUS; g++)); do
        [[ -e /dev/lightning-fakegpu$g ]] || mknod /dev/lightning-fakegpu$g c 1 3  # = /dev/null
        echo "Name=gpu File=/dev/lightning-fakegpu$g"
      done; } >/etc/slurm/gres.conf
  elif [[ -f /etc/slurm/gres.conf ]] && grep -qF "$MARK" /etc/slurm/gres.conf; then
    rm -f /etc/slurm/gres.conf
  fi
  cat >"$CONF" <<EOF
$MARK
ClusterName=lightning
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
JobRequeue=1
$gres_types
NodeName=$host ${topo}${node_gres}RealMemory=$((mem * 9 / 10)) State=UNKNOWN
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1024
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=lightning
StorageLoc=lightning_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return 0; fi  # ours from an earlier start, or the machine's own
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    mungekey -c -f -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  remember munged /run/munge/munged.pid
  retry 15 munge_works || die "munge does not work"
}

sql() { mariadb --socket="$DB/run/mysqld.sock" "$@"; }

start_mariadb() {
  ours mariadbd && return 0
  install -d -o mysql -g mysql "$DB/data" "$DB/run"
  if [[ ! -d $DB/data/mysql ]]; then
    mariadb-install-db --user=mysql --datadir="$DB/data" --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
      || { tail "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  rm -f "$DB/run/mariadbd.pid"
  setsid /usr/sbin/mariadbd --user=mysql --datadir="$DB/data" --socket="$DB/run/mysqld.sock" \
    --pid-file="$DB/run/mariadbd.pid" --port=$DB_PORT --bind-address=127.0.0.1 \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --skip-name-resolve \
    --log-error="$LOG/mariadb.err" </dev/null >/dev/null 2>&1 &
  remember mariadbd "$DB/run/mariadbd.pid"
  retry 60 sql -e 'select 1' || { tail "$LOG/mariadb.err"; die "MariaDB does not answer"; }
  sql -e "CREATE DATABASE IF NOT EXISTS lightning_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'lightning';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'lightning';
    GRANT ALL ON lightning_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON lightning_acct_db.* TO 'slurm'@'localhost';"
}

start_daemon() { # slurmdbd | slurmctld | slurmd: each daemonizes and writes $RUN/<name>.pid
  local name=$1
  ours "$name" && return 0
  rm -f "$RUN/$name.pid"
  /usr/sbin/"$name" </dev/null >"$LOG/$name.stdout" 2>&1 || { tail "$LOG/$name.log" "$LOG/$name.stdout"; die "$name did not start"; }
  remember "$name" "$RUN/$name.pid"
}

node_ready() { sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

start() {
  [[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts daemons)"
  mkdir -p "$PIDS" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd"
  local t0=$SECONDS
  if ! ours slurmctld && [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF" && timeout 10 scontrol ping >/dev/null 2>&1; then
    say "a SLURM controller this script did not start is running: using it as it is"; sinfo; return 0
  fi
  install_packages
  if ! ours slurmctld; then write_config; fi  # a running controller keeps the config it was started with
  start_munge
  start_mariadb
  start_daemon slurmdbd
  retry 60 sacctmgr -n -i show cluster || { tail "$LOG/slurmdbd.log"; die "slurmdbd does not answer"; }
  start_daemon slurmctld
  retry 60 scontrol ping || { tail "$LOG/slurmctld.log"; die "slurmctld does not answer"; }
  start_daemon slurmd
  if ! retry 30 node_ready; then  # e.g. the node was left DOWN by an unclean stop
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    retry 30 node_ready || { sinfo -R; tail "$LOG/slurmd.log"; die "the node does not come up"; }
  fi
  sinfo
  say "ready in $((SECONDS - t0)) s (state and logs in $BASE)"
}

stop() {
  if ours slurmctld; then
    scancel --partition="$PART" >/dev/null 2>&1 || true
    retry 30 bash -c '[[ -z $(squeue -h 2>/dev/null) ]]' || true
  fi
  local name pid
  for name in slurmd slurmctld slurmdbd mariadbd munged; do  # reverse start order
    if ours "$name"; then
      pid=$(cat "$PIDS/$name.pid")
      say "stopping $name ($pid)"
      kill "$pid" 2>/dev/null || true
      retry 30 bash -c "! test -d /proc/$pid" || { say "$name ($pid) still there: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
    fi
    rm -f "$PIDS/$name.pid"
  done
  if [[ -f $BASE/slurm.conf.orig ]]; then mv "$BASE/slurm.conf.orig" "$CONF"; say "restored the previous $CONF"; fi
}

status() {
  local name
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    if ours "$name"; then echo "$name: running (pid $(cat "$PIDS/$name.pid"))"; else echo "$name: not started by this script"; fi
  done
  sinfo 2>/dev/null || echo "sinfo: no controller answers"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
