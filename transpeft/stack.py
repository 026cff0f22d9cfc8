"""The local stack in one command: Prefect server, MLflow server, webhook receiver, Prefect worker.

    transpeft stack up       # start what is not running, deploy prefect.yaml, say where to look
    transpeft stack status   # one line per component
    transpeft stack down     # worker, webhook receiver, Prefect server, then MLflow

Run from the project root (the directory holding prefect.yaml) or below it. Everything binds to
127.0.0.1 and keeps its state under the project, so a restart finds it again:
    .prefect/        Prefect's home and SQLite database (deployments, flow runs, work pool), server.pid
    mlflow/store/    MLflow's SQLite database, artifacts, mlflow.pid and log (MLFLOW_STORE_DIR moves it)
    .stack/          the other pid files, logs/<component>.log, webhook.secret (TRANSPEFT_STACK_DIR moves it)
Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000), TRANSPEFT_WEBHOOK_PORT (5055).

Locked doors (transpeft/auth.py): with MLFLOW_TRACKING_PASSWORD set, MLflow runs its basic-auth app
with that admin; with PREFECT_API_AUTH_STRING set, the Prefect server asks for it. Listening beyond
loopback (TRANSPEFT_BIND_HOST, MLFLOW_HOST: a container) is refused without both. MLflow may send
webhooks to private addresses only while it listens on loopback, where the receiver is.

This is the one supervisor of the stack's processes: mlflow/up and mlflow/down call start_mlflow and
stop through `python -m transpeft.stack up|down PROJECT`. Prefect is imported inside the functions
that ask the server through its client, never when the module loads.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from . import auth
from .health import health_problem

HOST = "127.0.0.1"
WORK_POOL = "transpeft-local"
WORKER_NAME = "transpeft-local-worker"
WEBHOOK_NAME = "transpeft-base-registered"
WEBHOOK_EVENTS = ["model_version.created"]
AUTOMATIONS = "flows/automations.yaml"
HEARTBEAT_S = 30  # a flow run's heartbeat period; Prefect allows 30 s at the least
# What each process's command line contains; a pid file whose process does not match is stale (pid reuse).
MARKERS = {"prefect-server": "server", "mlflow": "mlflow", "webhook-receiver": "webhook_receiver",
           "worker": "worker", "postgres": "postgres", "s3": "moto", "dask-scheduler": "dask scheduler",
           "dask-worker-1": "dask worker", "dask-worker-2": "dask worker"}
PORT_VARIABLES = {"prefect-server": "PREFECT_PORT", "mlflow": "MLFLOW_PORT",
                  "webhook-receiver": "TRANSPEFT_WEBHOOK_PORT", "postgres": "TRANSPEFT_POSTGRES_PORT",
                  "s3": "TRANSPEFT_S3_PORT", "dask-scheduler": "TRANSPEFT_DASK_PORT"}
LOCAL = ("prefect-server", "mlflow", "webhook-receiver", "worker")
# At scale (`up --scale`): PostgreSQL under both servers, an S3-compatible server for the artifacts
# and DVC, and a Dask cluster of its own processes for the per-adapter fan-out.
SCALE = ("postgres", "s3", "dask-scheduler", "dask-worker-1", "dask-worker-2")
DASK_WORKERS = ("dask-worker-1", "dask-worker-2")
BUCKET = "transpeft"
DATABASES = ("mlflow", "mlflow_auth", "prefect")  # on the at-scale stack's PostgreSQL
# The S3-compatible server on loopback (moto) takes any credentials; these name the stack's.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "transpeft", "AWS_SECRET_ACCESS_KEY": "transpeft-local",
                  "AWS_DEFAULT_REGION": "us-east-1"}
# Workers before the server they poll (a worker whose server is gone retries for a long time), then
# the servers, the stores they write to last.
STOP_ORDER = ("worker", "webhook-receiver", *DASK_WORKERS, "dask-scheduler", "prefect-server", "mlflow", "s3",
              "postgres")


class StackError(Exception):
    """A component could not be started or stopped; the message names it, its log and what to do."""


@dataclass(frozen=True)
class Stack:
    project: Path  # holds prefect.yaml
    state: Path  # pid files, logs, the webhook secret
    prefect_home: Path
    mlflow_store: Path
    prefect_port: int
    mlflow_port: int
    webhook_port: int
    bin: Path  # the virtualenv's bin: prefect, mlflow, python
    bind: str = HOST  # where the Prefect server listens; clients always use HOST. A container sets 0.0.0.0
    scale: bool = False  # the at-scale configuration (SCALE)
    postgres_port: int = 5432
    s3_port: int = 9000
    dask_port: int = 8786
    postgres_dir: Path | None = None  # PostgreSQL's data directory (default: state/postgres)

    @classmethod
    def find(cls, start: str | Path | None = None) -> Stack:
        """The stack of the project holding prefect.yaml at `start` (default: cwd) or above it."""
        env = os.environ
        here = Path(start or Path.cwd()).resolve()
        project = next((d for d in (here, *here.parents) if (d / "prefect.yaml").is_file()), None)
        if project is None:
            raise StackError(f"no prefect.yaml in {here} or above it: run this from the project root "
                             "(or pass --project DIR)")
        state = Path(env.get("TRANSPEFT_STACK_DIR") or project / ".stack").resolve()
        store = Path(env.get("MLFLOW_STORE_DIR") or project / "mlflow" / "store").resolve()
        return cls(project=project, state=state, prefect_home=project / ".prefect", mlflow_store=store,
                   prefect_port=_port(env, "PREFECT_PORT", 4200), mlflow_port=_port(env, "MLFLOW_PORT", 5000),
                   webhook_port=_port(env, "TRANSPEFT_WEBHOOK_PORT", 5055), bin=Path(sys.executable).parent,
                   bind=env.get("TRANSPEFT_BIND_HOST") or HOST, scale=env.get("TRANSPEFT_SCALE", "") == "1",
                   postgres_port=_port(env, "TRANSPEFT_POSTGRES_PORT", 5432), s3_port=_port(env, "TRANSPEFT_S3_PORT", 9000),
                   dask_port=_port(env, "TRANSPEFT_DASK_PORT", 8786),
                   postgres_dir=Path(env.get("TRANSPEFT_POSTGRES_DIR") or state / "postgres").resolve())

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return self.prefect_url + "/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def webhook_url(self) -> str:
        return f"http://{HOST}:{self.webhook_port}/"

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def dask_address(self) -> str:
        return f"tcp://{HOST}:{self.dask_port}"

    def database(self, name: str, driver: str) -> str:
        """The SQLAlchemy URL of database ``name`` on the stack's PostgreSQL (loopback, trust auth)."""
        return f"postgresql+{driver}://transpeft@{HOST}:{self.postgres_port}/{name}"

    @property
    def components(self) -> tuple[str, ...]:
        return (*SCALE, *LOCAL) if self.scale else LOCAL

    def where(self, name: str) -> str:
        return {"prefect-server": self.prefect_url, "mlflow": self.mlflow_url, "webhook-receiver": self.webhook_url,
                "worker": f"pool {WORK_POOL}", "postgres": f"postgresql://{HOST}:{self.postgres_port}",
                "s3": f"{self.s3_url} (bucket {BUCKET})", "dask-scheduler": self.dask_address,
                "dask-worker-1": self.dask_address, "dask-worker-2": self.dask_address}[name]

    def port(self, name: str) -> int | None:
        return {"prefect-server": self.prefect_port, "mlflow": self.mlflow_port, "webhook-receiver": self.webhook_port,
                "postgres": self.postgres_port, "s3": self.s3_port, "dask-scheduler": self.dask_port}.get(name)

    def pid_file(self, name: str) -> Path:
        # The server's is Prefect's own, so `prefect server stop` and `start --background` know about it.
        return {"prefect-server": self.prefect_home / "server.pid",
                "mlflow": self.mlflow_store / "mlflow.pid"}.get(name, self.state / f"{name}.pid")

    def log_file(self, name: str) -> Path:
        return self.mlflow_store / "mlflow.log" if name == "mlflow" else self.state / "logs" / f"{name}.log"

    def tool(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise StackError(f"{name} not found next to {sys.executable}; install the project (make install)")
        return str(path)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every child: the caller's, pointed at this stack's servers and state."""
        env = dict(os.environ)
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
                   PREFECT_HOME=str(self.prefect_home), PREFECT_API_URL=self.prefect_api_url,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_TRACKING_URI=self.mlflow_url)
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if self.scale:  # the flows fan out on the stack's Dask cluster (flows/__init__.py)
            env["TRANSPEFT_DASK_ADDRESS"] = self.dask_address
        env.update(auth.client_env(env), **extra)
        return env

    def deployments(self) -> dict[str, str]:
        """prefect.yaml's deployments: name -> entrypoint."""
        config = yaml.safe_load((self.project / "prefect.yaml").read_text()) or {}
        return {d["name"]: d.get("entrypoint", "") for d in config.get("deployments") or []}


def _port(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key) or str(default)
    if not value.isdigit():
        raise StackError(f"{key} must be a port number, got {value!r}")
    return int(value)


# -- up -----------------------------------------------------------------------------------------


def up(stack: Stack, say: Callable[[str], None] = print) -> None:
    """Start every component that is not running, deploy prefect.yaml; idempotent."""
    for needed in ("mlflow/server.env", "mlflow/webhook_receiver.py"):
        if not (stack.project / needed).exists():
            raise StackError(f"{stack.project / needed} is missing; is {stack.project} the transpeft project?")
    try:
        auth.check({"prefect-server": stack.bind, "mlflow": mlflow_settings(stack)["MLFLOW_HOST"]})
    except auth.AuthError as e:
        raise StackError(f"refused to start: {e}") from None
    (stack.state / "logs").mkdir(parents=True, exist_ok=True)
    stack.prefect_home.mkdir(parents=True, exist_ok=True)
    locks = [name for name, on in (("MLflow basic-auth", auth.mlflow_on()), ("Prefect auth string", auth.prefect_on()))
             if on]
    say(f"stack of {stack.project} (state in {stack.state}; auth: {', '.join(locks) or 'off, loopback only'}"
        f"{'; at scale' if stack.scale else ''})")
    if stack.scale:
        start_postgres(stack, say)
        start_s3(stack, say)
    # The Prefect server migrates its database while MLflow starts: start both at once.
    running = _running(stack, "prefect-server", say)
    server = running or start_prefect_server(stack, say)
    start_mlflow(stack, say)
    # Waited for even when it was running: another `up` may have just started it.
    _wait(stack, "prefect-server", server, 90)
    if not running:
        say(f"prefect-server: up at {stack.prefect_url} (pid {server.pid})")
    secret = webhook_secret(stack)
    start_webhook_receiver(stack, secret, say)
    try:
        action = register_webhook(stack.mlflow_url, stack.webhook_url, secret)
    except Exception as e:  # MlflowException, or the server's refusal as an HTTP error
        raise StackError(f"mlflow webhook: could not register {WEBHOOK_NAME} at {stack.mlflow_url}: {e}. The server "
                         f"needs the webhook settings of mlflow/server.env; log {stack.log_file('mlflow')}") from e
    say(f"mlflow webhook {WEBHOOK_NAME}: {action} -> {stack.webhook_url}")
    if stack.scale:
        start_dask(stack, say)
    start_worker(stack, say)  # before the deploy: the worker creates the work pool the deployments name
    deploy(stack, say)
    say(f"automations: {', '.join(automate(stack.prefect_api_url, stack.project / AUTOMATIONS))} ({AUTOMATIONS})")
    say(f"""
Prefect UI  {stack.prefect_url}
MLflow UI   {stack.mlflow_url}
Logs        {stack.state / 'logs'}/ and {stack.log_file('mlflow')}
To run a deployment from a shell:
  export PREFECT_API_URL={stack.prefect_api_url} MLFLOW_TRACKING_URI={stack.mlflow_url}{
      ' (and the auth variables this stack was started with)' if locks else ''}
  {stack.bin / 'prefect'} deployment run 'transfer-on-base-update/all-adapters' -p family=demo -p version=v2
Stop it all with `make down` (transpeft stack down).""")


def start_prefect_server(stack: Stack, say) -> psutil.Process:
    """Spawn `prefect server start` (SQLite under .prefect/); does not wait for it.

    Not `--background`: its server writes its log to a pipe of the command that started it and is gone.
    """
    cmd = [stack.tool("prefect"), "server", "start", "--host", stack.bind, "--port", str(stack.prefect_port),
           "--analytics-off"]
    # The server asks for the string its clients send (PREFECT_API_AUTH_STRING, which the children inherit).
    settings = {"PREFECT_SERVER_API_AUTH_STRING": os.environ[auth.PREFECT_AUTH]} if auth.prefect_on() else {}
    if stack.scale:
        settings["PREFECT_API_DATABASE_CONNECTION_URL"] = stack.database("prefect", "asyncpg")
    process = _spawn(stack, "prefect-server", cmd, stack.env(**settings))
    say(f"prefect-server: starting at {stack.prefect_url} (log {stack.log_file('prefect-server')})")
    return process


def local_webhooks(mlflow_host: str, env: dict) -> bool:
    """Whether MLflow may send webhooks to private addresses, as it must to reach the receiver on loopback:
    only while nobody else can reach MLflow, or where the deployment says so (TRANSPEFT_LOCAL_WEBHOOKS=1:
    the image, whose MLflow listens beyond loopback behind its password)."""
    return auth.is_loopback(mlflow_host) or env.get("TRANSPEFT_LOCAL_WEBHOOKS") == "1"


def start_mlflow(stack: Stack, say) -> None:
    """MLflow's tracking server with the settings of mlflow/server.env, which the environment overrides."""
    if _running(stack, "mlflow", say):
        return
    store = stack.mlflow_store
    store.mkdir(parents=True, exist_ok=True)
    settings = mlflow_settings(stack)
    # Webhook secrets are stored encrypted with this key; a random key per start would make every
    # stored webhook undecryptable after a restart, and they would then fail silently.
    if not settings.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"):  # a Fernet key: 32 random bytes, url-safe base64
        settings["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = _kept_secret(
            store / "webhook-encryption.key", lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    settings["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] = str(local_webhooks(settings["MLFLOW_HOST"], stack.env())).lower()
    backend = settings.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{store / 'mlflow.db'}"
    artifacts = settings.get("MLFLOW_ARTIFACTS_DESTINATION") or str(store / "artifacts")
    cmd = [stack.tool("mlflow"), "server", "--host", settings["MLFLOW_HOST"], "--port", str(stack.mlflow_port),
           "--workers", settings["MLFLOW_WORKERS"], "--backend-store-uri", backend,
           "--serve-artifacts", "--artifacts-destination", artifacts]
    if auth.mlflow_on(settings):
        cmd += ["--app-name", "basic-auth"]
        settings.update(_basic_auth(stack, settings))
    # Run from the store so nothing MLflow writes to its working directory lands in the repo.
    process = _spawn(stack, "mlflow", cmd, settings, cwd=store)
    _wait(stack, "mlflow", process, float(settings.get("MLFLOW_START_TIMEOUT", 90)))
    if auth.mlflow_on(settings) and not _signs_in(stack, settings):
        raise StackError(f"mlflow: refuses {auth.MLFLOW_USER}={settings[auth.MLFLOW_USER]} with this "
                         f"{auth.MLFLOW_PASSWORD}: its admin was created with another password on first start "
                         f"(the user store is {settings['MLFLOW_AUTH_CONFIG_PATH']}'s database_uri); set the "
                         "password it was created with, or change it through MLflow's update-password API")
    say(f"mlflow: MLflow up at {stack.mlflow_url} (pid {process.pid}, backend {backend}, artifacts {artifacts}, "
        f"log {stack.log_file('mlflow')})")


def mlflow_settings(stack: Stack) -> dict[str, str]:
    """mlflow/server.env's settings, overridden by the environment; at scale, on the stack's PostgreSQL
    and S3 server."""
    scale = {}
    if stack.scale:
        scale = {"MLFLOW_BACKEND_STORE_URI": stack.database("mlflow", "psycopg2"),
                 "MLFLOW_AUTH_DATABASE_URI": stack.database("mlflow_auth", "psycopg2"),
                 "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow", "MLFLOW_S3_ENDPOINT_URL": stack.s3_url,
                 **S3_CREDENTIALS}
    return {**_settings(stack.project / "mlflow" / "server.env"), **stack.env(), **scale}


def _basic_auth(stack: Stack, settings: Mapping[str, str]) -> dict[str, str]:
    """The settings of MLflow's basic-auth app: its config file (users in the store, or
    MLFLOW_AUTH_DATABASE_URI), the admin's password from the environment, a kept CSRF key."""
    config = stack.mlflow_store / "basic-auth.ini"
    users = settings.get("MLFLOW_AUTH_DATABASE_URI") or f"sqlite:///{stack.mlflow_store / 'basic-auth.db'}"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {users}\n"
                      f"admin_username = {settings[auth.MLFLOW_USER]}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      # A password check (PBKDF2) costs ~0.1 s; cached for a minute, as MLflow offers. One
                      # worker, so a password change through the API takes effect at once.
                      "auth_cache_ttl_seconds = 60\n")
    key = settings.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or _kept_secret(stack.mlflow_store / "flask-secret.key",
                                                                         lambda: secrets.token_urlsafe(32))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": settings[auth.MLFLOW_PASSWORD],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key}


def _signs_in(stack: Stack, settings: Mapping[str, str]) -> bool:
    """Whether MLflow takes the admin's credentials (an authenticated read of one experiment)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers=auth.basic_auth(f"{settings[auth.MLFLOW_USER]}:{settings[auth.MLFLOW_PASSWORD]}"))
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return False
        raise StackError(f"mlflow: answered {e.code} to an authenticated read; log {stack.log_file('mlflow')}") from None


def webhook_secret(stack: Stack) -> str:
    """$TRANSPEFT_WEBHOOK_SECRET, else the one made on the first `up` in .stack/webhook.secret (0600)."""
    return os.environ.get("TRANSPEFT_WEBHOOK_SECRET") or _kept_secret(stack.state / "webhook.secret",
                                                                      lambda: secrets.token_urlsafe(32))


def start_webhook_receiver(stack: Stack, secret: str, say) -> None:
    name = "webhook-receiver"
    if _running(stack, name, say):
        return
    cmd = [sys.executable, str(stack.project / "mlflow" / "webhook_receiver.py"), "--host", HOST,
           "--port", str(stack.webhook_port), "--prefect-api-url", stack.prefect_api_url]
    process = _spawn(stack, name, cmd, stack.env(TRANSPEFT_WEBHOOK_SECRET=secret))
    _wait(stack, name, process, 30)
    say(f"{name}: up at {stack.webhook_url} (pid {process.pid}), emitting events to {stack.prefect_api_url}")


def register_webhook(tracking_uri: str, url: str, secret: str) -> str:
    """Point MLflow's `model_version.created` webhook at the receiver: 'created' or 'updated', never a duplicate."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from .tracking import every_page

    client = MlflowClient(tracking_uri=tracking_uri)
    hooks = [h for h in every_page(client.list_webhooks) if h.name == WEBHOOK_NAME]
    if not hooks:
        client.create_webhook(name=WEBHOOK_NAME, url=url, events=WEBHOOK_EVENTS, secret=secret, status="ACTIVE")
        return "created"
    # The stored secret cannot be read back to compare, so it is always rewritten.
    client.update_webhook(hooks[0].webhook_id, url=url, events=WEBHOOK_EVENTS, secret=secret, status="ACTIVE")
    for extra in hooks[1:]:
        client.delete_webhook(extra.webhook_id)
    return "updated"


def start_worker(stack: Stack, say) -> None:
    """`prefect worker start`, which creates the process work pool when it is missing."""
    name = "worker"
    if _running(stack, name, say):
        return
    cmd = [stack.tool("prefect"), "worker", "start", "--pool", WORK_POOL, "--name", WORKER_NAME,
           "--type", "process", "--install-policy", "never"]
    started = time.time() - 1
    # Poll every 2 s (Prefect's default is 10): a registered base's revalidation starts within seconds.
    # Heartbeats every 30 s (Prefect's default is 180): flows/automations.yaml marks a run Crashed after
    # 60 s without one, so a killed run frees its slot and is run again within about a minute and a half.
    process = _spawn(stack, name, cmd, stack.env(PREFECT_WORKER_QUERY_SECONDS="2",
                                                 PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S)))
    _wait(stack, name, process, 60, ready=lambda: worker_online(stack, since=started),
          hint=f"check that the Prefect server answers at {stack.prefect_api_url}/health")
    say(f"{name}: up (pid {process.pid}), polling work pool {WORK_POOL}")


# -- at scale -----------------------------------------------------------------------------------


def start_postgres(stack: Stack, say) -> None:
    """PostgreSQL from the system's packages on 127.0.0.1, its data in ``stack.postgres_dir`` (made with
    initdb on first start), with the databases the servers use. It refuses to run as root, so as root
    it runs as the ``postgres`` user, who must be able to reach that directory."""
    name = "postgres"
    if _running(stack, name, say):
        return
    data, user = stack.postgres_dir, _postgres_user()
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(data, user, user)
        _run_logged(stack, name, [_postgres_tool("initdb"), "-D", str(data), "-U", "transpeft", "--auth", "trust",
                                  "-E", "UTF8"], f"postgres: initdb of {data} failed"
                    + (f" (it runs as {user}: can that user reach {data}? set TRANSPEFT_POSTGRES_DIR)" if user else ""),
                    user=user)
    cmd = [_postgres_tool("postgres"), "-D", str(data), "-p", str(stack.postgres_port), "-k", str(data),
           "-c", f"listen_addresses={HOST}"]
    process = _spawn(stack, name, cmd, stack.env(), cwd=data, user=user)
    _wait(stack, name, process, 60, ready=lambda: _databases(stack))
    say(f"{name}: up at {stack.where(name)} (pid {process.pid}, data {data}), databases {', '.join(DATABASES)}")


def _databases(stack: Stack) -> bool:
    """Create the servers' databases (DATABASES) where missing; False while PostgreSQL does not answer."""
    import psycopg2

    try:
        connection = psycopg2.connect(host=HOST, port=stack.postgres_port, user="transpeft", dbname="postgres",
                                      connect_timeout=2)
    except psycopg2.OperationalError:
        return False
    connection.autocommit = True  # CREATE DATABASE runs outside a transaction (so no `with connection`)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            present = {row[0] for row in cursor.fetchall()}
            for database in DATABASES:
                if database not in present:
                    cursor.execute(f"CREATE DATABASE {database}")
    finally:
        connection.close()
    return True


def _run_as(user: str | None) -> dict:
    """subprocess's arguments that run a child as ``user`` (and its group alone); none for ourselves."""
    return {"user": user, "group": user, "extra_groups": []} if user else {}


def _postgres_user() -> str | None:
    return "postgres" if os.geteuid() == 0 else None


def _postgres_tool(name: str) -> str:
    """A PostgreSQL program: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin, newest first."""
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                                                   key=lambda p: int(p.parts[-3]), reverse=True)), None)
    if found is None:
        raise StackError(f"postgres: {name} not found; install PostgreSQL (Debian: apt-get install postgresql)")
    return str(found)


