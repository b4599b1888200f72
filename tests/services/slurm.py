"""The real local Slurm cluster (cluster/local/) as a test helper."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A requeued job started again within the second of its requeue was killed ("Killing non-startable
# batch job: Job credential revoked"): release it only after this long.
REQUEUE_SETTLE_S = 2


class LocalSlurm:
    def __init__(self, nodes: int = 1, conf: tuple = ()):
        """``conf``: more slurm.conf lines (start.sh --conf)."""
        self.dir = tempfile.mkdtemp(prefix="slurm.", dir="/tmp")  # short path: munge socket < 108 chars
        extra = [a for line in conf for a in ("--conf", line)]
        out = subprocess.run([str(ROOT / "cluster/local/start.sh"), "--nodes", str(nodes), *extra, self.dir],
                             capture_output=True, text=True)
        if out.returncode:
            self.stop()  # a half-built cluster: its daemons and namespaces go too
            raise RuntimeError(f"local Slurm did not start: {out.stderr}")
        venv_bin = Path(sys.executable).parent
        # Jobs inherit this environment (sbatch --export=ALL): the venv first on PATH and its
        # DeepSpeed extension cache, so 2-rank jobs reuse the JIT-built comm op.
        self.env = {**os.environ, "SLURM_CONF": f"{self.dir}/slurm.conf",
                    "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
                    "DEEPSPEED_TIMEOUT": "2", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        """A client command where the controller is reachable (cluster/local/client.sh)."""
        out = subprocess.run([str(ROOT / "cluster/local/client.sh"), self.dir, *map(str, cmd)],
                             capture_output=True, text=True, env=self.env, **kw)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({out.returncode}): {out.stdout}\n{out.stderr}")
        return out

    def node(self, index: int, action: str) -> str:
        """cluster/local/node.sh: `lose` node `index` (its link cut, its processes killed) or `start` it again."""
        out = subprocess.run([str(ROOT / "cluster/local/node.sh"), self.dir, str(index), action],
                             capture_output=True, text=True, env=self.env)
        if out.returncode:
            raise RuntimeError(f"node.sh {index} {action} failed: {out.stderr}")
        return out.stdout

    def job(self, job: str) -> dict:
        """`scontrol show job -o` as fields (the first line: an array's first task)."""
        out = self.run("scontrol", "show", "job", job, "-o", check=False).stdout
        line = out.splitlines()[0] if out.strip() else ""
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def job_state(self, job: str) -> str:
        return self.job(job).get("JobState", "UNKNOWN")

    def wait(self, job: str, timeout: float = 600, release: bool = False) -> str:
        """Until the job ends. ``release``: a requeued job that Slurm holds again (its BeginTime, or a held
        requeue after a failed launch) is let go, as its user would, once it has been pending 2 s."""
        deadline = time.monotonic() + timeout
        pending_since = None
        while time.monotonic() < deadline:
            fields = self.job(job)
            state = fields.get("JobState", "UNKNOWN")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            pending_since = (pending_since or time.monotonic()) if state == "PENDING" else None
            if release and state == "PENDING" and time.monotonic() - pending_since >= REQUEUE_SETTLE_S:
                reason = fields.get("Reason", "")
                if reason == "BeginTime":
                    self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
                elif "held" in reason.lower() or fields.get("Priority") == "0":
                    self.run("scontrol", "release", job, check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout} s: {self.job(job)}\n"
                           f"slurmctld.log:\n{self.controller_log()}")

    def controller_log(self, lines: int = 40) -> str:
        path = Path(self.dir) / "log" / "slurmctld.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(none)"

    def start_requeued_now(self, job: str, timeout: float = 300) -> None:
        """Slurm holds a requeued job about 2 minutes (BeginTime) before it may restart; tests need not wait."""
        deadline = time.monotonic() + timeout
        while self.job_state(job) != "PENDING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} was not requeued: {self.job_state(job)}")
            time.sleep(0.2)
        time.sleep(REQUEUE_SETTLE_S)
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    def stop(self) -> None:
        subprocess.run([str(ROOT / "cluster/local/stop.sh"), self.dir], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def why_not_netns() -> str:
    """Why a multi-node local cluster cannot start here ('' when it can)."""
    if os.geteuid() != 0:
        return "network namespaces for the 2-node cluster need root"
    if not shutil.which("ip") or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "no `ip netns` (iproute2) on this machine"
    return ""


def have_slurm() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))
