#!/usr/bin/env bash
# Stop the local cluster started by start.sh and remove its state dir.
set -uo pipefail
dir=${1:?usage: stop.sh STATE_DIR}
[ -d "$dir" ] || exit 0
for pidfile in slurmd.pid slurmctld.pid munged.pid; do
  [ -f "$dir/$pidfile" ] && kill "$(cat "$dir/$pidfile")" 2>/dev/null
done
for _ in $(seq 50); do
  alive=0
  for pidfile in slurmd.pid slurmctld.pid munged.pid; do
    [ -f "$dir/$pidfile" ] && kill -0 "$(cat "$dir/$pidfile")" 2>/dev/null && alive=1
  done
  [ $alive = 0 ] && break
  sleep 0.1
done
rm -rf "$dir"
