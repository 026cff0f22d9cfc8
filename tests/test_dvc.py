"""`dvc repro` of the project's own dvc.yaml in a fresh git repo, on the test profile; remotes; lineage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from servers import start_moto_s3

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cwd: Path, *args, check=True, env=None):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **(env or {})}
    done = subprocess.run(list(map(str, args)), cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def set_params(project: Path, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server):
    """The project's pipeline files in a new git + DVC repo, on the test profile."""
    project = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", "datasets"):
        source = ROOT / name
        shutil.copytree(source, project / name) if source.is_dir() else shutil.copy(source, project / name)
    shutil.copytree(ROOT / "transpeft", project / "transpeft", ignore=shutil.ignore_patterns("__pycache__"))
    set_params(project, **{"prepare.n_train": 48, "prepare.n_eval": 8, "bases.profile": "test",
                           "train.tasks": ["reverse", "add"], "train.schedule.steps": 2,
                           "train.schedule.batch_size": 8, "tracking.uri": mlflow_server.url,
                           # two runs of the grid, not four: each train stage is a process of its own
                           "train.runs": {"plain-v1": {"base": "v1", "p_c": 0.0, "p_i": 0.0},
                                          "transpeft-v1": {"base": "v1", "p_c": 0.0, "p_i": 0.05}},
                           "study.tasks": ["reverse", "add"], "study.seeds": [0, 1],
                           "study.grid": [["qkvo", 0.0, 0.0], ["qkvo", 0.3, 0.0]],
                           "study.targets": {"qkvo": ["q_proj", "v_proj"]}, "study.steps": 2,
                           "study.batch_size": 8, "study.retune_steps": [2], "study.workers": 1,
                           "study.strategy_steps": 2, "study.prompts_per_task": 4})
    run(project, "git", "init", "-q")
    run(project, "dvc", "init", "-q")
    run(project, "dvc", "remote", "add", "-d", "local", str(tmp_path_factory.mktemp("remote")))
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline")
    return project


@pytest.fixture(scope="module")
def first_repro(project) -> str:
    return run(project, "dvc", "repro").stdout


def test_repro_runs_every_stage_and_prints_the_transfer_table(project, first_repro):
    for stage in ("prepare@reverse", "prepare@add", "bases", "train@reverse-plain-v1", "train@add-transpeft-v1", "transfer", "report"):
        assert f"Running stage '{stage}'" in first_repro
    table = run(project, "dvc", "metrics", "show").stdout
    assert "pipeline/metrics/transpeft-v1/reverse.json" in table
    header = table.splitlines()[0].split()
    assert header[-3:] == ["v1", "v2", "v3"]
    html = run(project, "dvc", "plots", "show", "-o", project / "plots").stdout
    assert "index.html" in html and "transfer_heatmap.png" in (project / "plots/index.html").read_text()


def test_repro_runs_the_study_its_metrics_plots_and_mlflow_run(project, first_repro, mlflow_server):
    assert "Running stage 'study'" in first_repro
    rows = json.loads((project / "study/results.json").read_text())
    assert {r["arm"] for r in rows} == {"ft_old", "direct", "transpeft", "ft_new", "retune@2", "strategy:scaled",
                                       "strategy:distill", "strategy:distill-synthetic", "strategy:retune"}
    metrics = run(project, "dvc", "metrics", "show", "study/summary.json").stdout
    assert "table.v1->v2.reverse.gap_closed.mean" in metrics or "gap_closed" in metrics
    run(project, "dvc", "plots", "show", "-o", project / "study-plots")
    page = (project / "study-plots/index.html").read_text()
    assert all(name in page for name in ("gap_closed.png", "grid.png", "retune.png"))
    client = MlflowClient(mlflow_server.url)
    [study] = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert study.data.params["chosen.p_c"] == "0.3"
    assert "transpeft.reverse.v1_to_v2" in study.data.metrics
    assert {f.path for f in client.list_artifacts(study.info.run_id, "study")} >= {"study/results.json", "study/summary.json"}


def test_second_repro_does_nothing_and_p_c_reruns_only_what_depends_on_it(project, first_repro):
    assert "Data and pipelines are up to date" in run(project, "dvc", "repro").stdout
    set_params(project, **{"train.runs.transpeft-v1.p_c": 0.2})
    rerun = run(project, "dvc", "repro").stdout
    ran = sorted(line.split("'")[1] for line in rerun.splitlines() if line.startswith("Running stage"))
    # report re-runs only if the new scores differ; nothing else may run at all
    assert [r for r in ran if r != "report"] == ["train@add-transpeft-v1", "train@reverse-transpeft-v1", "transfer"]


