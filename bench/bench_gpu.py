"""The path a GPU user takes, measured on Qwen2-0.5B- and Qwen2-1.5B-shaped models; writes JSON.

    python bench/bench_gpu.py            # on a GPU: both shapes in bf16, about 6 minutes on an H200
    python bench/bench_gpu.py --quick    # a small Qwen2 shape on whatever is here (a test runs it on the CPU)

The models are built from their published configurations with random weights (no download), saved
as safetensors and loaded back by the library as any base is (on the GPU in bf16, by the automatic
placement). Per shape, side by side in one run:
  training     LoRA (the library's default targets) tokens/s through the product's training loop,
               and its MFU: model FLOPs per second over the device's bf16 peak, where a token costs
               4 N + 12 L T d FLOPs (N linear weights including the output head; the frozen base
               needs no weight gradients, so 2 N forward and 2 N backward; attention 12 L T d for
               L layers, T tokens per row, width d). Also against the bf16 matmul rate measured here.
  dropping     step time with knowledge dropping p_c = 0.2 against p_c = 0, LoRA on all linear layers
  exact match  one teacher-forced pass against greedy generate(), with the verdicts compared
  hot swap     20 adapters evaluated on the base loaded once against the base reloaded for each
  memory       peak GPU memory of each phase
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench_core import bench_dropping, bench_exact_match, bench_hot_swap
from transpeft.bases import BaseRef, load_base
from transpeft.data import Example, load_tasks
from transpeft.demo.tasks import build_demo_tasks
from transpeft.demo.tokenizer import demo_tokenizer
from transpeft.methods import MethodConfig, get_method
from transpeft.placement import placed
from transpeft.train import TrainConfig, train_loop

QWEN2 = {  # the published configurations' shapes (vocabulary 151 936, tied embeddings)
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}  # dense, by spec


def spec_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def matmul_peak(device: torch.device, n: int) -> float:
    """The bf16 matmul rate this device reaches on n x n matrices, TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(gib, 2)


def build(shape: str, directory: Path, tokenizer) -> None:
    """A Qwen2 of ``shape`` with random weights, built on the GPU when there is one, saved in bf16."""
    config = Qwen2Config(**QWEN2[shape], tie_word_embeddings=True, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def training_flops_per_token(model, seq: int) -> float:
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 4 * linear + 12 * config.num_hidden_layers * seq * config.hidden_size


def _sig(x: float) -> float:
    """Three significant figures: a tiny model on a CPU is well under 0.001 of a matmul peak, not 0."""
    return float(f"{x:.3g}")


def bench_training(base_dir: Path, seq: int, batch: int, steps: int, peaks: dict) -> dict:
    model, tokenizer, _ = load_base(BaseRef(str(base_dir)))
    device = model.device
    flops = training_flops_per_token(model, seq)
    rows = [Example(prompt="x" * (seq - 4), answer="ok") for _ in range(batch * 4)]  # seq tokens, no padding
    model = get_method("lora").attach(model, MethodConfig(r=16))
    train_loop(model, tokenizer, rows, TrainConfig(steps=2, batch_size=batch), progress=False)  # warm-up
    peak_memory_gib(device)
    result = train_loop(model, tokenizer, rows, TrainConfig(steps=steps, batch_size=batch), progress=False)
    achieved = result.tokens_per_second * flops / 1e12
    return {"placement": placed(model), "seq": seq, "batch": batch, "steps": steps,
            "tokens_per_s": round(result.tokens_per_second), "model_tflops_per_s": _sig(achieved),
            "mfu_vs_spec_peak": _sig(achieved / peaks["spec_tflops"]) if peaks["spec_tflops"] else None,
            "mfu_vs_measured_matmul": _sig(achieved / peaks["measured_matmul_tflops"]),
            "flops_per_token": flops, "peak_memory_gib": peak_memory_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, a few steps: checks the script")
    parser.add_argument("--shapes", default="qwen2-0.5b,qwen2-1.5b", help="comma-separated, of " + ", ".join(QWEN2))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = parser.parse_args()
    shapes = ["quick"] if args.quick else args.shapes.split(",")
    sizes = dict(seq=64, batch=4, steps=3, drop_steps=3, adapters=3, eval_rows=8, matmul=512) if args.quick else \
        dict(seq=1024, batch=8, steps=20, drop_steps=20, adapters=20, eval_rows=32, matmul=8192)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, spec = spec_peak(device)
    peaks = {"device": name, "spec_tflops": spec, "measured_matmul_tflops": _sig(matmul_peak(device, sizes["matmul"]))}
    print(f"{name}: bf16 peak {spec} TFLOP/s by spec, {peaks['measured_matmul_tflops']} measured", flush=True)
    tokenizer = demo_tokenizer()
    results = {"peaks": peaks, "torch": torch.__version__, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_demo_tasks(work / "data", n_train=256, n_eval=sizes["eval_rows"])
        tasks = load_tasks(work / "data", ["reverse"])
        for shape in shapes:
            base_dir = work / shape
            started = time.perf_counter()
            build(shape, base_dir, tokenizer)
            entry = {"build_s": round(time.perf_counter() - started, 1)}
            print(f"{shape}: training ...", flush=True)
            entry["training"] = bench_training(base_dir, sizes["seq"], sizes["batch"], sizes["steps"], peaks)
            print(f"{shape}: {entry['training']['tokens_per_s']} tokens/s, MFU {entry['training']['mfu_vs_spec_peak']}; "
                  "knowledge dropping ...", flush=True)
            entry["dropping"] = bench_dropping(base_dir, list(tasks[0].train), sizes["drop_steps"], sizes["batch"], 0.2)
            entry["dropping"]["peak_memory_gib"] = peak_memory_gib(device)
            print(f"{shape}: hot swap of {sizes['adapters']} adapters ...", flush=True)
            entry["hot_swap"] = bench_hot_swap(base_dir, tasks, work / f"{shape}-adapters", sizes["adapters"], 2)
            entry["hot_swap"]["peak_memory_gib"] = peak_memory_gib(device)
            print(f"{shape}: exact match ...", flush=True)
            entry["exact_match"] = bench_exact_match(base_dir, work / f"{shape}-adapters" / "adapter-0",
                                                     list(tasks[0].eval))
            entry["exact_match"]["peak_memory_gib"] = peak_memory_gib(device)
            results["shapes"][shape] = entry
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # what is done survives a timeout
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
