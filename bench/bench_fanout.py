"""Concurrent adapter training on the CPU: how to split the cores; writes bench/results/fanout.json.

    python bench/bench_fanout.py --base pipeline/bases/v1     # about 3 minutes on 2 CPU cores
    python bench/bench_fanout.py --base pipeline/bases/v1 --quick

The same adapters (one per demo task, the flows' per-adapter work) trained three ways, side by side:
one at a time with all of torch's threads; two at a time in threads (as Prefect's thread runner
does) with all threads each; and two at a time with the threads split between them, which is what
flows/__init__.py does for ``fanout.max_workers`` > 1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from transpeft.bases import BaseRef, load_base
from transpeft.demo.tasks import build_demo_tasks
from transpeft.data import load_tasks
from transpeft.methods import MethodConfig
from transpeft.train import TrainConfig, train_adapter


def train_all(base: Path, tasks, steps: int, workers: int, threads: int, work: Path) -> float:
    torch.set_num_threads(threads)

    def one(task):
        model, tokenizer, info = load_base(BaseRef(str(base)))
        train_adapter(model, tokenizer, info, [task], MethodConfig(), TrainConfig(steps=steps), work / task.name,
                      progress=False)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, tasks))
    return round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a model directory, e.g. pipeline/bases/v1")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fanout.json"))
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the script, measures nothing")
    args = parser.parse_args()
    cores, steps = os.cpu_count() or 1, 5 if args.quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_demo_tasks(work / "data", n_train=256, n_eval=32)
        tasks = load_tasks(work / "data")
        train_all(args.base, tasks[:1], 2, 1, cores, work / "warm-up")  # first-call costs out of the timings
        ways = {"1 task x all threads": (1, cores), "2 tasks x all threads": (2, cores),
                "2 tasks x split threads": (2, max(1, cores // 2))}
        seconds = {name: train_all(args.base, tasks, steps, w, t, work / name.replace(" ", "_"))
                   for name, (w, t) in ways.items()}
    best = min(seconds, key=seconds.get)
    results = {"base": str(args.base), "cores": cores, "adapters": len(tasks), "steps_each": steps,
               "seconds": seconds, "fastest": best,
               "split_vs_one_at_a_time": round(seconds["1 task x all threads"] / seconds["2 tasks x split threads"], 2),
               "split_vs_oversubscribed": round(seconds["2 tasks x all threads"] / seconds["2 tasks x split threads"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
