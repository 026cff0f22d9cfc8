"""Revalidating fleets of hundreds of adapters, on threads and on a Dask cluster; writes JSON and a plot.

    python bench/bench_fleet.py                      # 50, 200 and 500 adapters: about 50 min on 2 CPU cores
    python bench/bench_fleet.py --quick              # fleets of 5 and 10: checks the script in about 4 minutes

The at-scale stack's servers, started here on free ports with their state in a temporary folder:
PostgreSQL under MLflow and Prefect, MLflow's artifacts in the S3-compatible server, a Dask
scheduler and two worker processes (transpeft/stack.py). For each fleet size N, a base family of its
own (the test profile's v1, v2, v3) and N adapters trained on v1, each for a few steps (their scores
do not matter here, their number does), logged and registered as training registers them. Then
the flow transfer-on-base-update runs as a worker's flow-run process does, as a Prefect flow run
in a process of its own: v1 -> v2 with the flow's thread runner, then v2 -> v3 on the Dask cluster.
The bench's gate passes every adapter: re-tuning is model compute, not what this measures.

Per run: wall time and adapters per minute; the flow's steps (plan, per-adapter tasks, close) from
the Prefect API; requests per adapter (MLflow's access log, Prefect's HTTP requests and the events
the run sent); the peak memory of the flow-run process and of each Dask worker. Beside each run,
the model compute alone: the same adapters judged by the same code (``revalidate``) from local
folders, on the same two slots, with no Prefect and no MLflow. Orchestration and tracking overhead
is the rest of the wall time: 1 - compute / wall.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transpeft import stack  # noqa: E402
from transpeft.bases import BaseRef, describe_base, lend_base  # noqa: E402
from transpeft.data import load_tasks  # noqa: E402
from transpeft.demo.family import build_demo_family  # noqa: E402
from transpeft.demo.tasks import build_demo_tasks  # noqa: E402
from transpeft.methods import MethodConfig  # noqa: E402
from transpeft.params import Gate  # noqa: E402
from transpeft.revalidate import Candidate, revalidate  # noqa: E402
from transpeft.tracking import Registry  # noqa: E402
from transpeft.train import TrainConfig, train_adapter  # noqa: E402
from transpeft.transfer import unload_adapter  # noqa: E402

SLOTS = 2  # concurrent adapters: the flow's threads (fanout.max_workers) and the stack's Dask workers
GATE = Gate(min_retention=0.0, min_score=0.0, beat_zero_shot=False, strategies=("direct",))  # every adapter passes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((stack.HOST, 0))
        return s.getsockname()[1]


def start_servers(work: Path) -> stack.Stack:
    """PostgreSQL, S3, Prefect and MLflow on them, a Dask scheduler and two workers; no worker, no
    webhook: the bench starts each revalidation itself."""
    postgres = Path(tempfile.mkdtemp(prefix="bench-fleet-postgres-"))  # the postgres user reaches it when root
    ports = {name: str(free_port()) for name in ("PREFECT_PORT", "MLFLOW_PORT", "TRANSPEFT_WEBHOOK_PORT",
                                                 "TRANSPEFT_POSTGRES_PORT", "TRANSPEFT_S3_PORT", "TRANSPEFT_DASK_PORT")}
    for key in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD_FILE", "PREFECT_API_AUTH_STRING",
                "PREFECT_API_AUTH_STRING_FILE", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        os.environ.pop(key, None)
    os.environ.update(ports, TRANSPEFT_SCALE="1", TRANSPEFT_STACK_DIR=str(work / "state"),
                      MLFLOW_STORE_DIR=str(work / "mlflow"), TRANSPEFT_POSTGRES_DIR=str(postgres),
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
                      PREFECT_SERVER_LOGGING_LEVEL="INFO",  # its access log: the HTTP requests counted
                      MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true",
                      **stack.S3_CREDENTIALS)
    servers = dataclasses.replace(stack.Stack.find(ROOT), prefect_home=work / "prefect")
    os.environ.update(PREFECT_HOME=str(servers.prefect_home), PREFECT_API_URL=servers.prefect_api_url,
                      MLFLOW_TRACKING_URI=servers.mlflow_url)
    (servers.state / "logs").mkdir(parents=True)
    servers.prefect_home.mkdir(parents=True)
    say = lambda line: print(f"  {line}", flush=True)  # noqa: E731
    stack.start_postgres(servers, say)
    stack.start_s3(servers, say)
    stack._wait(servers, "prefect-server", stack.start_prefect_server(servers, say), 120)
    stack.start_mlflow(servers, say)
    stack.start_dask(servers, say)
    return servers


def make_fleet(registry: Registry, bases: Path, data: Path, family: str, size: int, keep: Path) -> dict[str, Path]:
    """``size`` adapters of ``family`` trained on its v1 (2 steps each, r 2, task and seed by index),
    logged and registered on v1 as the finetune flow does, two at a time; the folders are kept for the
    compute-only runs."""
    refs = {v: BaseRef(str(bases / v), None, family, v) for v in ("v1", "v2", "v3")}
    v1 = describe_base(refs["v1"])[2]
    registry.register_base(v1)
    registry.register_base(describe_base(refs["v2"])[2], parent="v1")
    tasks = load_tasks(data)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // SLOTS))

    def make(i: int) -> tuple[str, Path]:
        name = f"{family}-{i:03d}"
        with lend_base(refs["v1"]) as slot:
            adapted, manifest, _ = train_adapter(slot.model, slot.tokenizer, v1, [tasks[i % len(tasks)]],
                                                 MethodConfig(r=2), TrainConfig(steps=2, batch_size=8, seed=i),
                                                 keep / name, progress=False)
            slot.model = unload_adapter(adapted, manifest.method.name)
        registry.register_adapter(name, keep / name, v1, "trained", manifest.metrics,
                                  registry.log_training(name, keep / name, manifest))
        return name, keep / name

    with ThreadPoolExecutor(SLOTS) as pool:
        return dict(tqdm(pool.map(make, range(size)), total=size, desc=f"fleet of {size}", unit="adapter"))


class PeakMemory:
    """The largest resident set of each watched process or of one of its children, sampled every 0.2 s."""

    def __init__(self, processes: dict[str, psutil.Process]):
        self.processes, self.peak = processes, dict.fromkeys(processes, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.2):
            for name, process in self.processes.items():
                try:
                    tree = [process, *process.children(recursive=True)]
                    self.peak[name] = max(self.peak[name], *(p.memory_info().rss for p in tree))
                except psutil.Error:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mib(self) -> dict[str, float]:
        return {name: round(rss / 2**20) for name, rss in self.peak.items()}


FLOW = """
import json, sys
from flows.transfer_on_base_update import transfer_on_base_update
state = transfer_on_base_update(family=sys.argv[1], version=sys.argv[2], data_dir=sys.argv[3],
                                params_file=sys.argv[4], return_state=True)