def start_s3(stack: Stack, say) -> None:
    """The S3-compatible server (moto) on 127.0.0.1 with the stack's bucket. It keeps objects in memory:
    the at-scale stack on one machine tries the configuration; real artifacts go to S3 or MinIO."""
    name = "s3"
    if not _running(stack, name, say):
        cmd = [stack.tool("moto_server"), "-H", HOST, "-p", str(stack.s3_port)]
        process = _spawn(stack, name, cmd, stack.env())
        _wait(stack, name, process, 30, ready=lambda: health_problem(stack.s3_url + "/", timeout=2) is None)
        say(f"{name}: up at {stack.s3_url} (pid {process.pid}; objects in memory)")
    client = s3_client(stack)
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
        say(f"{name}: bucket {BUCKET} created")


def s3_client(stack: Stack):
    """boto3's client for the stack's S3-compatible server."""
    import boto3

    return boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])


def start_dask(stack: Stack, say) -> None:
    """A Dask scheduler and two single-threaded worker processes; the flows fan their per-adapter tasks
    out there (TRANSPEFT_DASK_ADDRESS), each worker process keeping the base it loaded for the next task."""
    # The task graphs name tasks/ and flows/ of the project, as the worker's flow runs import them: the
    # scheduler unpickles them too. Torch's threads are shared between the worker processes.
    threads = str(max(1, (os.cpu_count() or 1) // len(DASK_WORKERS)))
    env = stack.env(PYTHONPATH=os.pathsep.join(filter(None, [str(stack.project), os.environ.get("PYTHONPATH")])),
                    OMP_NUM_THREADS=threads)
    name = "dask-scheduler"
    if not _running(stack, name, say):
        cmd = [stack.tool("dask"), "scheduler", "--host", HOST, "--port", str(stack.dask_port), "--no-dashboard"]
        process = _spawn(stack, name, cmd, env)
        _wait(stack, name, process, 60, ready=lambda: _listening(stack.dask_port))
        say(f"{name}: up at {stack.dask_address} (pid {process.pid})")
    for worker in DASK_WORKERS:
        if _running(stack, worker, say):
            continue
        cmd = [stack.tool("dask"), "worker", stack.dask_address, "--name", f"transpeft-{worker}", "--nworkers", "1",
               "--nthreads", "1", "--no-dashboard"]
        process = _spawn(stack, worker, cmd, env)
        _wait(stack, worker, process, 60, ready=lambda w=worker: f"transpeft-{w}" in _dask_workers(stack),
              hint=f"see the scheduler's log, {stack.log_file(name)}")
        say(f"{worker}: up (pid {process.pid}), serving {stack.dask_address}")


def _dask_workers(stack: Stack) -> set[str]:
    """The names of the workers the stack's Dask scheduler knows."""
    from distributed import Client

    try:
        with Client(stack.dask_address, timeout=5) as client:
            return {w["name"] for w in client.scheduler_info()["workers"].values()}
    except OSError:
        return set()


def deploy(stack: Stack, say) -> None:
    """Import the flows, then `prefect deploy --all`; skipped when prefect.yaml, params.yaml and the
    flows are unchanged since the last deploy and the server still holds every deployment."""
    names = stack.deployments()
    fingerprint = _deploy_fingerprint(stack)
    stamp = stack.state / "deployed.sha256"
    if stamp.exists() and stamp.read_text().strip() == fingerprint and set(names) <= set(deployed(stack)):
        say(f"deployments: unchanged since the last deploy ({', '.join(names)})")
        return
    say(f"deployments: prefect deploy --all (log {stack.log_file('deploy')}) ...")
    started = time.monotonic()
    # prefect deploy registers a flow whose file fails to import (it falls back to reading the source),
    # and every run of it then fails on the worker: import them first, as the worker will.
    load = ("import sys\nfrom prefect.flows import load_flow_from_entrypoint as load\n"
            "for entrypoint in sys.argv[1:]:\n    print('imported', load(entrypoint, use_placeholder_flow=False))")
    _run_logged(stack, "deploy", [sys.executable, "-c", load, *names.values()],
                "deployments: a flow file of prefect.yaml does not import")
    _run_logged(stack, "deploy", [stack.tool("prefect"), "--no-prompt", "deploy", "--all"],
                "deployments: `prefect deploy --all` failed")
    missing = sorted(set(names) - set(deployed(stack)))
    if missing:
        raise StackError(f"deployments: {', '.join(missing)} not on the server after prefect deploy; "
                         f"see {stack.log_file('deploy')}")
    stamp.write_text(fingerprint + "\n")
    say(f"deployments: {', '.join(names)} deployed in {time.monotonic() - started:.0f} s")


def automate(api_url: str, declared: Path) -> list[str]:
    """Create the automations declared in ``declared`` (flows/automations.yaml) on the Prefect server at
    ``api_url``, or update them in place by name; their names."""
    from prefect.events.schemas.automations import AutomationCore

    automations = [AutomationCore.model_validate(raw) for raw in yaml.safe_load(declared.read_text())["automations"]]
    with prefect_client(api_url) as client:
        for automation in automations:
            existing = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
            else:
                client.create_automation(automation)
    return [a.name for a in automations]


def prefect_client(api_url: str):
    """Prefect's client for the server at ``api_url``, sending the auth string when there is one."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url, auth_string=os.environ.get(auth.PREFECT_AUTH))


def deployed(stack: Stack) -> list[str]:
    """Names of the deployments the Prefect server holds."""
    with prefect_client(stack.prefect_api_url) as client:
        return [deployment.name for deployment in client.read_deployments(limit=200)]


def worker_online(stack: Stack, since: float = 0) -> bool:
    """Whether our worker is ONLINE on the server, with a heartbeat at or after `since` (unix seconds).

    The server keeps a stopped worker ONLINE until its heartbeat times out, so a restart waits for a
    heartbeat of the new process.
    """
    import httpx
    from prefect.exceptions import ObjectNotFound

    try:
        with prefect_client(stack.prefect_api_url) as client:
            workers = client.read_workers_for_work_pool(WORK_POOL)
    except (ObjectNotFound, httpx.HTTPError):  # no pool yet (the worker creates it), or no server
        return False
    return any(w.name == WORKER_NAME and w.status == "ONLINE" and w.last_heartbeat_time
               and w.last_heartbeat_time.timestamp() >= since for w in workers)


# -- down and status ----------------------------------------------------------------------------


def down(stack: Stack, say: Callable[[str], None] = print, timeout: float = 20) -> None:
    """Stop every component, the worker first and MLflow last; idempotent."""
    for name in STOP_ORDER:
        stop(stack, name, say, timeout)


def stop(stack: Stack, name: str, say, timeout: float = 20) -> None:
    """SIGTERM the component and its children, wait, then SIGKILL what is left; a stale pid file is removed."""
    process = _process(stack, name)
    if process is None:
        say(f"{name}: not running")
        return
    family = [process, *process.children(recursive=True)]  # MLflow's uvicorn, the worker's flow runs
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, left = psutil.wait_procs(family, timeout)
    for member in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    stack.pid_file(name).unlink(missing_ok=True)
    say(f"{name}: {f'killed after {timeout:.0f} s' if left else 'stopped'} (pid {process.pid})")


def answers(stack: Stack, name: str) -> bool:
    """Whether the component answers: its /health, or for the worker, ONLINE on the server."""
    if name == "worker":
        return worker_online(stack)
    if name == "postgres":
        return _databases(stack)
    if name.startswith("dask-"):
        return _listening(stack.dask_port) and (name == "dask-scheduler" or f"transpeft-{name}" in _dask_workers(stack))
    if name == "s3":
        return health_problem(stack.s3_url + "/", timeout=2) is None
    health = {"prefect-server": stack.prefect_api_url + "/health", "mlflow": stack.mlflow_url + "/health",
              "webhook-receiver": stack.webhook_url + "health"}[name]
    return health_problem(health, timeout=2) is None


def status(stack: Stack) -> dict[str, dict]:
    """Each component: running (pid, where it answers) or stopped."""
    report = {}
    for name in stack.components:
        process = _process(stack, name)
        row = {"running": process is not None, "pid": process.pid if process else None,
               "url": stack.where(name), "log": str(stack.log_file(name))}
        if process is not None:
            row["answers"] = answers(stack, name)
        report[name] = row
    return report


def format_status(report: dict[str, dict]) -> str:
    lines = []
    for name, row in report.items():
        if not row["running"]:
            lines.append(f"{name:<17}stopped")
            continue
        note = "" if row.get("answers", True) else f"  (not answering; see {row['log']})"
        lines.append(f"{name:<17}running  pid {row['pid']:<8} {row['url']}{note}")
    return "\n".join(lines)


# -- processes ----------------------------------------------------------------------------------


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict, cwd: Path | None = None,
           user: str | None = None) -> psutil.Process:
    """Start `cmd` in its own session (it outlives this command and a Ctrl-C), logging to its log file."""
    port = stack.port(name)
    if port and _listening(port):
        raise StackError(f"{name}: port {port} on {HOST} is in use by a process this stack did not start (no "
                         f"live pid in {stack.pid_file(name)}); stop it or set {PORT_VARIABLES[name]} to a free port")
    log = stack.log_file(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=cwd or stack.project, start_new_session=True, **_run_as(user))
    stack.pid_file(name).write_text(f"{process.pid}\n")
    return psutil.Process(process.pid)


def _run_logged(stack: Stack, log_name: str, cmd: list[str], failure: str, user: str | None = None) -> None:
    """Run a short command to completion, its output appended to .stack/logs/<log_name>.log."""
    log = stack.log_file(log_name)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        # COLUMNS: rich wraps Prefect's tables at 80 columns in a file otherwise.
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=stack.env(COLUMNS="160"), cwd="/" if user else stack.project, **_run_as(user))
    if result.returncode != 0:
        raise StackError(f"{failure} (exit {result.returncode}); fix it and run `transpeft stack up` again "
                         f"(what runs is left running). Last lines of {log}:\n{_tail(log)}")


def _wait(stack: Stack, name: str, process: psutil.Process, timeout: float,
          ready: Callable[[], bool] | None = None, hint: str = "") -> None:
    ready = ready or (lambda: answers(stack, name))
    hint = hint or f"if port {stack.port(name)} is taken, set {PORT_VARIABLES[name]} to a free one"
    deadline = time.monotonic() + timeout
    log = stack.log_file(name)
    while not ready():
        if not _live(process):
            stack.pid_file(name).unlink(missing_ok=True)
            raise StackError(f"{name}: exited during start; {hint}. Last lines of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{name}: not ready after {timeout:.0f} s (pid {process.pid}, left running; "
                             f"`transpeft stack down` stops it); {hint}. Last lines of {log}:\n{_tail(log)}")
        time.sleep(0.3)


def _running(stack: Stack, name: str, say) -> psutil.Process | None:
    """The component's process, said to be running, when it runs."""
    process = _process(stack, name)
    if process is not None:
        say(f"{name}: already running (pid {process.pid}), {stack.where(name)}")
    return process


def _process(stack: Stack, name: str) -> psutil.Process | None:
    """The live process of the component's pid file, else None (and a stale pid file removed)."""
    path = stack.pid_file(name)
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        process = psutil.Process(int(path.read_text()))
        if _live(process) and MARKERS[name] in " ".join(process.cmdline()):
            return process
    path.unlink(missing_ok=True)
    return None


def _live(process: psutil.Process) -> bool:
    """Running, and no zombie (a child of this process that exited, or an orphan PID 1 does not reap)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


# -- helpers ------------------------------------------------------------------------------------


def _settings(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of an env file such as mlflow/server.env."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _kept_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path`, written there (mode 0600) by `make` on first use."""
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(make())
    return path.read_text().strip()


def _deploy_fingerprint(stack: Stack) -> str:
    """Hash of what `prefect deploy` reads: prefect.yaml, params.yaml (the schedule), flows/ and tasks/."""
    digest = hashlib.sha256()
    files = [stack.project / "prefect.yaml", stack.project / "params.yaml"]
    for folder in ("flows", "tasks"):
        files += sorted((stack.project / folder).rglob("*.py"))
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(stack.project)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


if __name__ == "__main__":  # mlflow/up and mlflow/down: `python -m transpeft.stack up|down PROJECT`
    try:
        auth.from_files()
        local = Stack.find(sys.argv[2])
        if sys.argv[1] == "up":
            auth.check({"mlflow": mlflow_settings(local)["MLFLOW_HOST"]})
            start_mlflow(local, print)
        else:
            stop(local, "mlflow", print, float(os.environ.get("MLFLOW_STOP_TIMEOUT", 20)))
    except (StackError, auth.AuthError) as e:
        sys.exit(f"error: {e}")
