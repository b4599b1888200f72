#!/usr/bin/env bash
# One node of a multi-node local cluster (start.sh --nodes N):
#
#   cluster/local/node.sh STATE_DIR I start   # (re)create node I's namespace and link, start its slurmd
#   cluster/local/node.sh STATE_DIR I lose    # the node dies: link cut, every process on it killed by PID
#
# A node is a network namespace with one veth to the hub's bridge (address X.I, no default route),
# and its own hostname and /etc/hosts (a UTS and mount namespace around slurmd; not `ip netns
# exec`, which remounts /sys and slurmd then finds no cgroup mount).  `lose` cuts the link
# first, so peers see no connection close: like a machine losing power, not a clean exit.
set -euo pipefail
dir=$(realpath -m "${1:?usage: node.sh STATE_DIR I start|lose}")
i=${2:?node index}
action=${3:?start or lose}
source "$(dirname "$0")/names.sh"
cluster_names "$dir"
ns=$prefix-node$i

case $action in
start)
  mkdir -p "$dir/spool/node$i"
  if [ ! -e "/run/netns/$ns" ]; then
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  fi
  if ! ip -n "$hub" link show "node$i" >/dev/null 2>&1; then
    ip -n "$hub" link add "node$i" type veth peer name eth0 netns "$ns"
    ip -n "$hub" link set "node$i" master br0
    ip -n "$ns" addr add "$net.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
  fi
  ip -n "$hub" link set "node$i" up
  nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
    "hostname node$i && mount --bind '$dir/hosts' /etc/hosts && exec slurmd -f '$dir/slurm.conf' -N node$i"
  ;;
lose)
  ip -n "$hub" link set "node$i" down
  pids=$(ip netns pids "$ns" | tr '\n' ',')
  [ -z "$pids" ] && exit 0
  ps -o pid=,args= -p "${pids%,}"  # what died, for the caller's log
  kill -9 ${pids//,/ }
  ;;
*) echo "node.sh: unknown action '$action': expected start or lose" >&2; exit 2 ;;
esac