print("RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "summary": state.result()}))
"""


SERVERS = ("mlflow", "prefect-server", "postgres", "s3", "dask-scheduler", *stack.DASK_WORKERS)


def server_cpu(servers: stack.Stack) -> dict[str, float]:
    """CPU seconds used so far by each server, its child processes included."""
    used = {}
    for name in SERVERS:
        process = stack._process(servers, name)
        if process is None:
            continue
        try:
            tree = [process, *process.children(recursive=True)]
            used[name] = sum(sum(p.cpu_times()[:2]) for p in tree)
        except psutil.Error:
            pass
    return used


class CpuUse:
    """Where the CPU went during a run: seconds per server, in the flow-run process (a child of this
    one, counted once it has exited), and the machine's busy share."""

    def __init__(self, servers: stack.Stack):
        self.servers = servers

    def __enter__(self):
        self._servers, self._machine = server_cpu(self.servers), psutil.cpu_times()
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        after, machine = server_cpu(self.servers), psutil.cpu_times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.seconds = {name: round(after[name] - self._servers.get(name, 0.0), 1) for name in after}
        self.seconds["flow-run process"] = round(children.ru_utime + children.ru_stime - self._children.ru_utime
                                                 - self._children.ru_stime, 1)
        total = sum(machine) - sum(self._machine)
        self.busy_share = round(1 - (machine.idle - self._machine.idle) / total, 2) if total else None


REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD) (/[^ ?]*)')


def counts(servers: stack.Stack) -> Counter:
    """Requests so far, by server and endpoint: the lines of MLflow's and Prefect's access logs."""
    found = Counter()
    for name, log in (("mlflow", "mlflow"), ("prefect", "prefect-server")):
        for line in servers.log_file(log).open(errors="replace"):
            if match := REQUEST.search(line):
                path = re.sub(r"/[0-9a-f]{32}|/[0-9a-f-]{36}", "/<id>", match.group(2))
                found[(name, f"{match.group(1)} {path}")] += 1
    return found


