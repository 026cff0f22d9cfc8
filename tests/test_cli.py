"""The real `transpeft` command line, end to end on the test-profile demo family."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest

from transpeft.cli import build_parser, main

COMMANDS = [["bases", "build-demo"], ["bases", "fingerprint"], ["bases", "register"], ["bases", "list"],
            ["adapters", "list"], ["data", "build-demo"], ["data", "validate"], ["train"], ["evaluate"],
            ["transfer"], ["study"], ["story"], ["stack"]]


def cli(*args, check=True, timeout=600, executable=False):
    """`transpeft ARGS`: its exit code, stdout and stderr. In this process (each new interpreter costs
    seconds of imports), or with ``executable`` as the installed command, for the end-to-end test."""
    if executable:
        done = subprocess.run([sys.executable, "-m", "transpeft.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout)
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exited:  # argparse refusing a flag
                code = exited.code
        done = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and done.returncode != 0:
        raise AssertionError(f"transpeft {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--help"])
    assert exited.value.code == 0
    assert "example:\n  transpeft " + command[0] in capsys.readouterr().out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cli("bases", "build-demo", "--profile", "test", "--out", root / "bases", "--json")
    cli("data", "build-demo", "--out", root / "data", "--n-train", 32, "--n-eval", 8)
    return root


def test_train_evaluate_and_transfer(demo):
    trained = json.loads(cli("train", "--base", demo / "bases/v1", "--data", demo / "data", "--tasks", "reverse,sort",
                             "--steps", 3, "--batch-size", 8, "--p-c", 0.1, "--out", demo / "adapter", "--json",
                             executable=True).stdout)
    assert set(trained["metrics"]) == {"reverse", "sort"} and trained["base"].endswith("/v1")

    evaluated = json.loads(cli("evaluate", "--base", demo / "bases/v1", "--data", demo / "data", demo / "adapter",
                               "--json", executable=True).stdout)
    assert evaluated["results"][str(demo / "adapter")] == trained["metrics"]

    moved = json.loads(cli("transfer", demo / "adapter", "--from", demo / "bases/v1", "--to", demo / "bases/v2",
                           "--data", demo / "data", "--json").stdout)
    outcome = moved["adapters"][str(demo / "adapter")]
    assert outcome["old"] == {t: m["exact_match"] for t, m in trained["metrics"].items()}  # v1 scored again
    assert set(outcome["new"]) == set(outcome["zero_shot"]) == {"reverse", "sort"}
    assert outcome["decision"] == "flagged" and outcome["reasons"]  # params.yaml's gate; 3 steps do not pass it

    text = cli("transfer", demo / "adapter", "--to", demo / "bases/v2", "--data", demo / "data").stdout
    assert ": flagged (v1 -> bases/v2; old metric recorded at training)" in text and "retention" in text


def test_training_into_a_pipe_logs_a_few_readable_lines_not_progress_frames(demo, tmp_path):
    done = cli("train", "--base", demo / "bases/v1", "--data", demo / "data", "--tasks", "reverse", "--steps", 200,
               "--batch-size", 4, "--out", tmp_path / "adapter", executable=True)  # stderr is a pipe here
    log = done.stderr
    assert "\r" not in log and "Warning" not in log, log[:2000]
    lines = [line for line in log.splitlines() if line.startswith("train: ")]
    assert 10 <= len(lines) <= 11 + 20, log  # every 10 %, and at most one more per 10 s
    assert all(re.fullmatch(r"train: step \d+/200 \(\d+%\), loss \d+\.\d{3}, \d+\.\d step/s", line)
               for line in lines), lines
    assert lines[-1].startswith("train: step 200/200 (100%)")
    assert len(log) < 4000, log


def test_a_base_takes_its_family_from_family_json_and_a_bare_folder_must_be_given_one(demo, tmp_path):
    import shutil

    from transpeft.bases import BaseRef

    assert BaseRef(str(demo / "bases/v2")).resolved_family() == "bases"  # build-demo's default: the --out folder
    built = cli("bases", "build-demo", "--profile", "test", "--quick", "--out", tmp_path / "built", "--family",
                "acme", "--json", executable=True)
    assert "\r" not in built.stderr and "Writing model shards" not in built.stderr, built.stderr[:2000]  # no bars
    assert BaseRef(str(tmp_path / "built/v1")).resolved_family() == "acme"

    shutil.copytree(demo / "bases/v1", tmp_path / "models/v1")  # no family.json beside it
    done = cli("bases", "register", "--base", tmp_path / "models/v1", "--no-event", check=False)
    assert done.returncode == 2 and "which family is it? Give --base-family NAME" in done.stderr, done.stderr


def test_an_adapter_records_its_base_by_absolute_path_so_it_loads_quietly_from_any_folder(demo, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.chdir(demo)  # the base given relative to the working folder, as in a project
    cli("train", "--base", "bases/v1", "--data", "data", "--tasks", "reverse", "--steps", 1, "--out",
        tmp_path / "adapter", "--json")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((demo / "bases/v1").resolve())
    monkeypatch.chdir(tmp_path)
    done = cli("evaluate", "--base", demo / "bases/v1", "--data", demo / "data", tmp_path / "adapter", "--json",
               executable=True)
    assert "Could not find a config file" not in done.stderr, done.stderr


def test_dtype_bf16_runs_training_evaluation_and_transfer_on_bf16_weights(demo, tmp_path):
    common = ("--data", demo / "data", "--dtype", "bf16", "--device", "cpu", "--json")
    trained = json.loads(cli("train", "--base", demo / "bases/v1", "--tasks", "reverse", "--steps", 2,
                             "--batch-size", 4, "--out", tmp_path / "adapter", *common).stdout)
    evaluated = json.loads(cli("evaluate", "--base", demo / "bases/v1", tmp_path / "adapter", *common).stdout)
    moved = json.loads(cli("transfer", tmp_path / "adapter", "--from", demo / "bases/v1", "--to", demo / "bases/v2",
                           *common).stdout)
    assert trained["placement"] == evaluated["placement"] == moved["placement"] == "cpu bfloat16"
    assert json.loads(cli("evaluate", "--base", demo / "bases/v1", tmp_path / "adapter", "--data", demo / "data",
                          "--dtype", "fp32", "--json").stdout)["placement"] == "cpu float32"


def test_an_unknown_device_is_refused_by_name(demo, tmp_path):
    done = cli("evaluate", "--base", demo / "bases/v1", tmp_path, "--data", demo / "data", "--device", "tpu:0",
               check=False)
    assert done.returncode == 2 and "device 'tpu:0'" in done.stderr


def test_transfer_onto_an_incompatible_base_exits_3_naming_the_mismatch(demo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(demo / "bases/v1")
    other = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2))
    other.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    cli("train", "--base", demo / "bases/v1", "--data", demo / "data", "--tasks", "reverse", "--steps", 1,
        "--out", tmp_path / "adapter", "--json")
    done = cli("transfer", tmp_path / "adapter", "--to", tmp_path / "gpt2", "--data", demo / "data", "--json",
               check=False)
    assert done.returncode == 3
    outcome = json.loads(done.stdout)["adapters"][str(tmp_path / "adapter")]
    assert outcome["decision"] == "failed" and not outcome["new"]
    assert any(r.startswith(f"incompatible with {tmp_path.name}/gpt2: architecture:") for r in outcome["reasons"])


@pytest.mark.parametrize("args,message", [  # what only the data shows; bad flag values: the test below
    (["--tasks", "poetry"], "unknown task poetry"),
    (["--max-length", "6"], "training rows are longer than max_length 6 tokens"),
])
def test_bad_training_input_exits_2_with_a_clear_message(demo, tmp_path, args, message):
    done = cli("train", "--base", demo / "bases/v1", "--data", demo / "data", "--out", tmp_path / "a", *args,
               check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "a").exists()


TRAIN = ["train", "--base", "b", "--data", "d", "--out", "o"]


@pytest.mark.parametrize("args,message", [
    (["--p-c", "1.0"], "argument --p-c: must be in [0, 1), got 1.0"),
    (["--p-i", "-0.5"], "argument --p-i: must be in [0, 1), got -0.5"),
    (["--method", "prefix"], "argument --method: must be 'lora', 'dora', 'ia3' or 'bottleneck', got 'prefix'"),
    (["--too-long", "drop"], "argument --too-long: must be 'refuse' or 'truncate', got 'drop'"),
    (["--p-c", "1.5"], "argument --p-c: must be in [0, 1), got 1.5"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--lr", "fast"], "argument --lr: must be a valid number, unable to parse string as a number, got 'fast'"),
    (["--precision", "fp8"], "argument --precision: must be 'auto', 'fp32' or 'bf16', got 'fp8'"),
    (["--max-length", "1"], "argument --max-length: must be >= 2 tokens (or None), got 1"),
    (["--target-modules", ","], "argument --target-modules: is empty; leave it unset for the method's default"),
    (["--variant", "diagonal"], "argument --variant: must be 'serial' or 'parallel', got 'diagonal'"),
])
def test_a_bad_training_flag_exits_2_naming_the_flag_before_anything_loads(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*TRAIN, *args])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_flag_combination_names_its_flags(capsys):
    from transpeft.cli import main

    assert main([*TRAIN, "--method", "bottleneck", "--target-modules", "q_proj"]) == 2  # before loading the base
    assert ("error: --target-modules must be sub-layers attention and/or ffn for the bottleneck adapter, "
            "got ('q_proj',)") in capsys.readouterr().err


def test_training_flags_are_the_configs_fields_with_their_defaults():
    from dataclasses import asdict

    from transpeft.config import MethodConfig, TrainConfig, from_flags

    args = build_parser().parse_args(TRAIN)
    assert from_flags(MethodConfig, args, rename={"name": "method"}) == MethodConfig()
    assert from_flags(TrainConfig, args) == TrainConfig()
    args = build_parser().parse_args([*TRAIN, "--method", "dora", "--r", "8", "--alpha", "16", "--p-c", "0.1",
                                      "--target-modules", "q_proj, v_proj,", "--no-group-by-length", "--lr", "1",
                                      "--max-length", "64", "--gradient-checkpointing"])
    assert from_flags(MethodConfig, args, rename={"name": "method"}) == MethodConfig(
        name="dora", r=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    assert asdict(from_flags(TrainConfig, args)) == asdict(TrainConfig(
        p_c=0.1, group_by_length=False, lr=1.0, max_length=64, gradient_checkpointing=True))
    assert isinstance(from_flags(TrainConfig, args).lr, float)  # --lr 1 is 1.0, as with type=float


def test_missing_adapter_and_unpinned_hub_base_are_refused(demo, tmp_path):
    done = cli("evaluate", "--base", demo / "bases/v1", "--data", demo / "data", tmp_path / "nope", check=False)
    assert done.returncode == 2 and "no such folder" in done.stderr and "no such folder" not in done.stdout
    done = cli("transfer", tmp_path / "nope", "--to", demo / "bases/v2", "--data", demo / "data", check=False)
    assert done.returncode == 2 and "could not be carried" in done.stderr and "nope" not in done.stdout  # not 3
    done = cli("train", "--base", "Qwen/Qwen2-0.5B", "--data", demo / "data", "--out", tmp_path / "a", check=False)
    assert done.returncode == 2 and "pin a revision" in done.stderr


def test_empty_dataset_is_refused(demo, tmp_path):
    (tmp_path / "data/empty").mkdir(parents=True)
    (tmp_path / "data/empty/train.jsonl").write_text("")
    (tmp_path / "data/empty/eval.jsonl").write_text("")
    done = cli("data", "validate", tmp_path / "data", check=False)
    assert done.returncode == 2 and "train.jsonl: no rows" in done.stderr


def test_study_quick_builds_its_family_and_writes_every_output(tmp_path):
    """The study command on a self-built family, then run again: nothing rebuilt or retrained."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["study", "--params", root / "params.yaml", "--profile", "test", "--quick", "--bases", tmp_path / "bases",
            "--data", tmp_path / "data", "--out", tmp_path / "out", "--workdir", tmp_path / "work", "--workers", "1"]
    result = json.loads(cli(*args, "--json").stdout)
    family = json.loads((tmp_path / "bases" / "family.json").read_text())
    assert family["profile"] == "test" and family["quick"]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["arm"] for r in rows} >= {"ft_old", "direct", "transpeft", "ft_new"}
    assert set(result["table"]) == {"v1->v2", "v1->v3"}
    again = cli(*args)  # nothing rebuilt or retrained: the family and every job are reused
    assert "building the" not in again.stdout and "jobs already done" in again.stdout


def test_dockerfile_is_lint_clean_and_runs_the_readme_commands():
    """hadolint finds nothing, and the image does what the README says: make install, then make demo."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    linted = subprocess.run([str(Path(sys.executable).with_name("hadolint")), str(root / "Dockerfile")],
                            capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    dockerfile = (root / "Dockerfile").read_text()
    assert "RUN make install" in dockerfile and 'CMD ["make", "demo-and-serve"]' in dockerfile
    assert "make demo" in (root / "README.md").read_text()
    make = (root / "Makefile").read_text()
    assert "demo-and-serve: demo\n" in make and "demo: install\n" in make
