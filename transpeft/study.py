"""The transfer study: what Trans-PEFT buys over direct transfer, over seeds, base updates and a grid.

    transpeft study                  # params.yaml's study on pipeline/bases and pipeline/data (= dvc repro study)
    transpeft study --quick          # a smoke run: two settings, two seeds, a few steps

For every setting of the grid (LoRA targets, p_c, p_i), every seed and every task, one adapter is
trained on the old base of each update, as the fleet trains them (one adapter per task), and scored on
the old base and, as it is, on the new one. Per task, update and seed the rows hold these arms:

    ft_old      the adapter on the base it was trained on
    direct      the plain adapter (p_c = p_i = 0) on the new base, as it is
    transpeft   an adapter trained with the regularisers on the new base, as it is
    ft_new      a plain adapter trained on the new base: what re-tuning with the data could reach
    retune@N    the direct or the chosen Trans-PEFT adapter re-tuned N steps on the new base, warm-started
                from its transferred weights with its own regularisers
    strategy:S  the chosen Trans-PEFT adapter carried over by the gate's strategy S (study.strategies:
                scaled, distill, distill-synthetic, retune), with its steps, seconds and whether it used labels

Every row goes to ``results.json``; the summary, the report and the plots are computed from those
rows alone (``transpeft.study_results``). Finished jobs are kept under the work directory, so an
interrupted study resumes where it stopped and a changed setting re-runs only what it changes (a change
to the bases, the data or the training and scoring code re-runs everything).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from .config import StudyConfig  # defined with the other configuration models; imported from here too
from .methods import MethodConfig
from .placement import Placement
from .train import TrainConfig

ARMS = ("ft_old", "direct", "transpeft", "ft_new")


@dataclass(frozen=True)
class Job:
    """One training and its scoring, run in a worker process."""

    kind: str  # train (grid cell on an old base), ft_new (plain on a new base), retune
    task: str  # the one task it trains on, as the fleet's adapters do
    base: str  # the version it trains on
    targets: str
    p_c: float
    p_i: float
    seed: int
    steps: int
    score_on: tuple[str, ...] = ()  # train: the new versions it is put on as it is
    start: str = ""  # retune, strategy: the job id of the trained adapter it starts from
    strategy: str = ""  # strategy: which

    def describe(self) -> str:
        what = {"train": "train", "ft_new": "fine-tune on new", "retune": f"re-tune {self.steps} steps",
                "strategy": f"carry by {self.strategy}"}[self.kind]
        return f"{what} {self.task} on {self.base}, {self.targets}, p_c {self.p_c}, p_i {self.p_i}, seed {self.seed}"


@dataclass(frozen=True)
class Inputs:
    """Where the bases and the task data are, and how models are placed (handed to every worker)."""

    bases: dict[str, str]  # version -> model directory
    family: str
    data: str
    workdir: str
    placement: Placement = Placement()


def job_id(job: Job, config: StudyConfig, identity: dict) -> str:
    """Stable id of a job: what it runs, on which weights and data; a changed input gives a new id."""
    recipe = {k: v for k, v in asdict(config).items() if k in ("r", "alpha", "batch_size", "lr", "warmup")}
    if job.kind == "strategy":
        recipe["prompts_per_task"] = config.prompts_per_task
    if job.kind not in ("retune", "strategy"):
        recipe["steps"] = config.steps
    blob = json.dumps({"job": asdict(job), "recipe": recipe, "targets": config.targets.get(job.targets),
                       "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the worker side ------------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(inputs: Inputs, threads: int, prompts_per_task: int = 256) -> None:
    import torch

    torch.set_num_threads(threads)
    _STATE.clear()
    _STATE.update(inputs=inputs, bases={}, prompts_per_task=prompts_per_task)


def _base(version: str):
    """(model, tokenizer, info) of a base, loaded once per worker process."""
    from .bases import BaseRef, load_base

    inputs: Inputs = _STATE["inputs"]
    if version not in _STATE["bases"]:
        _STATE["bases"][version] = list(load_base(BaseRef(inputs.bases[version], family=inputs.family, version=version),
                                                  inputs.placement))
    return _STATE["bases"][version]


def _task(name: str):
    from .data import load_task

    tasks = _STATE.setdefault("tasks", {})
    if name not in tasks:
        tasks[name] = load_task(Path(_STATE["inputs"].data) / name)
    return tasks[name]


def run_job(job: Job, key: str, config: StudyConfig) -> list[dict]:
    """Train what the job says, score it, return its rows (and keep the adapter for re-tuning)."""
    from .train import train_adapter
    from .transfer import score_adapter, unload_adapter

    if job.kind == "strategy":
        return _carry(job)
    inputs: Inputs = _STATE["inputs"]
    tasks = [_task(job.task)]
    method = MethodConfig(r=config.r, alpha=config.alpha, target_modules=config.targets[job.targets])
    train = TrainConfig(steps=job.steps, batch_size=config.batch_size, lr=config.lr, warmup=config.warmup,
                        p_c=job.p_c, p_i=job.p_i, seed=job.seed)
    adapter = Path(inputs.workdir) / "adapters" / key
    warm = Path(inputs.workdir) / "adapters" / job.start if job.kind == "retune" else None
    slot = _base(job.base)
    model, manifest, _ = train_adapter(slot[0], slot[1], slot[2], tasks, method, train, adapter, progress=False,
                                       warm_start=warm)
    slot[0] = unload_adapter(model, method.name)
    on_own = {t: m["exact_match"] for t, m in manifest.metrics.items()}
    common = {"p_c": job.p_c, "p_i": job.p_i, "targets": job.targets, "seed": job.seed}
    if job.kind == "ft_new":
        return [{"task": t, "update": u, "arm": "ft_new", **common, "exact_match": on_own[t]}
                for u in config.updates if u.endswith("->" + job.base) for t in on_own]
    if job.kind == "retune":
        return [{"task": t, "update": job.score_on[0], "arm": f"retune@{job.steps}", **common, "exact_match": on_own[t]}
                for t in on_own]
    rows = [{"task": t, "update": f"{job.base}->{new}", "arm": "ft_old", **common, "exact_match": on_own[t]}
            for new in job.score_on for t in on_own]
    arm = "direct" if job.p_c == job.p_i == 0 else "transpeft"
    for new in job.score_on:
        target = _base(new)
        scores = score_adapter(target[0], target[1], target[2], adapter, tasks, manifest)
        rows += [{"task": t, "update": f"{job.base}->{new}", "arm": arm, **common, "exact_match": m.exact_match}
                 for t, m in scores.items()]
    return rows


def _carry(job: Job) -> list[dict]:
    """The trained adapter ``job.start`` carried from the old base to ``job.base`` by one strategy, as the
    revalidation flow's gate would (its own regularisers when it trains); its rows, with what it took."""
    from .adapters import read_manifest
    from .params import Gate
    from .strategies import STRATEGIES, Means, direct, split_eval

    inputs: Inputs = _STATE["inputs"]
    task = _task(job.task)
    adapter = Path(inputs.workdir) / "adapters" / job.start
    manifest = read_manifest(adapter)
    old_version = job.score_on[0].split("->")[0]
    new = _base(job.base)
    slot = SimpleNamespace(model=new[0], tokenizer=new[1], info=new[2])

    @contextmanager
    def teacher():
        old = _base(old_version)
        lent = SimpleNamespace(model=old[0], tokenizer=old[1], info=old[2])
        yield lent
        old[0] = lent.model

    synthetic = job.strategy == "distill-synthetic"
    gate = Gate(retune_steps=job.steps, distill_steps=job.steps, retune_p_c=job.p_c, retune_p_i=job.p_i,
                prompts="synthetic" if synthetic else "stored", prompts_per_task=_STATE["prompts_per_task"])
    held_out, gate_rows = {}, {task.name: list(task.eval)}
    if job.strategy == "scaled":  # its alpha on a held-out slice; scored on the rest, as the gate scores it
        held_out[task.name], gate_rows[task.name] = split_eval(task, gate.held_out)
    with tempfile.TemporaryDirectory() as work:
        means = Means(job.start, slot, adapter, manifest, [task], gate_rows, held_out, gate, Path(work), teacher)
        attempt = STRATEGIES["distill" if synthetic else job.strategy](means)
        as_transferred = direct(means).scores  # the same adapter, on the same rows, as it is
        scores = attempt.scores or as_transferred  # no candidate: it serves as transferred
    new[0] = slot.model
    return [{"task": t, "update": job.score_on[0], "arm": f"strategy:{job.strategy}", "p_c": job.p_c, "p_i": job.p_i,
             "targets": job.targets, "seed": job.seed, "exact_match": v, "transferred": as_transferred[t],
             "old": manifest.metrics[t]["exact_match"], "steps": attempt.steps, "seconds": round(attempt.seconds, 2),
             "labels": attempt.used.get("labels", 0), "used": attempt.used, "note": attempt.note}
            for t, v in scores.items()]


