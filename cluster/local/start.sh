#!/usr/bin/env bash
# Start a local Slurm cluster on this machine for tests and the demo.
#
#   eval "$(cluster/local/start.sh [--nodes N] [--conf LINE]... [STATE_DIR])"   # prints `export SLURM_CONF=...`
#   cluster/local/client.sh STATE_DIR sbatch ...               # squeue / scontrol / star-scale submit
#   cluster/local/stop.sh STATE_DIR
#
# Everything (munge key and socket, slurm.conf, spool, logs) lives in STATE_DIR,
# so several clusters can coexist and nothing touches /etc.  No systemd: the
# daemons are started by hand.  Needs Debian's slurm-wlm and munge.
#
# One node (default): slurmctld and slurmd on 127.0.0.1.  N nodes (root, iproute2):
# node1..nodeN are network namespaces made by node.sh, each with its own hostname
# and address on a bridge in a hub namespace where slurmctld listens, so the
# controller outlives any node; one munged serves all (its socket is a file).
# No default route anywhere: traffic stays on loopback and these links.
set -euo pipefail

nodes=1
conf=()  # --conf LINE: one more slurm.conf line (e.g. 'Prolog=/path/prolog.sh'), repeatable
while [ $# -gt 0 ]; do
  case $1 in
  --nodes) nodes=${2:-}; shift 2 || shift ;;
  --conf) [[ ${2:-} == *=* ]] || { echo "start.sh: --conf '${2:-}': expected a slurm.conf line Key=Value" >&2; exit 2; }
          conf+=("$2"); shift 2 ;;
  *) break ;;
  esac
done
if ! [[ $nodes =~ ^[1-9][0-9]*$ ]]; then echo "start.sh: --nodes '$nodes': expected a positive integer" >&2; exit 2; fi
dir=${1:-$(mktemp -d /tmp/slurm.XXXXXX)}
mkdir -p "$dir"/{state,spool,log}
dir=$(realpath "$dir")
here=$(dirname "$(realpath "$0")")
# munge refuses socket paths over 108 characters.
if [ ${#dir} -gt 80 ]; then echo "start.sh: state dir path too long for a munge socket: $dir" >&2; exit 2; fi
for bin in munged slurmctld slurmd sinfo; do
  command -v "$bin" >/dev/null || { echo "start.sh: $bin not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done
if [ "$nodes" -gt 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "start.sh: --nodes $nodes needs root (network namespaces)" >&2; exit 2; }
  for bin in ip nsenter unshare; do
    command -v "$bin" >/dev/null || { echo "start.sh: $bin not found (apt-get install iproute2 util-linux)" >&2; exit 2; }
  done
fi

user=$(id -un)
host=$(hostname -s)
# A free port pair for slurmctld/slurmd, so parallel test clusters don't collide.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
       --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed"

# What this machine really has (CPUs, sockets, memory): slurmd -C reports it.
hw=$(slurmd -C | head -1)
mem=$(echo "$hw" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
if [ "$nodes" = 1 ]; then
  ctl_addr=127.0.0.1
  node_lines="$(echo "$hw" | sed -e "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" -e 's/ UpTime=.*//' \
                 -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/") State=UNKNOWN"
  node_names=$host
  # Each task bound to its own CPUs.
  task_plugin=task/affinity
  slurmd_timeout=30
else
  source "$here/names.sh"
  cluster_names "$dir"
  ctl_addr=$net.254
  # The machine's CPUs and memory shared out: N nodes together claim what is really there.
  cpus=$(( $(nproc) / nodes )); [ "$cpus" -ge 1 ] || cpus=1
  node_lines=""
  for i in $(seq "$nodes"); do
    node_lines+="NodeName=node$i NodeHostname=node$i NodeAddr=$net.$i CPUs=$cpus Boards=1 SocketsPerBoard=1 "
    node_lines+="CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$((mem * 9 / 10 / nodes)) State=UNKNOWN"$'\n'
  done
  node_names=node[1-$nodes]
  # Every node sees the same physical CPUs: affinity would pin each node's first task to CPU 0.
  task_plugin=task/none
  # Node loss detected in seconds (the controller pings every SlurmdTimeout/3).
  slurmd_timeout=6
  { echo "127.0.0.1 localhost"; echo "$ctl_addr hub"; for i in $(seq "$nodes"); do echo "$net.$i node$i"; done; } > "$dir/hosts"
fi

cat > "$dir/slurm.conf" <<CONF
ClusterName=starlocal
SlurmctldHost=$host($ctl_addr)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=$task_plugin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdTimeout=$slurmd_timeout
InactiveLimit=0
$(printf '%s\n' "${conf[@]}")
$node_lines
PartitionName=debug Nodes=$node_names Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
if [ "$nodes" = 1 ]; then
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
else
  (
    # One start at a time on this machine: the sweep below must not take a cluster being built for dead.
    exec 9>/run/starlocal.lock
    flock 9
    # Clusters whose controller is gone (a killed test run) leave namespaces behind: remove them.
    for stale in $(ip netns list | awk '{print $1}' | grep '^starlocal-.*-hub$' || true); do
      if [ -z "$(ip netns pids "$stale")" ]; then (prefix=${stale%-hub}; hub=$stale; remove_cluster); fi
    done
    remove_cluster  # this state dir's own leftovers, if any
    ip netns add "$hub"
    ip -n "$hub" link set lo up
    ip -n "$hub" link add br0 type bridge
    ip -n "$hub" addr add "$ctl_addr/24" dev br0
    ip -n "$hub" link set br0 up
    nsenter --net="/run/netns/$hub" slurmctld -f "$SLURM_CONF"
  )
  for i in $(seq "$nodes"); do "$here/node.sh" "$dir" "$i" start; done
fi

for _ in $(seq 100); do
  states=$("$here/client.sh" "$dir" sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
  [ "$states" = "idle " ] && [ "$("$here/client.sh" "$dir" sinfo -h -N -o %N | wc -l)" = "$nodes" ] && {
    echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "start.sh: nodes did not become idle (states: ${states:-none}); logs in $dir/log" >&2
exit 1
