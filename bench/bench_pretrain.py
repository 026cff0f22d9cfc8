"""Pretraining the demo family in fp32 or under bf16 autocast on this CPU, side by side; writes JSON.

    python bench/bench_pretrain.py            # the demo and gpu profiles' shapes, about 2 minutes on 2 cores
    python bench/bench_pretrain.py --quick    # the test profile's shape, seconds

The CPU has bf16 matrix instructions (AVX512-BF16), which outrun fp32 on large matmuls; whether that pays for a
model as narrow as the demo family's decides the precision its build uses. Each shape trains the
same fresh model for a few steps of its profile's batch, fp32 and bf16 in alternation, through
``transpeft.demo.family.pretrain`` (the code the build runs). Reports the median seconds per step,
the ratio, and what the profile's whole pretraining would take at that speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from transpeft.demo.family import PROFILES, model_config, pretrain
from transpeft.demo.tokenizer import demo_tokenizer


def seconds_per_step(model: LlamaForCausalLM, rows: torch.Tensor, profile, steps: int, bf16: bool) -> float:
    fresh = copy.deepcopy(model)
    start = time.perf_counter()
    pretrain(fresh, rows, profile, steps, profile.pretrain_lr, "bench", progress=False, bf16=bf16)
    return (time.perf_counter() - start) / steps


def measure(name: str, steps: int, repeats: int) -> dict:
    profile = PROFILES[name]
    tokenizer = demo_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(profile, len(tokenizer), tokenizer.bos_token_id,
                                          tokenizer.eos_token_id, tokenizer.pad_token_id))
    rows = torch.randint(3, len(tokenizer), (steps * profile.batch, profile.seq_len))
    for bf16 in (False, True):  # warm up both paths (allocator, oneDNN kernels) before timing
        seconds_per_step(model, rows, profile, 1, bf16)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(repeats):  # alternate, so drifts of the machine hit both alike
        for label, bf16 in (("fp32", False), ("bf16", True)):
            times[label].append(seconds_per_step(model, rows, profile, steps, bf16))
    tokens = profile.batch * profile.seq_len
    out = {"parameters": sum(p.numel() for p in model.parameters()), "batch": profile.batch,
           "seq_len": profile.seq_len, "pretrain_steps": profile.pretrain_steps}
    for label, values in times.items():
        median = statistics.median(values)
        out[label] = {"seconds_per_step": round(median, 4), "runs": [round(v, 4) for v in values],
                      "tokens_per_second": round(tokens / median),
                      "pretrain_minutes": round(profile.pretrain_steps * median / 60, 1)}
    out["bf16_speedup"] = round(out["fp32"]["seconds_per_step"] / out["bf16"]["seconds_per_step"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the test profile's shape only, 2 steps")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per precision (default 3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pretrain.json")
    args = parser.parse_args()
    shapes = ["test"] if args.quick else ["demo", "gpu"]
    steps, repeats = (2, 1) if args.quick else (args.steps, args.repeats)
    results = {"machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__}, "steps": steps, "repeats": repeats, "shapes": {}}
    for name in shapes:
        print(f"{name} profile shape ...", flush=True)
        results["shapes"][name] = measure(name, steps, repeats)
        r = results["shapes"][name]
        print(f"  {r['parameters'] / 1e6:.2f} M parameters: fp32 {r['fp32']['seconds_per_step']:.3f} s/step, "
              f"bf16 {r['bf16']['seconds_per_step']:.3f} s/step ({r['bf16_speedup']}x); whole pretraining "
              f"{r['fp32']['pretrain_minutes']} vs {r['bf16']['pretrain_minutes']} min", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