# -- the study ------------------------------------------------------------------------------------


def plan_grid(config: StudyConfig) -> list[Job]:
    """The trainings that do not depend on results: every grid cell on each old base, ft_new on each new one."""
    news_of: dict[str, list[str]] = {}
    for old, new in config.pairs:
        news_of.setdefault(old, []).append(new)
    used = list(dict.fromkeys(t for t, _, _ in config.settings()))
    jobs = [Job("train", task, old, t, pc, pi, seed, config.steps, tuple(news))
            for old, news in news_of.items() for t, pc, pi in config.settings() for seed in config.seeds
            for task in config.tasks]
    jobs += [Job("ft_new", task, new, t, 0.0, 0.0, seed, config.steps)
             for new in dict.fromkeys(n for _, n in config.pairs) for t in used for seed in config.seeds
             for task in config.tasks]
    return jobs


def plan_retune(config: StudyConfig, chosen: dict, keys: dict[Job, str]) -> list[Job]:
    """Re-tune curves on every update, from the direct and from the chosen Trans-PEFT adapter."""
    starts = [(chosen["targets"], 0.0, 0.0), (chosen["targets"], chosen["p_c"], chosen["p_i"])]
    jobs = []
    for old, new in config.pairs:
        for t, pc, pi in starts:
            for seed in config.seeds:
                for task in config.tasks:
                    trained = next(j for j in keys if j.kind == "train" and (j.task, j.base, j.targets, j.p_c, j.p_i,
                                                                             j.seed) == (task, old, t, pc, pi, seed))
                    jobs += [Job("retune", task, new, t, pc, pi, seed, n, (f"{old}->{new}",), start=keys[trained])
                             for n in config.retune_steps]
    return jobs


