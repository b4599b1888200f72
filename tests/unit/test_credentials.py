"""Credentials leave tracking.uri as the config loads: into mlflow's variables, never into files or scripts."""
import os
from urllib.parse import quote

import pytest
import yaml

from star_scale.config import load_config, save_config
from star_scale.trust.credentials import PASSWORD, USER, split_credentials, strip_credentials

SECRET = "t0ken-with:colon"


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(USER, raising=False)
    monkeypatch.delenv(PASSWORD, raising=False)


def test_split_and_strip():
    assert split_credentials("http://u:p%40ss@host:5000/x") == ("http://host:5000/x", "u", "p@ss")
    assert split_credentials("http://host:5000") == ("http://host:5000", None, None)
    assert split_credentials("https://tok@host") == ("https://host", "tok", "")
    assert split_credentials("sqlite:////runs/x/mlflow.db") == ("sqlite:////runs/x/mlflow.db", None, None)
    line = "tracking.uri=http://me:pw@h:1 and 'https://a:b@c/d' but not user@example.org"
    assert strip_credentials(line) == "tracking.uri=http://h:1 and 'https://c/d' but not user@example.org"


def test_config_moves_credentials_into_mlflow_variables(tmp_path, clean_env):
    cfg = load_config(None, [f"tracking.uri=http://alice:{quote(SECRET, safe='')}@mlflow.internal:5000"])
    assert cfg.tracking.uri == "http://mlflow.internal:5000"
    assert os.environ[USER] == "alice" and os.environ[PASSWORD] == SECRET
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert SECRET not in text and "alice" not in text
    assert yaml.safe_load(text)["tracking"]["uri"] == "http://mlflow.internal:5000"
    assert all(SECRET not in str(v) for v in cfg.flat().values())


def test_submit_script_carries_no_credentials(tmp_path, capsys, clean_env):
    from star_scale.slurm.submit import main

    rc = main(["--dry-run", "recipes/tiny-ar.yaml", f"train.out_dir={tmp_path / 'run'}",
               f"tracking.uri=http://alice:{SECRET.replace(':', '')}@mlflow.internal:5000"])
    script = capsys.readouterr().out
    assert rc == 0 and "tracking.uri=http://mlflow.internal:5000" in script
    assert SECRET.replace(":", "") not in script and "alice" not in script