def run_flow(servers: stack.Stack, family: str, version: str, data: Path, params: Path, dask: bool) -> dict:
    """One revalidation as a flow-run process; its wall time, summary, requests and peak memory."""
    env = servers.env(TRANSPEFT_PARAMS=str(params), PYTHONPATH=str(ROOT))
    if not dask:
        env.pop("TRANSPEFT_DASK_ADDRESS")
    before = counts(servers)
    started = time.perf_counter()
    process = psutil.Popen([sys.executable, "-c", FLOW, family, version, str(data), str(params)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = {"flow-run process": process}
    if dask:
        # `dask worker` is a nanny: the worker process that runs the tasks is its child.
        watched |= {name: stack._process(servers, name) for name in stack.DASK_WORKERS}
    with PeakMemory(watched) as memory, CpuUse(servers) as cpu:
        output, _ = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"the flow run of {family}/{version} failed:\n{output[-4000:]}")
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    made = counts(servers) - before
    by_server = {name: sum(n for (server, _), n in made.items() if server == name) for name in ("mlflow", "prefect")}
    endpoints = {f"{server} {endpoint}": n for (server, endpoint), n in made.most_common()}
    return {"wall_s": round(wall, 1), "summary": result["summary"], "flow_run_id": result["flow_run_id"],
            "requests": by_server, "endpoints": endpoints, "peak_rss_mib": memory.mib(), "cpu_s": cpu.seconds,
            "machine_busy_share": cpu.busy_share}


def warm_dask(servers: stack.Stack) -> None:
    """Each Dask worker process imports the flow's tasks (torch, Prefect, MLflow) before the clock starts, as
    long-lived workers have: a flow run then pays for loading its base, not for a cold worker."""
    import importlib

    from distributed import Client

    with Client(servers.dask_address, timeout=30) as client:
        client.run(lambda: bool(importlib.import_module("tasks.revalidate")))


def flow_steps(flow_run_id: str) -> dict:
    """The flow run's duration, its task runs' total seconds by task, and the events it sent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks, offset = [], 0
        while True:
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                         limit=200, offset=offset)
            tasks += page
            offset += len(page)
            if len(page) < 200:
                break
        events = _events_about(client, flow_run_id, run.start_time, run.end_time)
    steps: dict[str, dict] = {}
    for task in tasks:
        name = task.task_key.split("-")[0] if task.task_key else task.name
        entry = steps.setdefault(name, {"runs": 0, "seconds": 0.0})
        entry["runs"] += 1
        entry["seconds"] = round(entry["seconds"] + (task.total_run_time.total_seconds() if task.total_run_time
                                                     else 0.0), 2)
    return {"flow_run_s": round(run.total_run_time.total_seconds(), 1), "task_runs": len(tasks), "tasks": steps,
            "events": events}


def _events_about(client, flow_run_id: str, start, end) -> int:
    """Events of the flow run and its task runs (Prefect 3 reports task-run states as events)."""
    body = {"filter": {"occurred": {"since": start.isoformat(), "until": end.isoformat()},
                       "any_resource": {"id_prefix": ["prefect.flow-run.", "prefect.task-run."]}}, "limit": 50}
    response = client.request("POST", "/events/filter", json=body).json()
    return int(response.get("total", 0))


def compute_only(bases: Path, family: str, version: str, folders: dict[str, Path], data: Path, work: Path) -> float:
    """Seconds to judge the adapters on ``version`` as the flow's judge task does, two at a time with
    torch's threads split, from local folders: no Prefect, no MLflow."""
    ref = BaseRef(str(bases / version), None, family, version)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // SLOTS))

    def judge(name: str) -> str:
        with lend_base(ref) as slot:
            candidate = Candidate(name, "v1", {})
            return revalidate(slot, folders[name], candidate, data, GATE, work / name).decision

    with ThreadPoolExecutor(SLOTS) as pool:  # the two base instances loaded before the clock starts
        list(pool.map(lambda _: judge(next(iter(folders))), range(SLOTS)))
        started = time.perf_counter()
        decisions = list(pool.map(judge, folders))
    seconds = time.perf_counter() - started
    assert decisions.count("passed") == len(folders), decisions
    return round(seconds, 1)


def revalidate_fleet(servers, registry, bases, data, params, size: int, work: Path,
                     runners: tuple[str, ...] = ("threads", "dask")) -> dict:
    family = f"fleet{size}"
    started = time.perf_counter()
    folders = make_fleet(registry, bases, data, family, size, work / family)
    made = time.perf_counter() - started
    result = {"adapters": size, "fleet_made_s": round(made, 1), "runs": {}}
    for runner, version, dask in (("threads", "v2", False), ("dask", "v3", True)):
        if runner not in runners:
            continue
        if dask:
            warm_dask(servers)
            registry.register_base(describe_base(BaseRef(str(bases / "v3"), None, family, "v3"))[2], parent="v2")
        versions = sum(len(v) for v in registry.adapters().values())
        print(f"{family}: revalidating {size} adapters onto {version} on {runner} ({versions} adapter versions "
              "in the registry)", flush=True)
        run = run_flow(servers, family, version, data, params, dask)
        summary = run["summary"]
        assert summary["passed"] == size and summary["failed"] == summary["flagged"] == 0, summary
        run |= flow_steps(run.pop("flow_run_id"))
        run["registry_versions_before"] = versions
        run["compute_s"] = compute_only(bases, family, version, folders, data, work / f"{family}-{runner}-compute")
        run["adapters_per_min"] = round(size / run["wall_s"] * 60, 1)
        run["overhead_share"] = round(1 - run["compute_s"] / run["wall_s"], 3)
        run["per_adapter_s"] = {"wall": round(run["wall_s"] / size, 3), "compute": round(run["compute_s"] / size, 3),
                                "overhead": round((run["wall_s"] - run["compute_s"]) / size, 3)}
        run["requests_per_adapter"] = {name: round(n / size, 1) for name, n in run["requests"].items()}
        run["requests_per_adapter"]["prefect_events"] = round(run["events"] / size, 1)
        print(f"  {run['wall_s']} s, {run['adapters_per_min']} adapters/min, compute alone {run['compute_s']} s, "
              f"overhead {run['overhead_share']:.0%}", flush=True)
        result["runs"][runner] = run
    return result


def scaling(fleets: list[dict]) -> dict:
    """Seconds per adapter at the largest fleet over the smallest, per runner and step: about 1 when the
    cost grows linearly with the fleet, about largest/smallest when it grows with its square."""
    small, large = fleets[0], fleets[-1]
    out = {"fleets": [small["adapters"], large["adapters"]]}
    for runner in small["runs"]:
        a, b = small["runs"][runner], large["runs"][runner]
        per = lambda run, s: run["tasks"].get(s, {}).get("seconds", 0.0)  # noqa: E731
        out[runner] = {"wall": round((b["wall_s"] / large["adapters"]) / (a["wall_s"] / small["adapters"]), 2),
                       **{step: round((per(b, step) / large["adapters"]) / max(per(a, step) / small["adapters"], 1e-9), 2)
                          for step in a["tasks"]}}
    return out


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fleets = results["fleets"]
    sizes = [f["adapters"] for f in fleets]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for runner, marker in (("threads", "o"), ("dask", "s")):
        if runner not in fleets[0]["runs"]:
            continue
        left.plot(sizes, [f["runs"][runner]["wall_s"] / 60 for f in fleets], marker=marker, label=f"{runner}: wall")
        left.plot(sizes, [f["runs"][runner]["compute_s"] / 60 for f in fleets], marker=marker, linestyle="--",
                  label=f"{runner}: model compute alone")
        right.plot(sizes, [f["runs"][runner]["per_adapter_s"]["overhead"] for f in fleets], marker=marker,
                   label=runner)
    left.set(xlabel="adapters in the fleet", ylabel="minutes", title="Revalidation wall time")
    right.set(xlabel="adapters in the fleet", ylabel="seconds per adapter", ylim=(0, None),
              title="Orchestration + tracking overhead per adapter")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fleet revalidation, test profile, {results['cores']} CPU cores (bench/bench_fleet.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # a line per model version created, 750 times
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help="fleet sizes (default 50 200 500; 5 10 with --quick)")
    parser.add_argument("--eval-rows", type=int, default=32, help="evaluation rows per task (the model compute)")
    parser.add_argument("--out", type=Path, help="default bench/results/fleet.json (.quick.json with --quick)")
    parser.add_argument("--quick", action="store_true", help="fleets of 5 and 10: checks the script")
    parser.add_argument("--runners", nargs="+", choices=("threads", "dask"), default=["threads", "dask"],
                        help="the flow's thread runner, the Dask cluster, or both (default)")
    args = parser.parse_args()
    sizes = sorted(args.sizes or ([5, 10] if args.quick else [50, 200, 500]))
    out = args.out or ROOT / "bench" / "results" / ("fleet.quick.json" if args.quick else "fleet.json")
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        print("starting the at-scale servers", flush=True)
        servers = start_servers(work)
        try:
            build_demo_family(work / "bases", profile="test", progress=False)
            build_demo_tasks(work / "data", n_train=16, n_eval=args.eval_rows)
            params = yaml.safe_load((ROOT / "params.yaml").read_text())
            params["gate"].update(dataclasses.asdict(GATE))
            params["fanout"] = {"task_runner": "threads", "max_workers": SLOTS}
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            registry = Registry(servers.mlflow_url)
            fleets = [revalidate_fleet(servers, registry, work / "bases", work / "data", work / "params.yaml", size,
                                       work, tuple(args.runners)) for size in sizes]
        finally:
            stack.down(servers, say=lambda line: None, timeout=10)
    results = {"cores": os.cpu_count(), "profile": "test", "eval_rows_per_task": args.eval_rows, "slots": SLOTS,
               "fleets": fleets, "scaling": scaling(fleets) if len(fleets) > 1 else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps({f["adapters"]: {r: (v["wall_s"], v["overhead_share"]) for r, v in f["runs"].items()}
                      for f in fleets}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