def plan_strategies(config: StudyConfig, chosen: dict, keys: dict[Job, str]) -> list[Job]:
    """Every strategy of study.strategies on every update, seed and task, from the chosen Trans-PEFT adapter."""
    jobs = []
    for old, new in config.pairs:
        for seed in config.seeds:
            for task in config.tasks:
                trained = next(j for j in keys if j.kind == "train" and (j.task, j.base, j.targets, j.p_c, j.p_i,
                               j.seed) == (task, old, chosen["targets"], chosen["p_c"], chosen["p_i"], seed))
                jobs += [Job("strategy", task, new, chosen["targets"], chosen["p_c"], chosen["p_i"], seed,
                             config.strategy_steps, (f"{old}->{new}",), start=keys[trained], strategy=name)
                         for name in config.strategies]
    return jobs


def _execute(jobs: list[Job], config: StudyConfig, inputs: Inputs, identity: dict, say: Callable[[str], None],
             keys: dict[Job, str]) -> list[dict]:
    """Run the jobs not already done, ``config.workers`` at a time; every job's rows."""
    rows_dir = Path(inputs.workdir) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        keys[job] = job_id(job, config, identity)
    done = {j: json.loads((rows_dir / f"{keys[j]}.json").read_text()) for j in jobs
            if (rows_dir / f"{keys[j]}.json").is_file()}
    todo = [j for j in jobs if j not in done]
    if done:
        say(f"  {len(done)} of {len(jobs)} jobs already done (kept under {rows_dir}), {len(todo)} to run")
    start = time.perf_counter()

    def finished(job: Job, rows: list[dict]) -> None:
        done[job] = rows
        _write_atomic(rows_dir / f"{keys[job]}.json", json.dumps(rows))
        elapsed = time.perf_counter() - start
        count = len(done) - (len(jobs) - len(todo))
        eta = elapsed / count * (len(todo) - count)
        say(f"  [{len(done)}/{len(jobs)}] {job.describe()}: {_brief(rows)}  ({elapsed:.0f} s, ~{eta:.0f} s left)")

    threads = max(1, (os.cpu_count() or 1) // config.workers)
    if config.workers == 1 or len(todo) <= 1:
        _init_worker(inputs, threads if config.workers > 1 else (os.cpu_count() or 1), config.prompts_per_task)
        for job in todo:
            finished(job, run_job(job, keys[job], config))
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker,
                                 initargs=(inputs, threads, config.prompts_per_task)) as pool:
            futures = {pool.submit(run_job, job, keys[job], config): job for job in todo}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    return [row for job in jobs for row in done[job]]


def _brief(rows: list[dict]) -> str:
    by_arm: dict[str, list[float]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"] + (f" {r['update'].split('->')[1]}" if r["arm"] in ("direct", "transpeft") else ""),
                          []).append(r["exact_match"])
    return ", ".join(f"{arm} {100 * sum(v) / len(v):.0f}%" for arm, v in by_arm.items())


def _write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as f:
        f.write(text)
    os.replace(f.name, path)


# The modules whose code decides a job's numbers: a change to any of them re-runs every job.
_SCORING_CODE = ("train.py", "seeding.py", "regularisers.py", "methods.py", "bottleneck.py", "batching.py",
                 "evaluate.py", "transfer.py", "adapters.py", "strategies.py")


