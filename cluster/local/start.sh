#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine for tests and the demo.
#
#   eval "$(cluster/local/start.sh [STATE_DIR])"   # prints `export SLURM_CONF=...`
#   ... sbatch / srun / squeue / scontrol ...
#   cluster/local/stop.sh STATE_DIR
#
# Everything (munge key and socket, slurm.conf, spool, logs) lives in STATE_DIR,
# so several clusters can coexist and nothing touches /etc.  No systemd: the
# daemons are started by hand.  Needs Debian's slurm-wlm and munge.
set -euo pipefail

dir=${1:-$(mktemp -d /tmp/slurm.XXXXXX)}
mkdir -p "$dir"/{state,spool,log}
dir=$(cd "$dir" && pwd)
# munge refuses socket paths over 108 characters.
if [ ${#dir} -gt 80 ]; then echo "start.sh: state dir path too long for a munge socket: $dir" >&2; exit 2; fi
for bin in munged slurmctld slurmd sinfo; do
  command -v "$bin" >/dev/null || { echo "start.sh: $bin not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done

user=$(id -un)
host=$(hostname -s)
# A free port pair for slurmctld/slurmd, so parallel test clusters don't collide.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
       --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed"

# What this machine really has (CPUs, sockets, memory): slurmd -C reports it.
node=$(slurmd -C | head -1 | sed -e "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" -e 's/ UpTime=.*//')
mem=$(echo "$node" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
node=$(echo "$node" | sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/")

cat > "$dir/slurm.conf" <<CONF
ClusterName=starlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdTimeout=30
InactiveLimit=0
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 100); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "start.sh: node did not become idle (state: ${state:-none}); logs in $dir/log" >&2
exit 1
