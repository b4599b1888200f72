#!/usr/bin/env bash
# Run a Slurm client command (sbatch, squeue, scontrol, star-scale submit, ...) against the
# local cluster in STATE_DIR:  cluster/local/client.sh STATE_DIR squeue
# A multi-node cluster's controller listens only on its private bridge: the command joins the
# hub's network namespace (nothing else of it), so the host's own network is never touched.
set -euo pipefail
dir=$(realpath -m "${1:?usage: client.sh STATE_DIR COMMAND...}")
shift
source "$(dirname "$0")/names.sh"
cluster_names "$dir"
export SLURM_CONF=$dir/slurm.conf
if [ -e "/run/netns/$hub" ]; then exec nsenter --net="/run/netns/$hub" "$@"; fi
exec "$@"
