"""The local stack in one command: Prefect server, MLflow server, webhook receiver, Prefect worker.

    transpeft stack up       # start what is not running, deploy prefect.yaml, say where to look
    transpeft stack status   # one line per component
    transpeft stack down     # worker, webhook receiver, Prefect server, then MLflow

Run from the project root (the directory holding prefect.yaml) or below it. Everything binds to
127.0.0.1 and keeps its state under the project, so a restart finds it again:
    .prefect/        Prefect's home and SQLite database (deployments, flow runs, work pool)
    mlflow/store/    MLflow's SQLite database and artifacts (mlflow/up; MLFLOW_STORE_DIR moves it)
    .stack/          pid files, logs/<component>.log, webhook.secret (TRANSPEFT_STACK_DIR moves it)
Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000), TRANSPEFT_WEBHOOK_PORT (5055).

The core never imports Prefect: this module drives the `prefect` and `mlflow` command lines that sit
next to the running interpreter, and talks to the servers' REST APIs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from .health import health_problem

HOST = "127.0.0.1"
# Where the Prefect server listens; clients always use HOST. A container sets 0.0.0.0 (see Dockerfile).
BIND = os.environ.get("TRANSPEFT_BIND_HOST", HOST)
WORK_POOL = "transpeft-local"
WORKER_NAME = "transpeft-local-worker"
WEBHOOK_NAME = "transpeft-base-registered"
WEBHOOK_EVENTS = ["model_version.created"]
# What each process's command line contains; a pid file whose process does not match is stale (pid reuse).
MARKERS = {"prefect-server": "server", "webhook-receiver": "webhook_receiver", "worker": "worker"}


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
                   webhook_port=_port(env, "TRANSPEFT_WEBHOOK_PORT", 5055), bin=Path(sys.executable).parent)

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

    def pid_file(self, name: str) -> Path:
        return self.mlflow_store / "mlflow.pid" if name == "mlflow" else self.state / f"{name}.pid"

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
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_TRACKING_URI=self.mlflow_url,
                   MLFLOW_PORT=str(self.mlflow_port), MLFLOW_STORE_DIR=str(self.mlflow_store),
                   MLFLOW_BIN=self.tool("mlflow"))
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        env.update(extra)
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
    for needed in ("mlflow/up", "mlflow/webhook_receiver.py"):
        if not (stack.project / needed).exists():
            raise StackError(f"{stack.project / needed} is missing; is {stack.project} the transpeft project?")
    (stack.state / "logs").mkdir(parents=True, exist_ok=True)
    stack.prefect_home.mkdir(parents=True, exist_ok=True)
    say(f"stack of {stack.project} (state in {stack.state})")
    # The Prefect server migrates its database while mlflow/up waits for MLflow: start both at once.
    running = _running(stack, "prefect-server", say, stack.prefect_url)
    server = running or start_prefect_server(stack, say)
    start_mlflow(stack, say)
    # Waited for even when it was running: another `up` may have just started it.
    _wait_until("prefect-server", stack, lambda: _answers(stack.prefect_api_url + "/health"), server, 90,
                f"if port {stack.prefect_port} is taken, set PREFECT_PORT to a free one")
    if not running:
        say(f"prefect-server: up at {stack.prefect_url} (pid {server})")
    secret = webhook_secret(stack)
    start_webhook_receiver(stack, secret, say)
    try:
        action = register_webhook(stack.mlflow_url, stack.webhook_url, secret)
    except Exception as e:  # MlflowException, or the server's refusal as an HTTP error
        raise StackError(f"mlflow webhook: could not register {WEBHOOK_NAME} at {stack.mlflow_url}: {e}. The server "
                         f"needs the webhook settings of mlflow/server.env; log {stack.log_file('mlflow')}") from e
    say(f"mlflow webhook {WEBHOOK_NAME}: {action} -> {stack.webhook_url}")
    ensure_work_pool(stack, say)
    deploy(stack, say)
    start_worker(stack, say)
    say(f"""
