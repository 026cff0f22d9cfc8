"""The benchmarks run end to end (at their --quick sizes) and write the JSON the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def quick(script: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_core_benchmark_writes_every_comparison(tmp_path):
    assert {"hot_swap", "exact_match", "dropping", "trainer"} <= set(quick("bench_core.py", tmp_path / "core.json"))


def test_pretrain_benchmark_times_both_precisions_through_the_family_build(tmp_path):
    shape = quick("bench_pretrain.py", tmp_path / "pretrain.json")["shapes"]["test"]
    assert shape["fp32"]["seconds_per_step"] > 0 and shape["bf16"]["seconds_per_step"] > 0
    assert shape["bf16_speedup"] == pytest.approx(shape["fp32"]["seconds_per_step"] / shape["bf16"]["seconds_per_step"],
                                                  abs=0.01)


def test_hot_swap_benchmark_scores_identically_both_ways(tmp_path):
    result = quick("bench_hotswap.py", tmp_path / "hotswap.json")
    assert result["hot_swap"]["identical_scores"] and result["hot_swap"]["adapters"] == 3


def test_precision_benchmark_times_every_mode_against_fp32(tmp_path):
    result = quick("bench_precision.py", tmp_path / "precision.json")
    modes = result["shapes"]["quick"]["modes"]
    assert set(modes) == {"fp32", "bf16-autocast", "bf16"} and modes["fp32"]["train_speedup_vs_fp32"] == 1.0
    assert "bf16_from_hidden" in result and isinstance(result["cpu_bf16"], bool)


def test_padding_benchmark_measures_both_batchings_on_the_same_rows(tmp_path):
    result = quick("bench_padding.py", tmp_path / "padding.json")
    assert result["grouped"]["padding_share"] < result["shuffled"]["padding_share"]
    assert result["grouped_speedup"] == pytest.approx(
        result["grouped"]["tokens_per_s"] / result["shuffled"]["tokens_per_s"], abs=0.01)


def test_gpu_benchmark_runs_its_quick_shape_here(tmp_path):
    result = quick("bench_gpu.py", tmp_path / "gpu.json")
    shape = result["shapes"]["quick"]
    assert shape["training"]["tokens_per_s"] > 0 and shape["training"]["mfu_vs_measured_matmul"] > 0
    assert shape["hot_swap"]["identical_scores"] and shape["exact_match"]["same_verdicts"]
    assert "step_s_p_c_0.2" in shape["dropping"]


def test_batched_evaluation_benchmark_scores_alike_every_way(tmp_path):
    result = quick("bench_batched_eval.py", tmp_path / "batched_eval.json")
    for base in result["bases"].values():
        assert set(base["seconds_min_of_repeats"]) == {"one at a time", "merged", "shared batches"}
        assert base["adapters_whose_exact_match_differs"]["shared batches"] == 0