def base_identity(inputs: Inputs, versions: list[str]) -> dict:
    """What a job's result depends on besides its settings: the bases' weights, the task data, the code."""
    from .bases import file_sha256
    from .data import load_tasks

    here = Path(__file__).parent
    identity = {"code": hashlib.sha256(b"".join((here / name).read_bytes() for name in _SCORING_CODE)).hexdigest()}
    for version in versions:
        files = sorted(Path(inputs.bases[version]).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"base {version}: no safetensors weights in {inputs.bases[version]}")
        identity[version] = [file_sha256(f) for f in files]
    identity["data"] = {t.name: t.content_hash for t in load_tasks(inputs.data)}
    identity["placement"] = _resolved_placement(inputs, versions)  # bf16 on a GPU scores differently
    return identity


def _resolved_placement(inputs: Inputs, versions: list[str]) -> dict[str, str]:
    from transformers import AutoConfig

    resolved = {}
    for version in versions:
        device, dtype = inputs.placement.resolve(AutoConfig.from_pretrained(inputs.bases[version]))
        resolved[version] = f"{device.type} {dtype}".replace("torch.", "")
    return resolved


def run_study(config: StudyConfig, inputs: Inputs, out: Path, say: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study, write results.json and the summary files under ``out``; the summary."""
    from .study_results import choose

    versions = list(dict.fromkeys(v for pair in config.pairs for v in pair))
    missing = [v for v in versions if v not in inputs.bases]
    if missing:
        raise ValueError(f"study.updates name base versions with no model directory: {', '.join(missing)}")
    identity = base_identity(inputs, versions)
    keys: dict[Job, str] = {}
    started = time.perf_counter()
    grid = plan_grid(config)
    say(f"study: {len(config.settings())} settings x {len(config.seeds)} seeds x {len(config.tasks)} tasks on "
        f"{', '.join(config.updates)}: {len(grid)} trainings, then the re-tune curves")
    rows = _execute(grid, config, inputs, identity, say, keys)
    chosen = choose(rows, config.max_old_cost)
    say(f"  chosen: {chosen['targets']}, p_c {chosen['p_c']}, p_i {chosen['p_i']} ({chosen['why']})")
    rows += _execute(plan_retune(config, chosen, keys), config, inputs, identity, say, keys)
    phase = None
    if config.strategies:
        say(f"  the strategies {', '.join(config.strategies)} on the chosen adapters")
        phase = time.perf_counter()
        rows += _execute(plan_strategies(config, chosen, keys), config, inputs, identity, say, keys)
        phase = round(time.perf_counter() - phase, 1)
    return render(rows, config, out, seconds=round(time.perf_counter() - started, 1), strategies_seconds=phase)


def run_strategies(config: StudyConfig, inputs: Inputs, out: Path, say: Callable[[str], None] = print) -> dict:
    """The strategies phase alone, on a study already run: the chosen setting from ``out``'s results.json,
    its adapters trained again (or found under the work directory), every strategy's rows put in place of
    the earlier ones, and the outputs rendered again."""
    from .study_results import choose

    rows = [r for r in json.loads((out / "results.json").read_text()) if not r["arm"].startswith("strategy:")]
    chosen = choose(rows, config.max_old_cost)
    versions = list(dict.fromkeys(v for pair in config.pairs for v in pair))
    identity = base_identity(inputs, versions)
    keys: dict[Job, str] = {}
    started = time.perf_counter()
    trained = [j for j in plan_grid(config) if j.kind == "train"
               and (j.targets, j.p_c, j.p_i) == (chosen["targets"], chosen["p_c"], chosen["p_i"])]
    say(f"strategies {', '.join(config.strategies)} on {chosen['targets']}, p_c {chosen['p_c']}, p_i {chosen['p_i']}: "
        f"{len(trained)} adapters, then each carried over by each strategy")
    _execute(trained, config, inputs, identity, say, keys)
    rows += _execute(plan_strategies(config, chosen, keys), config, inputs, identity, say, keys)
    return render(rows, config, out, strategies_seconds=round(time.perf_counter() - started, 1))


def render(rows: list[dict], config: StudyConfig, out: Path, seconds: float | None = None,
           strategies_seconds: float | None = None) -> dict:
    """The summary, report and plots of ``rows`` under ``out`` (also from a committed results.json alone).
    ``seconds``, ``strategies_seconds``: what the whole study and its strategies phase took; kept from the
    summary already there where not given (a re-render)."""
    from .study_results import choose, summarize, write_outputs

    rows = sorted(rows, key=lambda r: (r["update"], r["task"], r["arm"], r["targets"], r["p_c"], r["p_i"], r["seed"]))
    summary = summarize(rows, config, choose(rows, config.max_old_cost))
    before = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    summary["seconds"] = seconds if seconds is not None else before.get("seconds")
    if strategies_seconds is not None or "strategies_seconds" in before:
        summary["strategies_seconds"] = strategies_seconds or before["strategies_seconds"]
    write_outputs(rows, summary, out)
    return summary
