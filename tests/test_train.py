"""The one training loop: answer-only loss, schedule, reproducibility, NaN guard, atomic saves."""

from __future__ import annotations

import pytest
import torch

from conftest import base_info, char_tokenizer, copy_task, tiny_model
from transpeft import methods
from transpeft.adapters import read_manifest
from transpeft.batching import IGNORE, TooLong, collate, encode, fit_length, special_ids
from transpeft.data import Example, Task
from transpeft.methods import MethodConfig, get_method
from transpeft.train import GROUP_SPAN, TrainConfig, TrainingDiverged, _batches, train_adapter, train_loop


def run(tmp_path, name="a", **overrides):
    tok = char_tokenizer()
    base = tiny_model("llama")
    config = TrainConfig(**{"steps": 6, "batch_size": 8, "lr": 2e-2, **overrides})
    return train_adapter(base, tok, base_info(base, tok), [copy_task(32, 8)], MethodConfig(r=4), config,
                         tmp_path / name, progress=False)


def test_loss_covers_the_answer_and_eos_only():
    tok = char_tokenizer()
    enc = encode(tok, Example("copy ab >", "ab"))
    batch = collate([enc, encode(tok, Example("copy abcd >", "abcd"))], pad_id=tok.pad_token_id)
    scored = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert tok.decode(scored) == "ab" + tok.eos_token
    assert batch.labels[0, : enc.answer_start].eq(IGNORE).all()  # bos and prompt are not scored
    assert batch.labels[0, len(enc.ids):].eq(IGNORE).all()  # padding is not scored


def test_training_is_reproducible_and_learns(tmp_path):
    model_a, _, first = run(tmp_path, "a", steps=25)
    model_b, _, again = run(tmp_path, "b", steps=25)
    assert first.losses == again.losses
    assert all(torch.equal(a, b) for a, b in zip(get_method("lora").adapter_state(model_a).values(),
                                                 get_method("lora").adapter_state(model_b).values()))
    assert sum(first.losses[-5:]) < 0.8 * sum(first.losses[:5])
    _, _, other = run(tmp_path, "c", steps=25, seed=1)
    assert other.losses != first.losses


def test_warmup_then_cosine_schedule_and_gradient_accumulation(tmp_path, monkeypatch):
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    _, _, result = run(tmp_path, steps=10, warmup=0.2, lr=1e-2, grad_accum=2)
    assert len(result.losses) == 10 and len(seen) == 10  # one optimizer step per 2 micro-batches
    assert seen[0] == pytest.approx(0.0) and seen[1] == pytest.approx(5e-3) and seen[2] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(seen[2:], seen[3:]))  # cosine decay after warm-up


def test_nan_loss_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        run(tmp_path, "diverged", lr=1e30, steps=20)
    assert not any(tmp_path.iterdir())  # no adapter that looks trained, no partial folder


def test_a_crash_while_saving_keeps_the_previous_adapter(tmp_path, monkeypatch):
    run(tmp_path, "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    def crash(model, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setitem(methods.METHODS, "lora", methods.Method(**{**methods.METHODS["lora"].__dict__, "save": crash}))
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "adapter", seed=5)
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging leftovers


@pytest.mark.parametrize("field,value", [("p_i", 1.0), ("p_c", -0.1), ("p_c", 1.0), ("steps", 0), ("precision", "fp8")])
def test_bad_training_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_empty_training_set_is_refused():
    tok = char_tokenizer()
    model = get_method("lora").attach(tiny_model("llama"), MethodConfig(r=2))
    with pytest.raises(ValueError, match="dataset is empty"):
        train_loop(model, tok, [], TrainConfig(steps=1))


def test_a_model_without_an_adapter_is_refused():
    model = tiny_model("llama")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="attach a PEFT method first"):
        train_loop(model, char_tokenizer(), list(copy_task(8, 1).train), TrainConfig(steps=1))


DDP_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, {tests!r})
from accelerate import PartialState
from conftest import base_info, char_tokenizer, copy_task, tiny_model
from transpeft.methods import MethodConfig, get_method
from transpeft.train import TrainConfig, train_adapter

