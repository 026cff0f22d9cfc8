"""Core benchmarks, measured side by side in one run; writes JSON (default bench/results/core.json).

    python bench/bench_core.py                      # random base of the demo shape, under a minute on 2 CPU cores
    python bench/bench_core.py --base demo/bases/v1 # a real base: a demo version, or any model directory
    python bench/bench_core.py --quick              # seconds, to check the script itself

Measures:
  1. hot swap: 10 adapters evaluated on one base loaded once vs reloading the base for each
  2. exact match by one teacher-forced pass vs greedy generate()
  3. training step time with knowledge dropping p_c = 0.5 vs p_c = 0 (dropping skips FFN compute)
  4. our training loop vs the transformers Trainer with peft, same model, batch and steps (tokens/s)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from transpeft.bases import BaseRef, load_base
from transpeft.batching import collate, encode, special_ids
from transpeft.data import load_tasks
from transpeft.demo.family import PROFILES, model_config
from transpeft.demo.tasks import build_demo_tasks
from transpeft.demo.tokenizer import demo_tokenizer
from transpeft.evaluate import exact_match_flags, generate_flags
from transpeft.methods import MethodConfig
from transpeft.train import TrainConfig, train_adapter, train_loop
from transpeft.transfer import evaluate_adapters, load_adapter


def random_demo_base(directory: Path) -> Path:
    """A randomly initialised Llama of the demo family's shape, saved like any model directory."""
    tokenizer = demo_tokenizer()
    torch.manual_seed(0)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(model_config(PROFILES["demo"], len(tokenizer), bos, eos, pad))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_hot_swap(base_dir: Path, tasks, work: Path, n_adapters: int, steps: int) -> dict:
    model, tokenizer, base = load_base(BaseRef(str(base_dir)))
    adapters = []
    for i in range(n_adapters):
        out = work / f"adapter-{i}"
        trained, _, _ = train_adapter(model, tokenizer, base, tasks, MethodConfig(r=8),
                                      TrainConfig(steps=steps, batch_size=8, seed=i), out, progress=False)
        model = trained.unload()
        adapters.append(out)

    shared, hot = timed(lambda: evaluate_adapters(load_base(BaseRef(str(base_dir)))[0], tokenizer, base, adapters,
                                                  tasks))

    def reload_each():
        scores = {}
        for directory in adapters:
            fresh, _, info = load_base(BaseRef(str(base_dir)))
            scores.update(evaluate_adapters(fresh, tokenizer, info, [directory], tasks))
        return scores

    separate, cold = timed(reload_each)
    assert shared == separate, "hot swap must score exactly as separate loads"
    return {"adapters": n_adapters, "hot_swap_s": round(hot, 3), "reload_each_s": round(cold, 3),
            "speedup": round(cold / hot, 2), "identical_scores": shared == separate}


def bench_exact_match(base_dir: Path, adapter: Path, examples) -> dict:
    model, tokenizer, base = load_base(BaseRef(str(base_dir)))
    model = load_adapter(model, base, adapter)
    forced, t_forced = timed(lambda: exact_match_flags(model, tokenizer, examples))
    generated, t_generate = timed(lambda: generate_flags(model, tokenizer, examples))
    return {"examples": len(examples), "teacher_forced_s": round(t_forced, 3), "generate_s": round(t_generate, 3),
            "speedup": round(t_generate / t_forced, 2), "same_verdicts": forced == generated}


def bench_dropping(base_dir: Path, examples, steps: int, batch_size: int, p_c: float = 0.5) -> dict:
    def step_time(p_c):
        model, tokenizer, _ = load_base(BaseRef(str(base_dir)))
        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
        result = train_loop(model, tokenizer, examples, TrainConfig(steps=steps, batch_size=batch_size, p_c=p_c),
                            progress=False)
        return result.seconds / steps

    train_loop_warmup = step_time(0.0)  # first run pays one-off costs (allocator, kernels)
    plain, dropping = step_time(0.0), step_time(p_c)
    return {"steps": steps, "batch_size": batch_size, "step_s_p_c_0": round(plain, 4),
            f"step_s_p_c_{p_c}": round(dropping, 4), "speedup": round(plain / dropping, 3),
            "warmup_step_s": round(train_loop_warmup, 4)}


def bench_trainer(base_dir: Path, examples, steps: int, batch_size: int, work: Path) -> dict:
    model, tokenizer, _ = load_base(BaseRef(str(base_dir)))
    ours = train_loop(get_peft_model(model, LoraConfig(r=16, target_modules="all-linear")), tokenizer, examples,
                      TrainConfig(steps=steps, batch_size=batch_size, warmup=0.0), progress=False)

    model, tokenizer, _ = load_base(BaseRef(str(base_dir)))
    _, _, pad = special_ids(tokenizer)
    encoded = [encode(tokenizer, ex) for ex in examples]

    tokens = []

    def collator(rows):
        tokens.append(sum(len(r.ids) for r in rows))
        batch = collate(rows, pad)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}

    args = TrainingArguments(output_dir=str(work / "trainer"), per_device_train_batch_size=batch_size,
                             max_steps=steps, learning_rate=3e-3, lr_scheduler_type="cosine", report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=not torch.cuda.is_available(),
                             dataloader_drop_last=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=get_peft_model(model, LoraConfig(r=16, target_modules="all-linear")), args=args,
                      train_dataset=encoded, data_collator=collator)
    _, seconds = timed(trainer.train)
    theirs = sum(tokens[:steps]) / seconds
    return {"steps": steps, "batch_size": batch_size, "ours_tokens_per_s": round(ours.tokens_per_second),
            "trainer_tokens_per_s": round(theirs), "ratio": round(ours.tokens_per_second / theirs, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="model directory (default: a random base of the demo shape)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/core.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = parser.parse_args()
    sizes = dict(adapters=3, adapter_steps=2, eval_rows=8, train_steps=3, batch=4) if args.quick else \
        dict(adapters=10, adapter_steps=10, eval_rows=64, train_steps=30, batch=32)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_dir = args.base or random_demo_base(work / "base")
        build_demo_tasks(work / "data", n_train=256, n_eval=sizes["eval_rows"])
        tasks = load_tasks(work / "data", ["reverse"])
        examples = list(tasks[0].train)
        results = {"base": str(args.base or "random demo-shaped Llama"), "torch_threads": torch.get_num_threads(),
                   "device": "cuda" if torch.cuda.is_available() else platform.processor() or "cpu"}
        print("hot swap ...", flush=True)
        results["hot_swap"] = bench_hot_swap(base_dir, tasks, work, sizes["adapters"], sizes["adapter_steps"])
        print("exact match ...", flush=True)
        results["exact_match"] = bench_exact_match(base_dir, work / "adapter-0", list(tasks[0].eval))
        print("knowledge dropping ...", flush=True)
        results["dropping"] = bench_dropping(base_dir, examples, sizes["train_steps"], sizes["batch"])
        print("training loop vs Trainer ...", flush=True)
        results["trainer"] = bench_trainer(base_dir, examples, sizes["train_steps"], sizes["batch"], work)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
