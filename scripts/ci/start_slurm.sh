#!/usr/bin/env bash
# A single-node SLURM on this machine for tests/test_slurm.py: Debian's slurm-wlm and munge,
# munged + slurmctld + slurmd with a minimal configuration (CPUs only, no GPUs, no cgroups, no
# accounting). For CI (.ci/run) and throw-away machines, run as root; never for a real cluster.
#
#   bash scripts/ci/start_slurm.sh     # exit 0: `sinfo` shows the node idle; else exit 1, and why
#
# Idempotent: installs only what is missing, leaves running daemons alone, and writes
# /etc/slurm/slurm.conf only where none exists or where this script wrote it (marker line). A
# slurm.conf someone else wrote is never replaced: the script then starts nothing and says so.
# Daemons run in the background (no systemd in containers) with their pid files in /run; their
# logs are in /var/log/slurm/ and /var/log/munge/. Stop them with `bash scripts/ci/start_slurm.sh
# stop` (by the pids in those files).
set -uo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by flaresweep scripts/ci/start_slurm.sh (a single-node test cluster)"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "start_slurm: $*" >&2; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemon() {  # TERM by the pid in its pid file, then wait (up to 30 s) until it is gone
  local pid
  alive "$1" || return 0
  pid=$(cat "$1")
  kill -TERM "$pid"
  for _ in $(seq 60); do
    if ! kill -0 "$pid" 2>/dev/null; then rm -f "$1"; return 0; fi
    sleep 0.5
  done
  say "pid $pid (from $1) did not stop in 30 s"
  return 1
}

if [[ ${1:-} == stop ]]; then
  for pidfile in "$SLURMD_PID" "$CTLD_PID" "$MUNGE_PID"; do stop_daemon "$pidfile"; done
  exit 0
fi

if ((EUID != 0)); then
  say "needs root (it installs packages and starts system daemons); SLURM tests skip"
  exit 1
fi

# -- packages -----------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    say "no apt-get: cannot install slurm-wlm and munge; SLURM tests skip"
    exit 1
  fi
  apt-get update -qq || { say "apt-get update failed; SLURM tests skip"; exit 1; }
  # policy-rc.d (containers) keeps the packages' own service start from running; this script
  # starts the daemons itself below.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       slurm-wlm munge >/dev/null; then
    say "apt-get install slurm-wlm munge failed; SLURM tests skip"
    exit 1
  fi
fi

# -- configuration ------------------------------------------------------------------------------
host=$(hostname -s)
if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
  say "$CONF exists and was not written by this script; leaving this machine's SLURM alone"
  sinfo -h >/dev/null 2>&1 && exit 0
  exit 1
fi
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=flaresweep-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# A requeued job waits out the credential lifetime before it starts again (120 s by default).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
# No cgroups in a container: processes are tracked by parentage, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A cancelled job's processes get 10 s between TERM and KILL (30 s by default).
KillWait=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.tmp" "$CONF"; then
  mv "$CONF.tmp" "$CONF"
  changed=1
else
  rm -f "$CONF.tmp"
  changed=0
fi

# -- daemons ------------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none)
  chown munge:munge /etc/munge/munge.key
fi
if ! alive "$MUNGE_PID"; then
  runuser -u munge -- /usr/sbin/munged || { say "munged did not start; SLURM tests skip"; exit 1; }
fi
if ((changed)); then  # a new configuration: restart what runs under the old one
  stop_daemon "$SLURMD_PID" && stop_daemon "$CTLD_PID" || exit 1
fi
alive "$CTLD_PID" || /usr/sbin/slurmctld || { say "slurmctld did not start (/var/log/slurm/slurmctld.log)"; exit 1; }
alive "$SLURMD_PID" || /usr/sbin/slurmd || { say "slurmd did not start (/var/log/slurm/slurmd.log)"; exit 1; }

for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null)
  if [[ $state == idle || $state == mix || $state == alloc ]]; then
    say "SLURM up: node $host ($(nproc) CPUs) $state"
    exit 0
  fi
  sleep 1
done
say "the node did not become idle in 60 s (sinfo: '${state:-no answer}'); see /var/log/slurm/"
exit 1