out, mode = sys.argv[1], sys.argv[2]
tok, model = char_tokenizer(), tiny_model()
if mode == "nan" and os.environ["RANK"] == "1":  # this process alone sees a NaN loss at step 3
    forward, calls = model.forward, []

    def poisoned(*args, **kwargs):
        result = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            result.loss = result.loss * float("nan")
        return result

    model.forward = poisoned
config = TrainConfig(steps=6, batch_size=8, lr=2e-2, warmup=0.3, p_c=0.3, p_i=0.1)
trained, _, result = train_adapter(model, tok, base_info(model, tok), [copy_task(32, 8)],
                                   MethodConfig(r=4, target_modules=("all-linear",)), config, out, progress=False)
weights = get_method("lora").adapter_state(trained)
digest = hashlib.sha256(b"".join(weights[k].detach().numpy().tobytes() for k in sorted(weights))).hexdigest()
state = PartialState()  # after training: the Accelerator set the process group up
with open(f"{{out}}.rank{{state.process_index}}", "w") as f:  # one file each: prints on one pipe interleave
    json.dump({{"rank": state.process_index, "processes": state.num_processes, "first_loss": result.losses[0],
               "learning_rates": result.learning_rates, "weights": digest}}, f)
"""


def torchrun(tmp_path, mode: str):
    """`accelerate launch --multi_gpu` on GPUs; here the same DDP path on the CPU (gloo) with torchrun."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    # The two talk over loopback, the agent's rendezvous included (--standalone, --local-addr): where the
    # host name resolves to no address (a container with no network) torchrun and gloo would otherwise
    # wait on it until the timeout.
    return subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--local-addr",
                           "127.0.0.1", "--nproc_per_node", "2", str(script), str(tmp_path / "adapter"), mode],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo"})


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    """Two processes train one adapter with knowledge dropping (p_c 0.3) and LoRA on every linear layer."""
    import json

    tmp = tmp_path_factory.mktemp("ddp")
    done = torchrun(tmp, "train")
    ranks = [json.loads(path.read_text()) for path in sorted(tmp.glob("adapter.rank*"))]
    return done, ranks, tmp / "adapter"


