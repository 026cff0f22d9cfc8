"""Scoring many LoRA adapters on one base: one at a time, merged, or in shared (mixed-adapter) batches; JSON.

    python bench/bench_batched_eval.py            # three base sizes, 16 adapters: about 3 minutes on 2 cores
    python bench/bench_batched_eval.py --quick    # seconds: checks the script

The revalidation scores each adapter on its own tasks. Three ways to do that for a fleet of LoRA
adapters on one base, side by side in one run, on the same adapters and rows:

    one at a time   load the adapter onto the base, score its rows, unload (transfer.score_adapters' default)
    merged          the same, with the adapter merged into the base weights while it is scored
    shared batches  the adapters loaded onto one PEFT model under names of their own; each batch holds
                    rows of several, each row routed through its own (transfer.score_adapters, peft's
                    ``adapter_names``)

Each adapter's exact match must be the same all three ways (merging may flip a near-tie; those are
counted). Bases: the test profile's v2 (hidden 32), and random Llamas 128 and 512 wide (demo tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_hotswap import random_llama  # noqa: E402
from transpeft.bases import BaseRef, load_base  # noqa: E402
from transpeft.data import load_tasks  # noqa: E402
from transpeft.demo.family import build_demo_family  # noqa: E402
from transpeft.demo.tasks import build_demo_tasks  # noqa: E402
from transpeft.demo.tokenizer import demo_tokenizer  # noqa: E402
from transpeft.evaluate import evaluate  # noqa: E402
from transpeft.methods import MethodConfig  # noqa: E402
from transpeft.train import TrainConfig, train_adapter  # noqa: E402
from transpeft.transfer import load_adapter, score_adapters, unload_adapter  # noqa: E402


def make_adapters(base_dir: Path, tasks, n: int, work: Path) -> dict:
    """``n`` LoRA adapters (r 8, 3 steps), adapter i on task i mod len(tasks): the jobs of ``score_adapters``."""
    model, tokenizer, info = load_base(BaseRef(str(base_dir)))
    jobs = {}
    for i in range(n):
        task, out = tasks[i % len(tasks)], work / f"adapter-{i}"
        trained, manifest, _ = train_adapter(model, tokenizer, info, [task], MethodConfig(r=8),
                                             TrainConfig(steps=3, batch_size=8, seed=i), out, progress=False)
        model = unload_adapter(trained, "lora")
        jobs[f"adapter-{i}"] = (out, manifest, [task])
    return jobs


def merged(model, tokenizer, info, jobs, batch_size: int) -> dict:
    """Each adapter loaded, merged into the base weights while it is scored, unmerged and unloaded."""
    scores = {}
    for key, (folder, manifest, tasks) in jobs.items():
        adapted = load_adapter(model, info, folder, manifest)
        adapted.merge_adapter()
        scores[key] = {t.name: evaluate(adapted, tokenizer, list(t.eval), batch_size) for t in tasks}
        adapted.unmerge_adapter()
        model = unload_adapter(adapted, "lora")
    return scores


def compare(base_dir: Path, jobs: dict, batch_size: int, repeats: int) -> dict:
    model, tokenizer, info = load_base(BaseRef(str(base_dir)))
    ways = {"one at a time": lambda: score_adapters(model, tokenizer, info, jobs, batch_size),
            "merged": lambda: merged(model, tokenizer, info, jobs, batch_size),
            "shared batches": lambda: score_adapters(model, tokenizer, info, jobs, batch_size, share_batches=True)}
    seconds, scores = {name: [] for name in ways}, {}
    for _ in range(repeats):  # interleaved, so the machine's noise falls on all three alike
        for name, way in ways.items():
            start = time.perf_counter()
            scores[name] = way()
            seconds[name].append(time.perf_counter() - start)
    exact = {name: {(k, t): m.exact_match for k, s in got.items() for t, m in s.items()} for name, got in scores.items()}
    differ = {name: sum(v != exact["one at a time"][key] for key, v in got.items())
              for name, got in exact.items() if name != "one at a time"}
    best = {name: round(min(s), 3) for name, s in seconds.items()}
    return {"hidden": info.signature.hidden_size, "parameters": sum(p.numel() for p in model.parameters()),
            "adapters": len(jobs), "rows": sum(len(t.eval) for _, _, ts in jobs.values() for t in ts),
            "seconds_min_of_repeats": best,
            "speedup_vs_one_at_a_time": {name: round(best["one at a time"] / s, 2) for name, s in best.items()},
            "adapters_whose_exact_match_differs": differ, "fastest": min(best, key=best.get)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 adapters, 8 rows, one repeat: checks the script")
    parser.add_argument("--out", type=Path, help="default bench/results/batched_eval.json (.quick.json with --quick)")
    args = parser.parse_args()
    n, rows, repeats = (4, 8, 1) if args.quick else (16, 32, 3)
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"cores": os.cpu_count(), "batch_size": 32, "eval_rows_per_adapter": rows, "bases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_demo_family(work / "family", profile="test", progress=False, quick=args.quick)
        build_demo_tasks(work / "data", n_train=32, n_eval=rows)
        tasks = load_tasks(work / "data")
        bases = {"test profile v2": work / "family" / "v2"}
        for hidden, ffn, layers, heads in ((64, 128, 2, 4),) if args.quick else ((128, 384, 4, 4), (512, 1536, 4, 8)):
            tokenizer, folder = demo_tokenizer(), work / f"llama-{hidden}"
            random_llama((hidden, ffn, layers, heads), tokenizer).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            bases[f"random Llama, hidden {hidden}"] = folder
        for label, base_dir in bases.items():
            jobs = make_adapters(base_dir, tasks, n, work / label.replace(" ", "-").replace(",", ""))
            results["bases"][label] = compare(base_dir, jobs, 32, repeats)
            print(label, json.dumps(results["bases"][label]["seconds_min_of_repeats"]), flush=True)
    out = args.out or ROOT / "bench" / "results" / ("batched_eval.quick.json" if args.quick else "batched_eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
