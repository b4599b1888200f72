"""Credentials in a tracking URI never reach a log line, a run folder or mlflow params.

``http://user:token@host:5000`` is split as the config loads: the URI keeps
``http://host:5000`` (what gets printed, saved in config.yaml and logged as a
param) and the user and password go to this process's
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which mlflow
reads for HTTP basic auth (``MLFLOW_TRACKING_TOKEN`` for a bearer token).
Child processes (torchrun ranks, sbatch jobs) inherit them; no file does.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger(__name__)
USER, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")


def split_credentials(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """(URI without user info, user, password); user and password None when it had none."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user), unquote(password)


def take_credentials(uri: Optional[str]) -> Optional[str]:
    """The URI without credentials; its user and password move to mlflow's environment variables."""
    if not uri:
        return uri
    clean, user, password = split_credentials(uri)
    if user is None:
        return uri
    os.environ[USER], os.environ[PASSWORD] = user, password or ""
    log.info("tracking.uri: credentials taken out of the URI into %s/%s of this process (use those variables "
             "instead of a URI with a password)", USER, PASSWORD)
    return clean


def strip_credentials(text: str) -> str:
    """Every ``scheme://user:secret@host`` in ``text`` becomes ``scheme://host`` (for files and command lines)."""
    return _USERINFO.sub(lambda m: m.group("scheme"), text)
