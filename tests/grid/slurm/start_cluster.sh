#!/usr/bin/env bash
# Start a throwaway single-node Slurm cluster (munged, slurmctld, slurmd) whose every file lives in
# DIR, for tests/grid/test_slurm.py. Usage: bash tests/grid/slurm/start_cluster.sh DIR
#
# Installs Debian's packages when the daemons are missing (root: apt-get update, then
# apt-get install slurmctld slurmd slurm-client munge), writes DIR/slurm.conf (localhost, ports
# chosen free, munge socket and key in DIR, so nothing system-wide is touched or started), starts
# the three daemons with their PIDs in DIR/*.pid and waits until the node is idle.
# Stop it with: bash tests/grid/slurm/stop_cluster.sh DIR
#
# Exit status: 0 the cluster is up (then `export SLURM_CONF=DIR/slurm.conf`); 77 this machine
# cannot run it (the last stderr line is "SKIP: <reason>"); anything else is a failure.
set -uo pipefail
dir=${1:?usage: start_cluster.sh DIR}
mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
skip() { echo "SKIP: $*" >&2; exit 77; }
fail() { echo "FAIL: $*" >&2; exit 1; }
tails() { for f in "$dir"/log/*; do echo "--- $f"; tail -n 5 "$f"; done 2>/dev/null | tr '\n' ' '; }

[ "$(uname -s)" = Linux ] || skip "Slurm daemons need Linux (this is $(uname -s))"
[ "$(id -u)" = 0 ] || skip "not root (uid $(id -u)): installing Slurm and running slurmd need root"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || skip "Slurm is not installed and there is no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt_tail() { tail -n 3 "$dir/apt.log" | tr '\n' ' '; }
  apt-get update -q >"$dir/apt.log" 2>&1 || skip "apt-get update failed: $(apt_tail)"
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
    >>"$dir/apt.log" 2>&1 \
    || skip "apt-get install slurmctld slurmd slurm-client munge failed: $(apt_tail)"
fi

mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
chmod 0700 "$dir/munge"
mkdir -p "$dir/munge-run" && chmod 0755 "$dir/munge-run"  # munged wants a 0755 socket dir
key=$dir/munge/munge.key
if [ ! -s "$key" ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key"
  else dd if=/dev/urandom of="$key" bs=1 count=1024 2>/dev/null; fi
  chmod 0400 "$key"
fi
socket=$dir/munge-run/munge.socket
munged --force --socket="$socket" --key-file="$key" --pid-file="$dir/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
  </dev/null >>"$dir/log/munged.out" 2>&1 || skip "munged failed to start: $(tails)"

read -r ctld_port d_port < <("${PYTHON:-python3}" - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
[ -n "${d_port:-}" ] || fail "could not pick two free TCP ports"
host=$(hostname -s)
node=$(slurmd -C 2>/dev/null | head -n 1)
[ -n "$node" ] || skip "slurmd -C printed nothing"
cat >"$dir/slurm.conf" <<CONF
# Single-node test cluster written by tests/grid/slurm/start_cluster.sh
ClusterName=nvfp4test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld </dev/null >>"$dir/log/slurmctld.out" 2>&1 || skip "slurmctld failed to start: $(tails)"
slurmd </dev/null >>"$dir/log/slurmd.out" 2>&1 || skip "slurmd failed to start: $(tails)"
for _ in $(seq 1 150); do  # up to 30 s for the node to register
  state=$(sinfo -h -o %T 2>/dev/null | head -n 1)
  [ "$state" = idle ] && { echo "SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.2
done
skip "the Slurm node never became idle (sinfo: '${state:-}'): $(tails)"