Prefect UI  {stack.prefect_url}
MLflow UI   {stack.mlflow_url}
Logs        {stack.state / 'logs'}/ and {stack.log_file('mlflow')}
To run a deployment from a shell:
  export PREFECT_API_URL={stack.prefect_api_url} MLFLOW_TRACKING_URI={stack.mlflow_url}
  {stack.bin / 'prefect'} deployment run 'transfer-on-base-update/all-adapters' -p family=demo -p version=v2
Stop it all with `make down` (transpeft stack down).""")


def start_prefect_server(stack: Stack, say) -> int:
    """Spawn `prefect server start` (SQLite under .prefect/); its pid. Does not wait for it."""
    _check_port_free(stack, "prefect-server", stack.prefect_port, "PREFECT_PORT")
    say(f"prefect-server: starting at {stack.prefect_url} (log {stack.log_file('prefect-server')})")
    cmd = [stack.tool("prefect"), "server", "start", "--host", BIND, "--port", str(stack.prefect_port),
           "--analytics-off"]
    return _spawn(stack, "prefect-server", cmd, stack.env()).pid


def start_mlflow(stack: Stack, say) -> None:
    """mlflow/up: idempotent itself, waits for /health, enables webhooks (mlflow/server.env)."""
    code = _run_script(stack, "mlflow/up", say)
    if code != 0:
        raise StackError(f"mlflow: mlflow/up failed (exit {code}, reason above; log {stack.log_file('mlflow')}); "
                         f"if port {stack.mlflow_port} is taken, set MLFLOW_PORT to a free one")


def webhook_secret(stack: Stack) -> str:
    """$TRANSPEFT_WEBHOOK_SECRET, else the one made on the first `up` in .stack/webhook.secret (0600)."""
    if os.environ.get("TRANSPEFT_WEBHOOK_SECRET"):
        return os.environ["TRANSPEFT_WEBHOOK_SECRET"]
    path = stack.state / "webhook.secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def start_webhook_receiver(stack: Stack, secret: str, say) -> None:
    name = "webhook-receiver"
    if _running(stack, name, say, stack.webhook_url):
        return
    _check_port_free(stack, name, stack.webhook_port, "TRANSPEFT_WEBHOOK_PORT")
    cmd = [sys.executable, str(stack.project / "mlflow" / "webhook_receiver.py"), "--host", HOST,
           "--port", str(stack.webhook_port), "--prefect-api-url", stack.prefect_api_url]
    pid = _spawn(stack, name, cmd, stack.env(TRANSPEFT_WEBHOOK_SECRET=secret)).pid
    _wait_until(name, stack, lambda: _answers(stack.webhook_url + "health"), pid, 30,
                f"if port {stack.webhook_port} is taken, set TRANSPEFT_WEBHOOK_PORT to a free one")
    say(f"{name}: up at {stack.webhook_url} (pid {pid}), emitting events to {stack.prefect_api_url}")


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


def ensure_work_pool(stack: Stack, say) -> None:
    if _request(f"{stack.prefect_api_url}/work_pools/{WORK_POOL}") is not None:
        say(f"work pool {WORK_POOL}: exists")
        return
    _run_logged(stack, "deploy", [stack.tool("prefect"), "work-pool", "create", WORK_POOL, "--type", "process"],
                f"work pool {WORK_POOL}: `prefect work-pool create` failed")
    say(f"work pool {WORK_POOL}: created (type process)")


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
    entrypoints = [e for e in names.values() if e.partition(":")[0].endswith(".py")]
    _run_logged(stack, "deploy", [sys.executable, "-c", _IMPORT_FLOWS, *entrypoints],
                "deployments: a flow file of prefect.yaml does not import")
    _run_logged(stack, "deploy", [stack.tool("prefect"), "--no-prompt", "deploy", "--all"],
                "deployments: `prefect deploy --all` failed")
    missing = sorted(set(names) - set(deployed(stack)))
    if missing:
        raise StackError(f"deployments: {', '.join(missing)} not on the server after prefect deploy; "
                         f"see {stack.log_file('deploy')}")
    stamp.write_text(fingerprint + "\n")
    say(f"deployments: {', '.join(names)} deployed in {time.monotonic() - started:.0f} s")


_IMPORT_FLOWS = """
import importlib.util, sys
sys.path.insert(0, ".")
for n, entrypoint in enumerate(sys.argv[1:]):
    path, name = entrypoint.rsplit(":", 1)
    print("importing", entrypoint, flush=True)
    spec = importlib.util.spec_from_file_location(f"_flow{n}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, name)
"""


def deployed(stack: Stack) -> list[str]:
    """Names of the deployments the Prefect server holds."""
    rows = _request(f"{stack.prefect_api_url}/deployments/filter", {"limit": 200}) or []
    return [row["name"] for row in rows]


def start_worker(stack: Stack, say) -> None:
    name = "worker"
    if _running(stack, name, say, f"pool {WORK_POOL}"):
        return
    cmd = [stack.tool("prefect"), "worker", "start", "--pool", WORK_POOL, "--name", WORKER_NAME,
           "--type", "process", "--install-policy", "never"]
    started = time.time() - 1
    # Poll every 2 s (Prefect's default is 10): a registered base's revalidation starts within seconds.
    pid = _spawn(stack, name, cmd, stack.env(PREFECT_WORKER_QUERY_SECONDS="2")).pid
    _wait_until(name, stack, lambda: worker_online(stack, since=started), pid, 60,
                f"check that the Prefect server answers at {stack.prefect_api_url}/health")
    say(f"{name}: up (pid {pid}), polling work pool {WORK_POOL}")


def worker_online(stack: Stack, since: float = 0) -> bool:
    """Whether our worker is ONLINE on the server, with a heartbeat at or after `since` (unix seconds).

    The server keeps a stopped worker ONLINE until its heartbeat times out, so a restart waits for a
    heartbeat of the new process.
    """
    rows = _request(f"{stack.prefect_api_url}/work_pools/{WORK_POOL}/workers/filter", {}) or []
    return any(row["name"] == WORKER_NAME and row.get("status") == "ONLINE" and row.get("last_heartbeat_time")
               and datetime.fromisoformat(row["last_heartbeat_time"]).timestamp() >= since for row in rows)


# -- down and status ----------------------------------------------------------------------------

# Workers before the server they poll: a worker whose server is gone keeps retrying for a long time.
STOP_ORDER = ("worker", "webhook-receiver", "prefect-server")


def down(stack: Stack, say: Callable[[str], None] = print, timeout: float = 20) -> None:
    """Stop every component, the worker first and MLflow last; idempotent."""
    for name in STOP_ORDER:
        stop(stack, name, say, timeout)
    code = _run_script(stack, "mlflow/down", say)
    if code != 0:
        raise StackError(f"mlflow: mlflow/down failed (exit {code}); pid file {stack.pid_file('mlflow')}")


def stop(stack: Stack, name: str, say, timeout: float = 20) -> None:
    """SIGTERM the component's process group, wait, then SIGKILL it; a stale pid file is removed."""
    pid = _pid(stack, name)
    if pid is None:
        say(f"{name}: not running")
        return
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = _alive(pid)
    _signal(pid, signal.SIGKILL)
    try:  # whatever the leader left behind in its group (_spawn made it a session leader)
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    stack.pid_file(name).unlink(missing_ok=True)
    say(f"{name}: {'killed after ' + str(int(timeout)) + ' s' if killed else 'stopped'} (pid {pid})")


def status(stack: Stack) -> dict[str, dict]:
    """Each component: running (pid, where it answers) or stopped."""
    where = {"prefect-server": (stack.prefect_url, stack.prefect_api_url + "/health"),
             "mlflow": (stack.mlflow_url, stack.mlflow_url + "/health"),
             "webhook-receiver": (stack.webhook_url, stack.webhook_url + "health"),
             "worker": (f"pool {WORK_POOL}", None)}
    report = {}
    for name, (url, probe) in where.items():
        pid = _pid(stack, name, clean=False)
        row = {"running": pid is not None, "pid": pid, "url": url, "log": str(stack.log_file(name))}
        if pid is not None:  # the worker answers through the server: ONLINE there
            row["answers"] = _answers(probe) if probe else worker_online(stack)
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


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
    """Start `cmd` in its own session (it outlives this command), logging to .stack/logs/<name>.log."""
    log = stack.log_file(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=stack.project, start_new_session=True)
    stack.pid_file(name).write_text(f"{process.pid}\n")
    return process


def _run_logged(stack: Stack, log_name: str, cmd: list[str], failure: str) -> None:
    """Run a short command to completion, its output appended to .stack/logs/<log_name>.log."""
    log = stack.log_file(log_name)
    shown = " ".join(c if len(c) < 200 else "<script>" for c in cmd)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown}\n".encode())
        out.flush()
        # COLUMNS: rich wraps Prefect's tables at 80 columns in a file otherwise.
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=stack.env(COLUMNS="160"), cwd=stack.project)
    if result.returncode != 0:
        raise StackError(f"{failure} (exit {result.returncode}); fix it and run `transpeft stack up` again "
                         f"(what runs is left running). Last lines of {log}:\n{_tail(log)}")


