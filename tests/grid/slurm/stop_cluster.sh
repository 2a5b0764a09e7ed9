#!/usr/bin/env bash
# Stop the test cluster that start_cluster.sh started in DIR: its daemons, by the PIDs in DIR.
# Usage: bash tests/grid/slurm/stop_cluster.sh DIR
set -uo pipefail
dir=${1:?usage: stop_cluster.sh DIR}
# Cancel what is still queued or running on this cluster first: stopping slurmd alone would leave
# the jobs' slurmstepd and cell processes behind.
if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
  export SLURM_CONF=$dir/slurm.conf
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 100); do  # up to 20 s
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi
pids=()
for name in slurmd slurmctld munged; do
  f=$dir/$name.pid
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" && pids+=("$pid"); fi
done
for _ in $(seq 1 50); do  # up to 10 s, then SIGKILL
  alive=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  [ ${#alive[@]} -eq 0 ] && exit 0
  sleep 0.2
done
for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null; done
exit 0
