"""Locked doors: the credentials the stack's servers ask for, read from the environment or from files.

    MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD   MLflow's basic-auth app: its admin user
    PREFECT_API_AUTH_STRING                               Prefect's API auth string, "user:password"

These are the variables MLflow's and Prefect's own clients read, so every process handed the
environment talks to the locked servers unchanged. A secret may instead sit in a file (a Docker or
Kubernetes secret) named by MLFLOW_TRACKING_PASSWORD_FILE or PREFECT_API_AUTH_STRING_FILE;
`from_files()` fills the variable from it. A secret never lives in the repository.

Auth is on where its secret is set. The stack refuses to listen beyond loopback without both, so a
server that others can reach is never open (`check`).
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import MutableMapping, Mapping
from pathlib import Path

MLFLOW_USER, MLFLOW_PASSWORD, PREFECT_AUTH = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"
DEFAULT_USER = "admin"
MIN_PASSWORD = 12  # MLflow's basic-auth app refuses shorter passwords


class AuthError(ValueError):
    """A credential is missing, unreadable or malformed; the message names the variable to set."""


def from_files(env: MutableMapping[str, str] = os.environ) -> None:
    """Set each secret that is unset from the file its ``*_FILE`` variable names, and the MLflow user
    when only its password is given (MLflow's client sends neither without the other)."""
    for key in (MLFLOW_PASSWORD, PREFECT_AUTH):
        path = env.get(f"{key}_FILE")
        if path and not env.get(key):
            try:
                env[key] = Path(path).read_text().strip()
            except OSError as e:
                raise AuthError(f"{key}_FILE={path} cannot be read ({e.strerror}); point it at the file "
                                f"holding the secret, or set {key} itself") from None
    env.update(client_env(env))


def mlflow_on(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get(MLFLOW_PASSWORD))


def prefect_on(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get(PREFECT_AUTH))


def client_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a child process needs besides ``env``: the MLflow user, when only the password was given."""
    return {MLFLOW_USER: DEFAULT_USER} if mlflow_on(env) and not env.get(MLFLOW_USER) else {}


def basic_auth(credentials: str) -> dict[str, str]:
    """The HTTP basic Authorization header for "user:password"."""
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def prefect_headers(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The Authorization header Prefect's server asks for, as its own client sends it; none when auth is off."""
    return basic_auth(env[PREFECT_AUTH]) if prefect_on(env) else {}


def check(binds: Mapping[str, str], env: Mapping[str, str] = os.environ) -> None:
    """Refuse malformed secrets, and any server (name -> address it listens on) reachable beyond loopback
    while auth is off."""
    if mlflow_on(env) and len(env[MLFLOW_PASSWORD]) < MIN_PASSWORD:
        raise AuthError(f"{MLFLOW_PASSWORD} must be at least {MIN_PASSWORD} characters (MLflow's rule)")
    if prefect_on(env) and ":" not in env[PREFECT_AUTH]:
        raise AuthError(f'{PREFECT_AUTH} must be "user:password", as the Prefect UI and clients send it')
    exposed = [f"{name} on {host}" for name, host in binds.items() if not is_loopback(host)]
    if exposed and not (mlflow_on(env) and prefect_on(env)):
        raise AuthError(f"{', '.join(exposed)} would be reachable from other hosts with no authentication: set "
                        f"{MLFLOW_PASSWORD} (and {MLFLOW_USER}, default {DEFAULT_USER}) and {PREFECT_AUTH}, or "
                        f"their *_FILE variants; or listen on 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