def test_data_parallel_training_with_knowledge_dropping_runs_and_saves_once(data_parallel):
    done, ranks, adapter = data_parallel
    assert done.returncode == 0, done.stderr[-3000:]  # no "parameters that were not used" from DDP
    assert [(r["rank"], r["processes"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["first_loss"] != ranks[1]["first_loss"]  # each process trained on its own batches
    assert read_manifest(adapter).training["steps"] == 6  # written once, by the main process


def test_data_parallel_learning_rate_follows_the_single_process_schedule(data_parallel, tmp_path):
    _, ranks, _ = data_parallel
    model = tiny_model()
    _, _, alone = train_adapter(model, char_tokenizer(), base_info(model, char_tokenizer()), [copy_task(32, 8)],
                                MethodConfig(r=4, target_modules=("all-linear",)),
                                TrainConfig(steps=6, batch_size=8, lr=2e-2, warmup=0.3, p_c=0.3, p_i=0.1),
                                tmp_path / "alone", progress=False)
    assert ranks and all(r["learning_rates"] == pytest.approx(alone.learning_rates, rel=1e-9) for r in ranks)
    assert alone.learning_rates[-1] < alone.learning_rates[2]  # the cosine decays to the end, once


def test_data_parallel_adapter_weights_are_identical_on_every_process(data_parallel):
    _, ranks, _ = data_parallel
    assert len(ranks) == 2 and ranks[0]["weights"] == ranks[1]["weights"]


def test_a_nan_on_one_process_stops_every_process_with_the_nan_error_and_saves_nothing(tmp_path):
    done = torchrun(tmp_path, "nan")
    assert done.returncode != 0
    assert done.stderr.count("TrainingDiverged") >= 2, done.stderr[-3000:]  # raised on both processes
    assert "loss became nan at step 3" in done.stderr and "NaN or infinite on another process" in done.stderr
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.glob("adapter.rank*"))


def test_concurrent_trainings_in_threads_are_bit_identical_run_to_run(tmp_path):
    """The Prefect fan-out trains adapters in threads of one process: the same seeds must give the same
    weights whatever the interleaving (initialisation, adapter and base dropout, regularisers)."""
    from concurrent.futures import ThreadPoolExecutor

    import copy

    tok = char_tokenizer()
    task = copy_task(32, 8)
    bases = {"llama": tiny_model("llama"), "gpt2": tiny_model("gpt2")}  # GPT-2 keeps nn.Dropout (p = 0.1) layers

    def train(name: str, seed: int, arch: str):
        base = copy.deepcopy(bases[arch])  # loaded bases, as the flows lend them: no draws of their own
        config = TrainConfig(steps=8, batch_size=8, lr=2e-2, p_c=0.3, p_i=0.1, seed=seed)
        model, _, result = train_adapter(base, tok, base_info(base, tok), [task], MethodConfig(r=4, dropout=0.2),
                                         config, tmp_path / name, progress=False)
        return result.losses, {k: v.clone() for k, v in get_method("lora").adapter_state(model).items()}

    def round_of(tag: str):
        with ThreadPoolExecutor(max_workers=2) as pool:
            jobs = [pool.submit(train, f"{tag}-{i}", seed, arch) for i, (seed, arch) in enumerate([(0, "llama"), (1, "gpt2")])]
            return [job.result() for job in jobs]

    first, second = round_of("a"), round_of("b")
    for (losses_a, weights_a), (losses_b, weights_b) in zip(first, second):
        assert losses_a == losses_b
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert first[0][0] != first[1][0]  # two different trainings, not one repeated


def test_private_dropout_is_put_back_after_training(tmp_path):
    base = tiny_model("gpt2")
    before = [type(m) for m in base.modules()]
    run_model, _, _ = train_adapter(base, char_tokenizer(), base_info(base, char_tokenizer()), [copy_task(16, 4)],
                                    MethodConfig(r=4, dropout=0.1), TrainConfig(steps=2, batch_size=4),
                                    tmp_path / "a", progress=False)
    from transpeft.seeding import PrivateDropout

    assert not any(isinstance(m, PrivateDropout) for m in run_model.modules())
    assert sum(type(m) is torch.nn.Dropout for m in run_model.get_base_model().modules()) > before.count(torch.nn.Dropout)


def test_attention_dropout_is_reproducible_while_other_threads_seed_and_draw(tmp_path):
    """GPT-2's attention dropout is a float handed to the attention kernel, which draws from the global
    generator: a thread seeding and drawing from it meanwhile (another adapter's initialisation) must
    not change the training."""
    import copy
    import threading

    from transpeft.seeding import functional_dropout, seeded

    tok, task, gpt2 = char_tokenizer(), copy_task(32, 8), tiny_model("gpt2")
    assert "attn_pdrop" in functional_dropout(gpt2) and not functional_dropout(tiny_model("llama"))

    def train(name: str):
        base = copy.deepcopy(gpt2)  # a loaded base, as the flows lend them: no draws of its own
        _, _, result = train_adapter(base, tok, base_info(base, tok), [task], MethodConfig(r=4),
                                     TrainConfig(steps=6, batch_size=8, lr=2e-2, seed=3), tmp_path / name,
                                     progress=False)
        return result.losses

    alone = train("alone")
    stop = threading.Event()

    def meddle():
        while not stop.is_set():
            with seeded(12345):
                torch.rand(64)

    meddler = threading.Thread(target=meddle)
    meddler.start()
    try:
        disturbed = train("disturbed")
    finally:
        stop.set()
        meddler.join()
    assert disturbed == alone


def test_training_with_gradient_checkpointing_ends_where_training_without_it_does(tmp_path):
    def train(name: str, checkpointing: bool):
        model = tiny_model()
        config = TrainConfig(steps=5, batch_size=8, lr=2e-2, p_c=0.3, p_i=0.1, gradient_checkpointing=checkpointing)
        trained, _, result = train_adapter(model, char_tokenizer(), base_info(model, char_tokenizer()),
                                           [copy_task(32, 8)], MethodConfig(r=4, dropout=0.1), config,
                                           tmp_path / name, progress=False)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in trained.modules())  # switched off after
        return result.losses, get_method("lora").adapter_state(trained)

    (losses, weights), (losses_ckpt, weights_ckpt) = train("plain", False), train("checkpointed", True)
    assert losses == pytest.approx(losses_ckpt, rel=1e-5)
    assert all(torch.allclose(weights[k], weights_ckpt[k], atol=1e-6) for k in weights)


def test_trainings_in_other_precisions_follow_each_other_in_one_process(tmp_path):
    """A worker trains adapters one after another: fp32, then bf16 autocast, then fp32 again."""
    def train(name: str, precision: str):
        model = tiny_model()
        _, _, result = train_adapter(model, char_tokenizer(), base_info(model, char_tokenizer()), [copy_task(32, 8)],
                                     MethodConfig(r=4), TrainConfig(steps=3, batch_size=8, precision=precision),
                                     tmp_path / name, progress=False)
        return result.losses

    first, autocast, again = train("a", "fp32"), train("b", "bf16"), train("c", "fp32")
    assert first == again and autocast != first  # bf16 really ran, and left nothing behind


# -- long inputs ----------------------------------------------------------------------------------

def mixed_lengths(n: int = 96) -> list[Example]:
    """Prompts of 1 to 40 characters: batches drawn at random pad most rows to the longest."""
    rng = torch.Generator().manual_seed(0)
    return [Example(prompt="a" * int(torch.randint(1, 41, (1,), generator=rng)), answer="b") for _ in range(n)]


def test_over_long_rows_are_refused_with_their_count():
    tokenizer, model = char_tokenizer(), get_method("lora").attach(tiny_model(), MethodConfig(r=4))
    examples = mixed_lengths()
    over = sum(len(encode(tokenizer, ex).ids) > 20 for ex in examples)
    with pytest.raises(TooLong, match=f"^{over} of 96 training rows are longer than max_length 20 tokens"):
        train_loop(model, tokenizer, examples, TrainConfig(steps=1, batch_size=8, max_length=20), progress=False)


def test_truncation_keeps_the_answer_and_is_counted(tmp_path):
    tokenizer = char_tokenizer()
    examples = mixed_lengths()
    encoded, cut = fit_length([encode(tokenizer, ex) for ex in examples], examples, 20, "truncate")
    assert cut == sum(len(encode(tokenizer, ex).ids) > 20 for ex in examples) > 0
    for ex, e in zip(examples, encoded):
        full = encode(tokenizer, ex)
        assert len(e.ids) == min(len(full.ids), 20) and e.ids[0] == full.ids[0]  # bos kept
        assert e.ids[e.answer_start:] == full.ids[full.answer_start:]  # answer and eos whole
    task = Task("long", "manipulation", "long prompts", tuple(examples), tuple(examples[:8]), "sha256:test")
    model = tiny_model()
    _, manifest, result = train_adapter(model, tokenizer, base_info(model, tokenizer), [task], MethodConfig(r=4),
                                        TrainConfig(steps=2, batch_size=8, max_length=20, too_long="truncate"),
                                        tmp_path / "a", progress=False)
    assert result.truncated == manifest.training["truncated_rows"] == cut


def test_grouping_by_length_cuts_padding_and_keeps_every_row_once_per_epoch():
    tokenizer = char_tokenizer()
    encoded = [encode(tokenizer, ex) for ex in mixed_lengths(8 * GROUP_SPAN)]
    _, _, pad = special_ids(tokenizer)

    def epoch(grouped):
        batches = _batches(encoded, 8, pad, seed=0, group_by_length=grouped)
        return [next(batches) for _ in range(GROUP_SPAN)]

    def padding(batches):
        return sum(int((b.attention_mask == 0).sum()) for b in batches)

    grouped, shuffled = epoch(True), epoch(False)
    assert padding(grouped) < padding(shuffled) / 4
    rows = lambda batches: sorted(tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b.input_ids, b.attention_mask))  # noqa: E731
    assert rows(grouped) == rows(shuffled)  # the same rows, each once
    assert [b.input_ids.shape[1] for b in grouped] != sorted(b.input_ids.shape[1] for b in grouped)  # order random
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(grouped, epoch(True)))  # seeded
