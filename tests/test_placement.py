"""Where bases load and in what dtype: the automatic choice, the overrides, and a fingerprint that
does not depend on either."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from transpeft import placement as placement_module
from transpeft.bases import BaseLender, BaseRef, describe_base, lend_base, load_base
from transpeft.params import ParamsError, load_params
from transpeft.placement import CPU_BF16_MIN_HIDDEN, Placement, PlacementError, placed

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base") / "v1"
    tiny_model("llama").save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kernels, hidden, expected", [
    (True, CPU_BF16_MIN_HIDDEN, torch.bfloat16),
    (True, CPU_BF16_MIN_HIDDEN - 1, torch.float32),
    (False, 4096, torch.float32),
])
def test_auto_on_the_cpu_is_bf16_only_for_wide_bases_with_bf16_kernels(monkeypatch, kernels, hidden, expected):
    monkeypatch.setattr(placement_module, "cpu_bf16_kernels", lambda: kernels)
    assert Placement().torch_dtype(torch.device("cpu"), hidden) == expected


def test_auto_on_a_gpu_is_bf16_and_an_explicit_dtype_wins_everywhere():
    assert Placement().torch_dtype(torch.device("cuda"), 64) == torch.bfloat16
    assert Placement(dtype="fp32").torch_dtype(torch.device("cuda"), 4096) == torch.float32
    assert Placement(dtype="bfloat16").torch_dtype(torch.device("cpu"), 64) == torch.bfloat16


def test_the_cpu_threshold_is_the_measured_crossover():
    """CPU_BF16_MIN_HIDDEN is the width bench/bench_precision.py found bf16 faster from."""
    measured = json.loads((ROOT / "bench/results/precision.json").read_text())
    assert measured["bf16_from_hidden"] == CPU_BF16_MIN_HIDDEN


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float16"}, "dtype 'float16': use auto, float32"),
    ({"device": "gpu"}, "device 'gpu': use auto, cpu, cuda"),
])
def test_bad_values_are_refused_naming_them(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        Placement(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_so_before_loading_anything(saved_base):
    with pytest.raises(PlacementError, match="no CUDA GPU"):
        load_base(BaseRef(str(saved_base)), Placement(device="cuda"))


def test_bases_loaded_by_threads_at_once_leave_the_default_dtype_and_a_new_adapter_alone(saved_base):
    """transformers sets torch's process-wide default dtype while it builds a model: without one load at a
    time, two bf16 loads at once can leave it bf16, and a LoRA layer made meanwhile is made bf16."""
    from peft import LoraConfig, get_peft_model

    from transpeft.bases import BUILDING

    ref = BaseRef(str(saved_base), family="tiny", version="v1")

    def make_lora() -> torch.dtype:
        with BUILDING:  # as transfer.load_adapter and train_adapter make adapters
            adapted = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
        return next(p.dtype for n, p in adapted.named_parameters() if "lora_A" in n)

    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            loads = [pool.submit(load_base, ref, Placement("cpu", "bf16")) for _ in range(3)]
            lora = pool.submit(make_lora)
            assert all(next(f.result()[0].parameters()).dtype == torch.bfloat16 for f in loads)
            assert lora.result() == torch.float32
        assert torch.get_default_dtype() == torch.float32


def test_a_base_described_while_another_loads_waits_its_turn(saved_base):
    """describe_base builds the base's skeleton with from_config, which sets the default dtype to the
    config's and back: beside a bf16 load that was still under way, it once left the process bf16 (one
    CI run in several). So it waits for whatever holds BUILDING, as a load does."""
    from transpeft.bases import BUILDING

    with ThreadPoolExecutor(1) as pool:
        with BUILDING:  # a load under way in this thread
            torch.set_default_dtype(torch.bfloat16)
            described = pool.submit(describe_base, BaseRef(str(saved_base)))
            time.sleep(2)  # describing the tiny base takes a fraction of that
            done_meanwhile = described.done()
            torch.set_default_dtype(torch.float32)
        described.result()
    assert not done_meanwhile
    assert torch.get_default_dtype() == torch.float32


def test_bf16_loads_bf16_weights_under_the_same_fingerprint(saved_base):
    fp32, _, info32 = load_base(BaseRef(str(saved_base)), Placement(device="cpu", dtype="fp32"))
    bf16, _, info16 = load_base(BaseRef(str(saved_base)), Placement(device="cpu", dtype="bf16"))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert placed(bf16) == "cpu bfloat16" and placed(fp32) == "cpu float32"
    assert info16 == info32 == describe_base(BaseRef(str(saved_base)))[2]


def test_a_changed_weight_file_changes_the_fingerprint(saved_base, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1
    model.save_pretrained(tmp_path / "v1")
    char_tokenizer().save_pretrained(tmp_path / "v1")
    assert describe_base(BaseRef(str(tmp_path / "v1")))[2].fingerprint != \
        describe_base(BaseRef(str(saved_base)))[2].fingerprint


def test_the_lender_keeps_one_pool_per_placement(saved_base):
    ref = BaseRef(str(saved_base))
    with lend_base(ref, placement=Placement(dtype="bf16")) as slot:
        assert placed(slot.model) == "cpu bfloat16"
    with lend_base(ref, placement=Placement(dtype="fp32")) as slot:
        assert placed(slot.model) == "cpu float32"


def test_a_limited_lender_lends_that_many_at_once_and_a_failed_borrower_frees_its_slot(saved_base):
    """What lets the flow's pool have more threads than compute slots: the extra borrowers wait."""
    ref, lender = BaseRef(str(saved_base)), BaseLender()
    lender.limit(2)
    lent, most, guard = [0], [0], threading.Lock()

    def borrow(fail: bool) -> None:
        with lender.borrow(ref):
            with guard:
                lent[0] += 1
                most[0] = max(most[0], lent[0])
            time.sleep(0.2)
            with guard:
                lent[0] -= 1
            if fail:
                raise RuntimeError("a crash inside the borrow")

    with ThreadPoolExecutor(6) as pool:
        done = [pool.submit(borrow, i % 2 == 0) for i in range(6)]
        failed = sum(isinstance(f.exception(), RuntimeError) for f in done)
    assert (most[0], failed) == (2, 3)
    with lender.borrow(ref), lender.borrow(ref):  # the failed ones gave their slots back
        pass


def test_params_yaml_placement_is_read_and_checked(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    assert load_params(ROOT / "params.yaml").placement == Placement()  # the committed default: auto, auto
    path = tmp_path / "params.yaml"
    path.write_text(text + "\nplacement: {device: cpu, dtype: bf16}\n")
    assert load_params(path).placement == Placement("cpu", "bf16")
    path.write_text(text + "\nplacement: {dtype: half}\n")
    with pytest.raises(ParamsError, match="params.yaml: placement: dtype 'half'"):
        load_params(path)


def test_the_demo_family_stays_fp32_on_the_cpu(monkeypatch):
    """Narrower than the crossover: the committed demo results are fp32 results on any CPU."""
    from transpeft.demo.family import PROFILES

    monkeypatch.setattr(placement_module, "cpu_bf16_kernels", lambda: True)
    assert Placement().torch_dtype(torch.device("cpu"), PROFILES["demo"].hidden) == torch.float32
