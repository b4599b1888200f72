"""mlflow experiment tracking on rank 0, resilient to a tracking server going away.

Metrics, params and artifacts go into a buffer that a background thread sends
with ``MlflowClient.log_batch``.  When the server is unreachable, training
goes on, the buffer keeps everything, a warning says so once, and the buffer
is sent when the server returns.  The default store is a sqlite database in
the run folder (no server needed).  A resumed run reopens the same mlflow run
(its id travels in the checkpoint), so one run holds the whole step axis.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from star_scale.config import Config
from star_scale.trust.credentials import strip_credentials, take_credentials

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # mlflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


def run_tags() -> dict:
    tags = {"host": socket.gethostname()}
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
        if sha:
            tags["git_commit"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    # Extra tags as a JSON object, e.g. {"sweep": "tiny"} from `star-scale sweep submit`'s array tasks.
    extra = os.environ.get("STAR_SCALE_MLFLOW_TAGS")
    if extra:
        try:
            tags.update({str(k): str(v) for k, v in json.loads(extra).items()})
        except (ValueError, AttributeError):
            log.warning("STAR_SCALE_MLFLOW_TAGS=%r: expected a JSON object of tags; ignored", extra)
    return tags


def resolve_experiment(client, cfg: Config, artifact_location: Optional[str] = None) -> str:
    """The experiment id: given (created before a Slurm submission, no race) or looked up by name.

    artifact_location: where a new experiment keeps artifacts (mlflow's default for a sqlite
    store is ./mlruns of the current directory, not the run folder).
    """
    given = cfg.tracking.experiment_id or os.environ.get("STAR_SCALE_MLFLOW_EXPERIMENT_ID")
    if given:
        return str(given)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment,
                                                                   artifact_location=artifact_location)


def default_artifacts(run_dir: Path) -> str:
    return (run_dir.resolve() / "mlartifacts").as_uri()


def log_artifact_without_credentials(client, run_id: str, path: str) -> None:
    """Upload ``path``, or a copy without URI credentials when it has some (a recipe may name a server)."""
    try:
        text = Path(path).read_text()
    except (UnicodeDecodeError, OSError):
        text = None
    clean = strip_credentials(text) if text is not None else None
    if clean == text:
        client.log_artifact(run_id, path)
        return
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / Path(path).name
        copy.write_text(clean)
        client.log_artifact(run_id, str(copy))


class NullTracker:
    run_id: Optional[str] = None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path) -> None: ...
    def flush(self, timeout: float = 0) -> bool: return True
    def close(self, status: Optional[str] = "FINISHED", timeout: float = 0) -> None: ...


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, run_id: Optional[str] = None, flush_every: float = 2.0):
        # Fail fast on an unreachable server: the buffer, not HTTP retries, carries us through outages.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        # mlflow logs every failed database call with a traceback (a full disk: dozens); _send's one warning says it
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        from mlflow.tracking import MlflowClient

        self.uri = take_credentials(cfg.tracking.uri) or default_uri(run_dir)  # printed below: never with a password
        self.client = MlflowClient(tracking_uri=self.uri)
        self.cfg, self.run_id, self.flush_every, self.run_dir = cfg, run_id, flush_every, run_dir
        self._reopen = run_id is not None  # a resumed run goes back to RUNNING
        self._metrics: list = []
        self._params = [] if run_id else list(cfg.flat().items())  # a resumed run has them already
        self._artifacts: list[str] = []
        self._lock = threading.Lock()  # guards the buffers
        self._send_lock = threading.Lock()  # one sender at a time (thread vs flush/close)
        self._down_since: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-flush", daemon=True)
        self._send()  # create (or reopen) the run now if the server is there
        self._thread.start()

    # ---- public --------------------------------------------------------------
    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            self._metrics.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())

    def log_artifact(self, path) -> None:
        with self._lock:
            self._artifacts.append(str(path))

    def flush(self, timeout: float = 0) -> bool:
        """Try to send everything buffered, retrying up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self._send():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)

    def close(self, status: Optional[str] = "FINISHED", timeout: float = 60.0) -> None:
        """Send what is buffered and mark the run ``status`` (None: leave it running, e.g. preempted)."""
        self._stop.set()
        self._thread.join()
        if not self.flush(timeout):
            with self._lock:
                n = len(self._metrics)
            log.warning("mlflow at %s unreachable at exit: %d metric points not sent "
                        "(they are in the run's metrics.jsonl)", self.uri, n)
            return
        if status is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001 - tracking must never fail training
            log.warning("mlflow: could not mark run %s %s: %s", self.run_id, status, e)

    # ---- internals -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.flush_every):
            self._send()

    def _send(self) -> bool:
        with self._send_lock:
            return self._send_locked()

    def _send_locked(self) -> bool:
        with self._lock:
            metrics, params, artifacts = self._metrics, self._params, self._artifacts
            self._metrics, self._params, self._artifacts = [], [], []
        try:
            if self.run_id is None:
                exp = resolve_experiment(self.client, self.cfg,
                                         None if self.cfg.tracking.uri else default_artifacts(self.run_dir))
                run = self.client.create_run(exp, run_name=self.cfg.tracking.run_name or self.cfg.name, tags=run_tags())
                self.run_id = run.info.run_id
                log.info("mlflow run %s in experiment %s at %s", self.run_id, exp, self.uri)
            if self._reopen:
                self.client.update_run(self.run_id, status="RUNNING")
                self._reopen = False
            from mlflow.entities import Param

            while params:
                self.client.log_batch(self.run_id, params=[Param(k, strip_credentials(str(v)))
                                                           for k, v in params[:MAX_PARAMS_PER_BATCH]])
                params = params[MAX_PARAMS_PER_BATCH:]
            while metrics:
                self.client.log_batch(self.run_id, metrics=metrics[:MAX_METRICS_PER_BATCH])
                metrics = metrics[MAX_METRICS_PER_BATCH:]
            while artifacts:
                log_artifact_without_credentials(self.client, self.run_id, artifacts[0])
                artifacts = artifacts[1:]
        except Exception as e:  # noqa: BLE001 - any failure: keep the data, retry later
            with self._lock:  # put back what was not sent, in order
                self._metrics[:0], self._params[:0], self._artifacts[:0] = metrics, params, artifacts
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("mlflow at %s unreachable (%s: %s); training continues and metrics are buffered "
                            "until it returns", self.uri, type(e).__name__, str(e).splitlines()[0][:200])
            return False
        if self._down_since is not None:
            log.warning("mlflow at %s reachable again after %.0f s; buffered metrics sent",
                        self.uri, time.monotonic() - self._down_since)
            self._down_since = None
        return True


def make_tracker(cfg: Config, run_dir: Path, run_id: Optional[str], is_main: bool):
    if not (cfg.tracking.enabled and is_main):
        return NullTracker()
    try:
        return Tracker(cfg, run_dir, run_id)
    except Exception as e:  # noqa: BLE001 - e.g. its sqlite file cannot be created on a full disk
        log.warning("mlflow at %s unusable (%s: %s); no tracking in this job, metrics are in metrics.jsonl",
                    cfg.tracking.uri or default_uri(run_dir), type(e).__name__, str(e).splitlines()[0][:200])
        null = NullTracker()
        null.run_id = run_id  # the next job reopens the same mlflow run
        return null
