"""fp32 or bf16 on this CPU, by model width: LoRA training and evaluation side by side; writes JSON.

    python bench/bench_precision.py            # widths 96 to 1024 (up to 0.2 B parameters), about 6 minutes
    python bench/bench_precision.py --quick    # one small shape, seconds

The CPU has bf16 matrix instructions (AVX512-BF16), which outrun fp32 on large matmuls. Three ways
to run the same LoRA fine-tune (the library's default targets) and the same teacher-forced evaluation:
  fp32           fp32 weights, no autocast
  bf16-autocast  fp32 weights, matmuls under bf16 autocast (``--precision bf16``)
  bf16           weights stored in bf16 (what ``--dtype bf16`` loads)
in alternation, after one warm-up each; reports the median seconds per training step and per
evaluation, and each one's ratio to fp32, for Llamas of growing width. ``bf16_from_hidden`` is the
narrowest width from which bf16 weights are faster than fp32 at both, and so at every wider one
measured: the library's CPU default (``transpeft.placement.CPU_BF16_MIN_HIDDEN``) is that width.
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

from bench_hotswap import SHAPES as HOTSWAP_SHAPES
from bench_hotswap import random_llama
from transpeft.data import load_tasks
from transpeft.demo.tasks import build_demo_tasks
from transpeft.demo.tokenizer import demo_tokenizer
from transpeft.evaluate import exact_match_flags
from transpeft.methods import MethodConfig, get_method
from transpeft.placement import cpu_bf16_kernels
from transpeft.train import TrainConfig, train_loop

SHAPES_LARGE, SHAPES_QUICK = HOTSWAP_SHAPES["large"], HOTSWAP_SHAPES["quick"]
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


SHAPES = {  # (hidden, FFN, layers, heads), steps, repeats: the demo family's width, then wider up to Qwen2-0.5B's;
    "h96": ((96, 256, 6, 4), 30, 5),  # narrow steps take milliseconds: more of them, more repeats, against noise
    "h256": ((256, 704, 6, 4), 20, 5),
    "h512": ((512, 1408, 6, 8), 10, 3),
    "h1024": (SHAPES_LARGE, 6, 2),
}


def measure(shape, tokenizer, train, evaluate, steps: int, batch: int, repeats: int) -> dict:
    base = random_llama(shape, tokenizer)
    for mode in MODES:  # warm-up: allocator, oneDNN kernels
        run(base, tokenizer, mode, train, evaluate, 1, batch)
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            times[mode].append(run(base, tokenizer, mode, train, evaluate, steps, batch))
            print(f"hidden {shape[0]}, {mode}: {times[mode][-1][0]:.3f} s/step, evaluation {times[mode][-1][1]:.2f} s",
                  flush=True)
    medians = {mode: (statistics.median(t for t, _ in runs), statistics.median(e for _, e in runs))
               for mode, runs in times.items()}
    step_fp32, eval_fp32 = medians["fp32"]
    return {"hidden": shape[0], "parameters": sum(p.numel() for p in base.parameters()), "steps": steps,
            "repeats": repeats,
            "modes": {mode: {"train_step_s": round(step, 4), "evaluate_s": round(ev, 3),
                             "train_speedup_vs_fp32": round(step_fp32 / step, 2),
                             "evaluate_speedup_vs_fp32": round(eval_fp32 / ev, 2)}
                      for mode, (step, ev) in medians.items()}}


def bf16_from_hidden(shapes: dict) -> int | None:
    """The narrowest measured width from which bf16 weights beat fp32 at training and evaluation alike."""
    faster = [(s["hidden"], min(s["modes"]["bf16"]["train_speedup_vs_fp32"], s["modes"]["bf16"]["evaluate_speedup_vs_fp32"]) > 1)
              for s in sorted(shapes.values(), key=lambda s: s["hidden"])]
    for i, (hidden, _) in enumerate(faster):
        if all(ok for _, ok in faster[i:]):
            return hidden
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small base, one repeat: checks the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "precision.json")
    args = parser.parse_args()
    shapes, batch, rows = ({"quick": (SHAPES_QUICK, 2, 1)}, 4, 8) if args.quick else (SHAPES, 16, 64)
    tokenizer = demo_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        build_demo_tasks(Path(tmp), n_train=256, n_eval=rows)
        (task,) = load_tasks(Path(tmp), ["reverse"])
    train, evaluate = list(task.train), list(task.eval)
    measured = {name: measure(shape, tokenizer, train, evaluate, steps, batch, repeats)
                for name, (shape, steps, repeats) in shapes.items()}
    results = {"torch_threads": torch.get_num_threads(), "batch": batch, "eval_rows": rows,
               "cpu_bf16": cpu_bf16_kernels(), "shapes": measured,
               "bf16_from_hidden": bf16_from_hidden(measured)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
