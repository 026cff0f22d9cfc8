"""Length-grouped batches against shuffled ones on a mixed-length task: LoRA training tokens/s; writes JSON.

    python bench/bench_padding.py            # a 6-layer, 256-wide Llama from config, about 3 minutes on 2 cores
    python bench/bench_padding.py --quick    # a small one, seconds

The task's prompts are 8 to 200 characters long (uniform), so a batch drawn at random is padded to
its longest row, about twice its mean. The same training (seed, steps, batch size) runs with
``group_by_length`` off and on, in alternation after one warm-up each; reported: real (non-padding)
tokens per second, the share of computed tokens that were padding, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import string
from pathlib import Path

import torch

from bench_hotswap import random_llama
from transpeft.data import Example
from transpeft.demo.tokenizer import demo_tokenizer
from transpeft.methods import MethodConfig, get_method
from transpeft.train import TrainConfig, train_loop

SHAPES = {"large": (256, 704, 6, 4), "quick": (64, 128, 2, 4)}


def mixed_length_task(n: int, longest: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(prompt="".join(rng.choices(string.ascii_lowercase, k=rng.randint(8, longest))), answer="ok")
            for _ in range(n)]


def run(base, tokenizer, examples, grouped: bool, steps: int, batch: int) -> dict:
    model = get_method("lora").attach(copy.deepcopy(base), MethodConfig(r=16))
    result = train_loop(model, tokenizer, examples, TrainConfig(steps=steps, batch_size=batch, group_by_length=grouped),
                        progress=False)
    return {"tokens_per_s": result.tokens / result.seconds, "padding": result.padded / (result.padded + result.tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model, a few steps: checks the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "padding.json")
    args = parser.parse_args()
    shape, steps, batch, repeats, longest = ("quick", 3, 8, 1, 60) if args.quick else ("large", 30, 16, 3, 200)
    tokenizer = demo_tokenizer()
    base = random_llama(SHAPES[shape], tokenizer)
    examples = mixed_length_task(32 * batch, longest)
    for grouped in (False, True):  # warm-up
        run(base, tokenizer, examples, grouped, 2, batch)
    runs: dict[str, list[dict]] = {"shuffled": [], "grouped": []}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(run(base, tokenizer, examples, name == "grouped", steps, batch))
            print(f"{name}: {runs[name][-1]['tokens_per_s']:.0f} tokens/s, "
                  f"{100 * runs[name][-1]['padding']:.0f} % padding", flush=True)
    summary = {name: {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs)),
                      "padding_share": round(statistics.median(r["padding"] for r in rs), 3),
                      "tokens_per_s_runs": [round(r["tokens_per_s"]) for r in rs]} for name, rs in runs.items()}
    results = {"parameters": sum(p.numel() for p in base.parameters()), "torch_threads": torch.get_num_threads(),
               "prompt_chars": [8, longest], "batch": batch, "steps": steps, "repeats": repeats, **summary,
               "grouped_speedup": round(summary["grouped"]["tokens_per_s"] / summary["shuffled"]["tokens_per_s"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
