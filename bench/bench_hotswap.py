"""Hot swap where it matters: a base large enough that loading it costs seconds; writes JSON.

    python bench/bench_hotswap.py            # a 0.2 B-parameter Llama from config, about 3 minutes on 2 cores
    python bench/bench_hotswap.py --quick    # a small one, seconds

Ten LoRA adapters (a few training steps each: their values do not matter, their loading does) are
evaluated on the base loaded once, swapping adapters in place, and then with the base reloaded
from disk for each, as a script that loads base + adapter per request would. Side by side in one
run, with the scores checked identical. The base has random weights (no download) and is saved
like any model directory, in fp32 safetensors; its load time (file in the page cache, as on a
serving machine that loaded it before) is reported beside the time to evaluate one adapter.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench_core import bench_hot_swap, timed
from transpeft.bases import BaseRef, load_base
from transpeft.data import load_tasks
from transpeft.demo.tasks import build_demo_tasks
from transpeft.demo.tokenizer import demo_tokenizer

SHAPES = {  # hidden, FFN, layers, heads
    "large": (1024, 2816, 16, 16),  # 0.2 B parameters: Qwen2-0.5B's width, fewer layers
    "quick": (64, 128, 2, 4),
}


def random_llama(shape: str | tuple[int, int, int, int], tokenizer) -> LlamaForCausalLM:
    """A Llama of ``shape`` (a name in SHAPES, or hidden, FFN, layers, heads) with random weights (seed 0)
    over ``tokenizer``'s vocabulary."""
    hidden, ffn, layers, heads = SHAPES[shape] if isinstance(shape, str) else shape
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def random_base(directory: Path, shape: str) -> tuple[Path, int]:
    tokenizer = demo_tokenizer()
    model = random_llama(shape, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small base and 3 adapters: checks the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hotswap.json")
    args = parser.parse_args()
    shape, adapters, eval_rows = ("quick", 3, 8) if args.quick else ("large", 10, 32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        base_dir, parameters = random_base(work / "base", shape)
        print(f"base: {parameters / 1e6:.0f} M parameters, built in {time.perf_counter() - start:.0f} s", flush=True)
        build_demo_tasks(work / "data", n_train=64, n_eval=eval_rows)
        tasks = load_tasks(work / "data", ["reverse"])
        result = bench_hot_swap(base_dir, tasks, work, adapters, steps=2)
        loads = [timed(lambda: load_base(BaseRef(str(base_dir))))[1] for _ in range(3)]
        weights = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    per_adapter = result["hot_swap_s"] / adapters
    results = {"parameters": parameters, "weights_bytes": weights, "eval_rows": eval_rows,
               "torch_threads": torch.get_num_threads(), "hot_swap": result,
               "base_load_s": round(min(loads), 3), "evaluate_one_adapter_s": round(per_adapter, 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