def test_a_change_to_tokenisation_makes_the_training_stages_stale(project, first_repro):
    """dvc.yaml lists all the code each stage runs (tests/test_layers.py checks the lists): one edited
    line of batching.py, which every training and scoring step calls, is seen by dvc status."""
    batching = project / "transpeft" / "batching.py"
    original = batching.read_text()
    batching.write_text(original + "# an edit\n")
    try:
        stale = set(yaml.safe_load(run(project, "dvc", "status", "--json").stdout))
    finally:
        batching.write_text(original)
    every_train = {s for s in yaml.safe_load((project / "dvc.lock").read_text())["stages"] if s.startswith("train@")}
    assert len(every_train) == 4 and every_train | {"transfer", "study"} <= stale  # 2 tasks x 2 runs
    assert not any(s.startswith("prepare@") for s in stale)  # data preparation does not tokenise
    assert "Data and pipelines are up to date" in run(project, "dvc", "status").stdout


def test_training_runs_carry_the_dvc_hash_of_their_data(project, first_repro, mlflow_server):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    data_md5 = {name.split("@")[1]: stage["outs"][0]["md5"] for name, stage in lock["stages"].items()
                if name.startswith("prepare@")}
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert len(runs) >= 4  # 2 tasks x 2 runs
    for r in runs:  # adapter names are <task>-<run>
        task = r.data.tags["adapter"].split("-")[0]
        assert r.data.tags["dvc_data_hash"] == f"md5:{data_md5[task]}"
    data_md5 = data_md5["reverse"]

    # The README's way back from a run's hash to its data: the commit that recorded it, then dvc pull.
    run(project, "git", "add", "dvc.lock", "params.yaml")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    found = run(project, "git", "log", "--format=%H", "-S", data_md5, "--", "dvc.lock").stdout.split()
    assert found == [run(project, "git", "rev-parse", "HEAD").stdout.strip()]


def test_prepare_data_flow_reproduces_pushes_and_returns_the_dvc_hashes(project, first_repro, prefect_server):
    """The prepare-data Prefect flow, run as the worker runs it: from the project root."""
    remote = Path(run(project, "dvc", "remote", "list").stdout.split()[1])
    shutil.rmtree(remote, ignore_errors=True)
    script = "import json; from flows.prepare_data import prepare_data; print(json.dumps(prepare_data()))"
    done = run(project, sys.executable, "-c", script, env={"PYTHONPATH": str(ROOT), "PREFECT_API_URL": prefect_server})
    hashes = json.loads(done.stdout.strip().splitlines()[-1])
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert hashes == {task: "md5:" + lock[f"prepare@{task}"]["outs"][0]["md5"] for task in hashes}
    assert sorted(hashes) == ["add", "lookup", "reverse", "sort"]
    assert any(remote.rglob("*")), "dvc push put nothing on the remote"


def test_a_bad_user_file_fails_prepare_with_file_and_line_and_keeps_the_data(project, first_repro):
    tickets = project / "datasets/tickets"
    tickets.mkdir()
    (tickets / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    (tickets / "eval.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    set_params(project, **{"prepare.tasks.tickets": "datasets/tickets"})
    run(project, "dvc", "repro", "prepare@tickets")
    before = tree_digest(project / "pipeline/data/tickets")

    (tickets / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "no answer here"}\n')
    failed = run(project, "dvc", "repro", "prepare@tickets", check=False)
    assert failed.returncode != 0
    assert "datasets/tickets/train.jsonl:2: row has no 'answer'" in failed.stdout + failed.stderr
    assert tree_digest(project / "pipeline/data/tickets") == before


def test_local_remote_push_wipe_pull_gives_identical_bytes(project, first_repro):
    before = tree_digest(project / "pipeline/data/reverse")
    run(project, "dvc", "push", "pipeline/data/reverse")
    shutil.rmtree(project / ".dvc/cache")
    shutil.rmtree(project / "pipeline/data/reverse")
    run(project, "dvc", "pull", "pipeline/data/reverse")
    assert tree_digest(project / "pipeline/data/reverse") == before


def test_s3_remote_round_trip_on_a_local_s3_server(project, first_repro):
    s3 = start_moto_s3(log_dir=project)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        boto3.client("s3", endpoint_url=s3.url, **{k.lower(): v for k, v in creds.items()
                                                   if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket="transpeft-data")
        run(project, "dvc", "remote", "add", "s3", "s3://transpeft-data/dvc")
        run(project, "dvc", "remote", "modify", "s3", "endpointurl", s3.url)
        before = tree_digest(project / "pipeline/data/add")
        run(project, "dvc", "commit", "-f", "prepare@add")  # into the cache, whatever earlier tests wiped
        run(project, "dvc", "push", "-r", "s3", "pipeline/data/add", env=creds)
        listed = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1").list_objects_v2(
            Bucket="transpeft-data", Prefix="dvc/")
        assert listed["KeyCount"] > 0
        shutil.rmtree(project / ".dvc/cache")
        shutil.rmtree(project / "pipeline/data/add")
        run(project, "dvc", "pull", "-r", "s3", "pipeline/data/add", env=creds)
        assert tree_digest(project / "pipeline/data/add") == before
    finally:
        run(project, "dvc", "remote", "remove", "s3", check=False)
        s3.stop()
