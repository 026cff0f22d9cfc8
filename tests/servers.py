"""Real servers on 127.0.0.1 for integration tests: an MLflow tracking server, a Prefect server, moto's S3.

    from servers import start_mlflow, start_moto_s3, start_prefect
    mlflow_server = start_mlflow(tmp_path)   # SQLite + artifacts under tmp_path, settings of mlflow/server.env
    try:
        MlflowClient(tracking_uri=mlflow_server.url) ...
    finally:
        mlflow_server.stop()

    start_prefect(tmp_path / "prefect")      # SQLite under that folder; .url is the API URL (.../api)

Each server runs in its own process group, so stop() also ends the children it spawns (MLflow runs
uvicorn in a child process). On Linux a server also gets SIGTERM when the thread that started it dies,
so a killed test run leaves no server behind; start servers from the main thread (fixtures do).
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SERVER_ENV = PROJECT_ROOT / "mlflow" / "server.env"
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process group, wait, then SIGKILL it. Safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(5)
        # The leader may exit before its children; make sure none of them outlive the test.
        _signal_group(self.process, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_settings() -> dict[str, str]:
    """The KEY=VALUE settings of mlflow/server.env."""
    lines = SERVER_ENV.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def start_mlflow(root: Path, port: int | None = None, env: dict | None = None, timeout: float = 90) -> Server:
    """An MLflow server like mlflow/up's, with its stores in `root`; `env` overrides any setting.

    Calling it again with the same root reuses the database and the webhook encryption key, so state
    (webhooks included) survives a restart as with mlflow/up.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "webhook-encryption.key"
    if not key_file.exists():
        key_file.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode())  # a Fernet key
    # The file's settings win over the caller's environment so tests see a known server.
    settings = {
        **os.environ,
        **server_settings(),
        "MLFLOW_PORT": str(port or free_port()),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"),
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key_file.read_text().strip(),
        # Loopback only, as the stack's own server: webhooks may go to the receiver on 127.0.0.1.
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        **(env or {}),
    }
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--host", settings["MLFLOW_HOST"], "--port", settings["MLFLOW_PORT"],
            "--workers", settings["MLFLOW_WORKERS"],
            "--backend-store-uri", settings["MLFLOW_BACKEND_STORE_URI"],
            "--serve-artifacts", "--artifacts-destination", settings["MLFLOW_ARTIFACTS_DESTINATION"]]
    url = f"http://{settings['MLFLOW_HOST']}:{settings['MLFLOW_PORT']}"
    return _launch(cmd, url, "/health", root / "mlflow.log", settings, cwd=root, timeout=timeout)


def start_prefect(root: Path, port: int | None = None, env: dict | None = None, timeout: float = 90) -> Server:
    """A Prefect server with its home and SQLite database in `root`; `server.url` is its API URL
    (http://127.0.0.1:PORT/api, what PREFECT_API_URL takes). `env` overrides any setting."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    # PREFECT_API_URL is a client setting; the server is its own API.
    settings = {
        **{key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"},
        "PREFECT_HOME": str(root),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        # Events reach the database (and /events/filter) within half a second instead of five.
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
        **(env or {}),
    }
    prefect_bin = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect_bin)] if prefect_bin.exists() else [sys.executable, "-m", "prefect"]
    cmd += ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/api"
    return _launch(cmd, url, "/health", root / "prefect.log", settings, cwd=root, timeout=timeout)


def prefect_api(api_url: str, path: str, body: dict | None = None):
    """The JSON answer of a Prefect API call: POST `body` when given, else GET."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{api_url}{path}", data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def deploy(api_url: str, home: Path, *names: str, project: Path = PROJECT_ROOT, pool_type: str = "process") -> None:
    """Deploy prefect.yaml's deployments (all of them, or those named) to the server at `api_url`, as
    `make up` does: create the work pool they use (of ``pool_type``), then `prefect deploy` from the
    project root."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # prefect.yaml's build steps run `python -m transpeft.params`: this virtualenv's python.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    prefect_bin = Path(sys.executable).with_name("prefect")
    prefect = [str(prefect_bin)] if prefect_bin.exists() else [sys.executable, "-m", "prefect"]
    pool = yaml.safe_load((project / "prefect.yaml").read_text())["definitions"]["work_pool"]["name"]
    # The pool through the API (a `prefect work-pool create` process costs seconds), with the default
    # job template the server holds for its type, as that command gives it.
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate

    workers = prefect_api(api_url, "/collections/views/aggregate-worker-metadata")
    template = next(w["default_base_job_configuration"] for collection in workers.values()
                    for w in collection.values() if w["type"] == pool_type)
    with SyncPrefectClient(api_url) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type, base_job_template=template),
                                overwrite=True)
    selection = [arg for name in names for arg in ("--name", name)] or ["--all"]
    cmd = ["--no-prompt", "deploy", *selection]
    done = subprocess.run(prefect + cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(cmd)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")


def start_moto_s3(port: int | None = None, log_dir: Path | None = None, timeout: float = 30) -> Server:
    """moto's S3 server on 127.0.0.1; point boto3 at `server.url` with any credentials."""
    port = port or free_port()
    log = Path(log_dir or os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log"
    moto_bin = Path(sys.executable).with_name("moto_server")
    cmd = [str(moto_bin)] if moto_bin.exists() else [sys.executable, "-m", "moto.server"]
    cmd += ["-H", "127.0.0.1", "-p", str(port)]
    return _launch(cmd, f"http://127.0.0.1:{port}", "/", log, dict(os.environ), cwd=log.parent, timeout=timeout)


def _launch(cmd: list[str], url: str, probe: str, log: Path, env: dict, cwd: Path, timeout: float) -> Server:
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)
    server = Server(url=url, process=process, log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"{cmd[0]} exited with {process.returncode} during start:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + probe, timeout=2):
                return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise TimeoutError(f"{url}{probe} did not answer within {timeout:.0f}s:\n{_tail(log)}")


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel for SIGTERM when our parent dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session made the pid the group id
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(condition, timeout: float = 30, step: float = 0.2):
    """The first truthy value of condition(), or its last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(step)
    return condition()


def stored_events(api_url: str, **filter_) -> list[dict]:
    """Events the Prefect server has persisted, e.g. stored_events(url, id={"id": [event_id]})."""
    return prefect_api(api_url, "/events/filter", {"filter": filter_, "limit": 50})["events"]