def _run_script(stack: Stack, script: str, say) -> int:
    """Run mlflow/up or mlflow/down, each line of its output said as `mlflow: ...`; its exit code."""
    with subprocess.Popen([str(stack.project / script)], env=stack.env(), cwd=stack.project, text=True,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for line in process.stdout:
            say(f"mlflow: {line.rstrip()}")
    return process.returncode


def _wait_until(name: str, stack: Stack, ready: Callable[[], bool], pid: int, timeout: float, hint: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not _alive(pid):
            stack.pid_file(name).unlink(missing_ok=True)
            raise StackError(f"{name}: exited during start; {hint}. "
                             f"Last lines of {stack.log_file(name)}:\n{_tail(stack.log_file(name))}")
        if time.monotonic() > deadline:
            raise StackError(f"{name}: not ready after {timeout:.0f} s (pid {pid}, left running; "
                             f"`transpeft stack down` stops it); {hint}. "
                             f"Last lines of {stack.log_file(name)}:\n{_tail(stack.log_file(name))}")
        time.sleep(0.3)


def _running(stack: Stack, name: str, say, where: str) -> int | None:
    """The component's pid, said to be running, when it runs."""
    pid = _pid(stack, name)
    if pid is not None:
        say(f"{name}: already running (pid {pid}), {where}")
    return pid


def _check_port_free(stack: Stack, name: str, port: int, variable: str) -> None:
    with socket.socket() as sock:
        sock.settimeout(1)
        taken = sock.connect_ex((HOST, port)) == 0
    if taken:
        raise StackError(f"{name}: port {port} on {HOST} is in use by a process this stack did not start "
                         f"(no live pid in {stack.pid_file(name)}); stop it or set {variable} to a free port")


def _pid(stack: Stack, name: str, clean: bool = True) -> int | None:
    """The live pid recorded for the component, else None (and a stale pid file removed)."""
    path = stack.pid_file(name)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    marker = MARKERS.get(name, "mlflow")
    if _alive(pid) and marker in _cmdline(pid, marker):
        return pid
    if clean:
        path.unlink(missing_ok=True)
    return None


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child (up and down in one process, in tests)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int, default: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (macOS): trust the pid file
        return default


def _signal(pid: int, sig: int) -> None:
    """Signal the process group the component leads (it was started in its own session), else the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- helpers ------------------------------------------------------------------------------------


def _request(url: str, body: dict | None = None, timeout: float = 5):
    """GET (or POST `body` as JSON) and decode the JSON answer; None on 404 or no answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise StackError(f"{url} answered {e.code}: {e.read()[:300]!r}") from e
    except (OSError, ValueError):
        return None


def _answers(url: str) -> bool:
    return health_problem(url, timeout=2) is None


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
