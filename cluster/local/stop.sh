#!/usr/bin/env bash
# Stop the local cluster started by start.sh and remove its state dir.  Safe to run twice,
# or after a failed start: daemons are stopped by their pid files, and a multi-node cluster's
# namespaces and links (named after the state dir) are removed even if the dir is gone.
set -uo pipefail
dir=$(realpath -m "${1:?usage: stop.sh STATE_DIR}")
source "$(dirname "$(realpath "$0")")/names.sh"
cluster_names "$dir"
pidfiles=$(ls "$dir"/slurmd*.pid "$dir/slurmctld.pid" "$dir/munged.pid" 2>/dev/null)
for pidfile in $pidfiles; do kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; done
for _ in $(seq 50); do
  alive=0
  for pidfile in $pidfiles; do kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 0.1
done
[ -e "/run/netns/$hub" ] && remove_cluster
rm -rf "$dir"
exit 0
