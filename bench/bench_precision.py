"""fp32 or bf16 for real bases on this CPU: LoRA training and evaluation side by side; writes JSON.

    python bench/bench_precision.py            # a 0.2 B-parameter Llama from config, about 3 minutes on 2 cores
    python bench/bench_precision.py --quick    # a small one, seconds

The CPU has AMX, whose bf16 matrix units outrun fp32 on large matmuls. Three ways to run the same
LoRA fine-tune (the library's default targets) and the same teacher-forced evaluation:
  fp32           fp32 weights, no autocast (the library's CPU default today)
  bf16-autocast  fp32 weights, matmuls under bf16 autocast (``--precision bf16``)
  bf16           weights stored in bf16 (what ``--dtype bf16`` would load)
in alternation, after one warm-up each; reports the median seconds per training step and per
evaluation, and each one's ratio to fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_hotswap import random_llama
from transpeft.data import load_tasks
from transpeft.demo.tasks import build_demo_tasks
from transpeft.demo.tokenizer import demo_tokenizer
from transpeft.evaluate import exact_match_flags
from transpeft.methods import MethodConfig, get_method
from transpeft.train import TrainConfig, train_loop

MODES = {"fp32": (torch.float32, "fp32"), "bf16-autocast": (torch.float32, "bf16"), "bf16": (torch.bfloat16, "fp32")}


def run(base, tokenizer, mode: str, train, evaluate, steps: int, batch: int) -> tuple[float, float]:
    dtype, precision = MODES[mode]
    model = get_method("lora").attach(copy.deepcopy(base).to(dtype), MethodConfig(r=16))
    result = train_loop(model, tokenizer, train, TrainConfig(steps=steps, batch_size=batch, precision=precision),
                        progress=False)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
        exact_match_flags(model, tokenizer, evaluate)
    return result.seconds / steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small base, one repeat: checks the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "precision.json")
    args = parser.parse_args()
    shape, steps, batch, rows, repeats = ("quick", 2, 4, 8, 1) if args.quick else ("large", 6, 16, 64, 2)
    tokenizer = demo_tokenizer()
    base = random_llama(shape, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        build_demo_tasks(Path(tmp), n_train=256, n_eval=rows)
        (task,) = load_tasks(Path(tmp), ["reverse"])
    train, evaluate = list(task.train), list(task.eval)
    for mode in MODES:  # warm-up: allocator, oneDNN kernels
        run(base, tokenizer, mode, train, evaluate, 1, batch)
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            times[mode].append(run(base, tokenizer, mode, train, evaluate, steps, batch))
            print(f"{mode}: {times[mode][-1][0]:.3f} s/step, evaluation {times[mode][-1][1]:.2f} s", flush=True)
    medians = {mode: (statistics.median(t for t, _ in runs), statistics.median(e for _, e in runs))
               for mode, runs in times.items()}
    step_fp32, eval_fp32 = medians["fp32"]
    results = {"parameters": sum(p.numel() for p in base.parameters()), "torch_threads": torch.get_num_threads(),
               "batch": batch, "steps": steps, "eval_rows": rows, "repeats": repeats,
               "modes": {mode: {"train_step_s": round(step, 4), "evaluate_s": round(ev, 3),
                                "train_speedup_vs_fp32": round(step_fp32 / step, 2),
                                "evaluate_speedup_vs_fp32": round(eval_fp32 / ev, 2)}
                         for mode, (step, ev) in medians.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
