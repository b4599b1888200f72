"""A tracking URI with a password: training logs to a real password-protected mlflow server, and the
password appears in no output line, no file of the run folder, no mlflow param, tag or artifact."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY
from tests.services.conftest import MlflowServer

PASSWORD = "pw-Sekr1t-3141592653"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root}/basic_auth.db\n"
                   f"admin_username = admin\nadmin_password = {PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = MlflowServer(root, args=("--app-name", "basic-auth"),
                          env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key"})
    server.start()
    yield server
    server.stop()


def test_password_in_tracking_uri_never_lands_in_logs_files_or_params(auth_server, token_npz, tmp_path, monkeypatch):
    host = auth_server.uri.split("//", 1)[1]
    secret_uri = f"http://admin:{PASSWORD}@{host}"
    recipe = tmp_path / "secret.yaml"
    recipe.write_text(f"tracking:\n  uri: {secret_uri}\n  experiment: creds\n")
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "star_scale.cli", "train", str(recipe), *TINY,
                          f"data.path={token_npz}", "data.global_batch=16", "train.steps=2", "train.log_every=1",
                          f"train.out_dir={run}", "optimizer.lr_batch=null"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "STAR_SCALE_LOG": "INFO"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "unreachable" not in out.stderr, out.stderr[-3000:]  # the password reached the server (via env)
    assert PASSWORD not in out.stdout + out.stderr
    assert f"at {auth_server.uri}" in out.stderr  # the URI is printed, without its user info
    for f in run.rglob("*"):
        if f.is_file():
            assert PASSWORD.encode() not in f.read_bytes(), f
    assert f"uri: {auth_server.uri}\n" in (run / "config.yaml").read_text()

    # The server is protected: without credentials nothing is readable, so the run below got there with them.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(Exception, match="401|nauthorized|credentials"):
        MlflowClient(auth_server.uri).search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(auth_server.uri)
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    data = client.get_run(run_id).data
    assert data.params["tracking.uri"] == auth_server.uri
    assert not [k for k, v in {**data.params, **data.tags}.items() if PASSWORD in v]
    assert len(client.get_metric_history(run_id, "loss")) == 2
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    client.download_artifacts(run_id, "", str(artifacts))
    names = sorted(p.name for p in artifacts.rglob("*") if p.is_file())
    assert names == ["config.yaml", "secret.yaml"], names
    for f in artifacts.rglob("*.yaml"):
        assert PASSWORD not in f.read_text(), f
    assert f"uri: {auth_server.uri}" in (artifacts / "secret.yaml").read_text()
