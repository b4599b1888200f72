# Sourced by the cluster/local scripts: what a multi-node local cluster names after its state dir,
# so parallel clusters never collide and stop.sh finds everything even when the dir is gone.
cluster_names() {  # $1: the state dir, absolute
  local tag
  tag=$(printf %s "$1" | md5sum | cut -c1-8)
  prefix=starlocal-$tag
  hub=$prefix-hub                          # the bridge and slurmctld
  net=10.250.$(( 0x${tag:0:2} % 250 + 1 ))  # this cluster's /24 (10.250.X.254 is the hub)
}

# Kill what is left in this cluster's namespaces (by PID), delete its links and namespaces by name.
remove_cluster() {  # uses $prefix and $hub from cluster_names
  local ns link
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$prefix-"); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  done
  if [ -e "/run/netns/$hub" ]; then
    for link in $(ip -n "$hub" -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -v '^lo$'); do
      ip -n "$hub" link del "$link" 2>/dev/null
    done
  fi
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$prefix-"); do ip netns del "$ns"; done
}
