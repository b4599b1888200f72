"""The 2-node local cluster leaves nothing behind: after a failed test, and after a SIGTERM to the
test run (a CI timeout, `kill`), its daemons are gone by PID and its namespaces by name."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.services.slurm import ROOT, have_slurm, why_not_netns

# A test run of its own, holding a 2-node cluster: it writes the cluster's folder, waits until the
# caller has seen what the cluster made, then fails or sleeps.
HOLDER = textwrap.dedent('''
    import os, time
    from pathlib import Path
    import pytest
    from tests.services.slurm import LocalSlurm

    @pytest.fixture
    def cluster():
        c = LocalSlurm(nodes=2)
        yield c
        c.stop()

    def test_holds(cluster):
        Path(os.environ["CLUSTER_DIR_FILE"]).write_text(cluster.dir)
        while not Path(os.environ["CLUSTER_DIR_FILE"] + ".seen").exists():
            time.sleep(0.05)
        if os.environ["HOW"] == "fail":
            assert False, "a failed test"
        time.sleep(120)
''')


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("how", ["fail", "sigterm"])
def test_cluster_is_removed_after_a_failed_or_terminated_test_run(how, tmp_path):
    if why_not_netns():
        pytest.skip(why_not_netns())
    if not have_slurm():
        pytest.fail("slurm-wlm and munge are not installed (`make test` installs them when run as root)")
    (tmp_path / "test_holder.py").write_text(HOLDER)
    dir_file = tmp_path / "cluster-dir"
    before = namespaces()
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                            str(tmp_path / "test_holder.py")], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "CLUSTER_DIR_FILE": str(dir_file), "HOW": how})
    try:
        deadline = time.monotonic() + 120
        while not dir_file.exists():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate(timeout=30)[0]
            time.sleep(0.1)
        state = Path(dir_file.read_text())
        pids = [int(p.read_text()) for p in state.glob("*.pid")]
        made = namespaces() - before
        assert len(pids) == 4 and len(made) == 3, (pids, made)  # munged, slurmctld, 2 slurmd; hub + 2 nodes
        Path(f"{dir_file}.seen").touch()
        if how == "sigterm":
            run.send_signal(signal.SIGTERM)
        out = run.communicate(timeout=60)[0]
        left = [p for p in pids if alive(p)], made & namespaces(), state.exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if dir_file.exists():  # what a failure left is removed too, after it was seen
            subprocess.run([str(ROOT / "cluster/local/stop.sh"), dir_file.read_text()], capture_output=True)
    assert run.returncode != 0, out
    assert left == ([], set(), False), out
