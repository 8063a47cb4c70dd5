"""The ray executor (fanout.py, fanout_node.py): its pure rules, then real runs on a Ray cluster of a
head and two worker nodes with two fake GPUs each, on this machine (tests/raycluster.py).

The cluster is started once for the module's slow tests (about 40 s on 2 cores) and the test that
kills a worker node runs last."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_split_project, tiny_params
from raycluster import BIN, ray_cluster
from test_faults import write_params

from transfer_study import fanout, fanout_node
from transfer_study.cells import cells_for
from transfer_study.config import ExecutorParams, SplitParams, UserError
from transfer_study.fanout import Cluster, Node

RAY = ExecutorParams(kind="ray", num_gpus=1.0)
GPU_NODE = Node("aa" * 28, "wa", "127.0.0.2", gpus=2.0, cpus=2.0)
HEAD = Node("hh" * 28, "head", "127.0.0.1", gpus=0.0, cpus=0.0)


def _cluster(*nodes: Node, driver: Node = HEAD) -> Cluster:
    return Cluster("127.0.0.1:6379", (driver, *nodes), driver.node_id)


# --------------------------------------------------------------------------------------------
# Pure rules
# --------------------------------------------------------------------------------------------


def test_runs_at_once_follow_the_scarcer_resource():
    assert fanout.runs_at_once(GPU_NODE, RAY) == 2  # 0 CPUs per GPU run: the GPUs decide
    assert fanout.runs_at_once(GPU_NODE, dataclasses.replace(RAY, num_gpus=0.5)) == 4
    assert fanout.runs_at_once(GPU_NODE, dataclasses.replace(RAY, num_cpus=1.5)) == 1
    assert fanout.runs_at_once(GPU_NODE, dataclasses.replace(RAY, num_gpus=0.0)) == 2  # CPU runs: 1 CPU each
    assert fanout.runs_at_once(HEAD, RAY) == 0


def test_a_request_no_node_can_meet_is_refused_naming_the_nodes():
    fanout.check_resources(_cluster(GPU_NODE), RAY)
    with pytest.raises(UserError, match=r"3 GPU .* wa: 2 GPUs, 2 CPUs.*--num-gpus"):
        fanout.check_resources(_cluster(GPU_NODE), dataclasses.replace(RAY, num_gpus=3.0))
    with pytest.raises(UserError, match="executor.num_gpus: 0"):
        fanout.check_resources(_cluster(), RAY)


def test_a_store_on_one_disk_is_refused_when_runs_land_on_other_machines():
    other = dataclasses.replace(GPU_NODE, node_id="bb" * 28, name="wb")
    sqlite = "sqlite:////work/mlflow.db"
    with pytest.raises(UserError, match="tracking-server.sh"):
        fanout.check_tracking(sqlite, None, _cluster(GPU_NODE, other), RAY)
    with pytest.raises(UserError, match="on this machine's disk"):  # one node, but not the driver's
        fanout.check_tracking(sqlite, None, _cluster(GPU_NODE), RAY)
    with pytest.raises(UserError, match="file:///srv/mlruns.*new experiment"):
        fanout.check_tracking("http://mlflow:5000", "file:///srv/mlruns", _cluster(GPU_NODE, other), RAY)
    fanout.check_tracking("http://mlflow:5000", "mlflow-artifacts:/1", _cluster(GPU_NODE, other), RAY)
    fanout.check_tracking(sqlite, "file:///work/mlartifacts", _cluster(driver=GPU_NODE), RAY)  # all on this machine


def test_fanout_wall_time_packs_the_longest_runs_first():
    assert fanout.fanout_seconds([10, 10, 10, 10], 2) == 20
    assert fanout.fanout_seconds([30, 10, 10, 10], 2) == 30
    assert fanout.fanout_seconds([5], 4) == 5 and fanout.fanout_seconds([], 4) == 0


def test_a_run_takes_nothing_from_the_node_that_belongs_to_another_run():
    job = fanout_node.NodeJob("small_cnn-scratch-s0", (), "out", "ckpt/run_id", "abc", "e", "k", "d",
                              {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, {"git_commit": "c0ffee"}, 0.0, 2)
    node = {"PATH": "/bin", "MLFLOW_RUN_ID": "driver-run", "MLFLOW_EXPERIMENT_ID": "7", "DVC_ROOT": "/repo",
            "MLFLOW_TRACKING_URI": "sqlite:///node.db", "RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    env = fanout_node.run_environment(node, job, {"git_commit": "c0ffee"})
    assert env["PATH"] == "/bin" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert not {"MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "DVC_ROOT", "RANK"} & set(env)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"  # a CPU run sees no GPU
    assert json.loads(env["MLFLOW_RUN_CONTEXT"]) == {"git_commit": "c0ffee"}
    gpu_run = dataclasses.replace(job, num_gpus=1.0)
    assert fanout_node.run_environment(node, gpu_run, {})["CUDA_VISIBLE_DEVICES"] == "0,1"  # as Ray set it


def test_packed_files_are_the_same_bytes_for_the_same_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.csv").write_text("1,2\n")
    (tmp_path / "a" / "run.json").write_text("{}")
    packed = fanout_node.pack_folder(tmp_path / "a")
    (tmp_path / "a" / "run.json").touch()  # a later time changes nothing
    assert fanout_node.pack_folder(tmp_path / "a") == packed
    fanout_node.unpack(packed, tmp_path / "copy")
    assert (tmp_path / "copy" / "b" / "x.csv").read_text() == "1,2\n"


def test_a_failed_run_is_summed_up_by_its_error_line():
    log = "loading\nTraceback?\nerror: cell x needs ImageNet weights; run `transfer-study weights fetch`\n"
    assert fanout_node.failure_summary(log) == "error: cell x needs ImageNet weights; run `transfer-study weights fetch`"
    assert fanout_node.failure_summary("a\nb\nc", lines=2) == "b\nc"


def test_a_run_folder_counts_as_done_only_for_its_fingerprint_and_a_finished_run(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r1", "fingerprint": "f1"}))
    assert fanout.is_done(tmp_path, "f1", {"r1"})
    assert not fanout.is_done(tmp_path, "f2", {"r1"})  # other params or data
    assert not fanout.is_done(tmp_path, "f1", {"r2"})  # its run is not FINISHED (or in another store)
    assert not fanout.is_done(tmp_path / "missing", "f1", {"r1"})


# --------------------------------------------------------------------------------------------
# A real cluster
# --------------------------------------------------------------------------------------------

WORKERS = {"wa": "127.0.0.2", "wb": "127.0.0.3"}
TRAIN = [str(BIN / "transfer-study"), "train"]
GROUP = "small_cnn-scratch"


def _project(root: Path, seeds=(0, 1), epochs: int = 1, **executor) -> Path:
    """A project of 18 real garments, split twice, with small_cnn's runs at two training sizes
    (seeds × 2 repeats × 2 sizes) on the ray executor."""
    make_split_project(root)
    params = tiny_params(architectures=("small_cnn",), conditions=("scratch",), seeds=seeds, epochs=epochs,
                         max_batches_per_epoch=2)
    params = dataclasses.replace(params, split=SplitParams(repeats=2, train_fractions=(0.5, 1.0)),
                                 executor=dataclasses.replace(RAY, **executor))
    from transfer_study.split import write_manifest

    with contextlib.chdir(root):
        write_manifest(Path("data/cropped"), Path("data/split/manifest.csv"), params.split)
    write_params(root, params)
    # A commit, which every run is tagged with (the driver's: the nodes' copies are not checkouts).
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "--allow-empty",
                    "-m", "test"], cwd=root, check=True)
    return root


def _runs(cluster, experiment: str = "transfer-study") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cluster.mlflow_db}")
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def _children(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("parent") != "true"]


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(WORKERS) as running:
        yield running


@pytest.mark.slow
def test_every_run_trains_once_on_the_cluster_as_the_local_executor_trains_it(cluster, tmp_path):
    """Eight runs: one FINISHED MLflow run each under its cell's parent, each on one GPU of its
    own, on both workers; the run folders come back with the local executor's results; a rerun
    trains nothing, and restores a deleted run folder (as DVC deletes outs) without training."""
    root = _project(tmp_path / "ray")
    local = shutil.copytree(root, tmp_path / "local")
    commit = fanout.tracking.git_commit(root)
    started = time.monotonic()
    # The driver's MLflow run (`mlflow run` sets MLFLOW_RUN_ID) must not become the runs' run.
    done = cluster.run(TRAIN, root, MLFLOW_RUN_ID="0123456789abcdef")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-6000:]
    cells = cells_for(fanout.config.load_params(root / "params.yaml"))
    assert len(cells) == 8

    runs = _runs(cluster)
    parents = [r for r in runs if r.data.tags.get("parent") == "true"]
    children = _children(runs)
    assert [p.info.run_name for p in parents] == [GROUP]
    assert sorted(r.info.run_name for r in children) == sorted(c.name for c in cells)
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED", run.info.run_name
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["executor"] == "ray" and tags["cuda_visible_devices"] in ("0", "1"), tags  # one GPU each
        assert tags["git_commit"] == commit  # the driver's, not the node's copy's
    assert {r.data.tags["ray_node"] for r in children} == set(WORKERS)
    assert "8 of 8 runs to train on 3 nodes (4 GPUs)" in done.stderr

    # The local executor, on a copy of the project, trains a run (the second split, half the
    # training images) to the same result; every run folder holds the same files.
    env = {k: v for k, v in fanout.config.environment().items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{local / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    alone = subprocess.run(TRAIN + ["--executor", "local", "--arch", "small_cnn", "--condition", "scratch",
                                    "--run", "s1-r1-f0.5"], cwd=local, env=env, capture_output=True, text=True,
                           timeout=900)
    assert alone.returncode == 0, alone.stderr[-4000:]
    theirs = local / "out" / "models" / GROUP / "s1-r1-f0.5"
    for cell in cells:
        ours = root / "out" / "models" / GROUP / cell.variant
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir()), cell.name
        assert json.loads((ours / "run.json").read_text())["run_id"] in {r.info.run_id for r in children}
    for name in ("history.csv", "predictions.csv"):
        ours = pd.read_csv(root / "out" / "models" / GROUP / "s1-r1-f0.5" / name).drop(columns="seconds", errors="ignore")
        pd.testing.assert_frame_equal(ours, pd.read_csv(theirs / name).drop(columns="seconds", errors="ignore"),
                                      check_exact=False, rtol=1e-5)

    # A rerun trains nothing; a deleted run folder comes back from checkpoints/fanout/.
    kept = (root / "out" / "models" / GROUP / "s1-r1-f0.5" / "best.pt").read_bytes()
    shutil.rmtree(root / "out" / "models" / GROUP)
    again = cluster.run(TRAIN, root)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 of 8 runs to train" in again.stderr
    assert (root / "out" / "models" / GROUP / "s1-r1-f0.5" / "best.pt").read_bytes() == kept
    assert len(_runs(cluster)) == len(runs), "a rerun added MLflow runs"
    print(f"8 runs on the cluster: {took:.0f} s")


@pytest.mark.slow
def test_what_cannot_work_is_refused_before_any_run(cluster, tmp_path):
    """A SQLite store with runs on two nodes, and GPUs no node has, fail in seconds and start nothing."""
    root = _project(tmp_path / "p", seeds=(5,))
    store = root / "mlflow.db"
    refused = cluster.run(TRAIN, root, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    assert refused.returncode == 1
    assert "error: the tracking store sqlite:///" in refused.stderr and "tracking-server.sh" in refused.stderr
    assert not store.exists()

    params = fanout.config.load_params(root / "params.yaml")
    write_params(root, dataclasses.replace(params, executor=dataclasses.replace(params.executor, num_gpus=3.0)))
    started = time.monotonic()
    refused = cluster.run(TRAIN, root, timeout=120)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert time.monotonic() - started < 60, "a request the cluster cannot meet must not wait"
    assert "no node of the Ray cluster at 127.0.0.1:6379 can take a run asking for 3 GPU" in refused.stderr
    assert not [r for r in _runs(cluster) if r.info.run_name.endswith("-s5")], "a run started"


@pytest.mark.slow
def test_plan_reports_the_cluster_and_the_fanout_wall_time(cluster, tmp_path):
    root = _project(tmp_path / "p")
    done = cluster.run([str(BIN / "transfer-study"), "plan"], root)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "on Ray node w" in out  # timed on a worker, not on the driver
    assert "ray cluster at 127.0.0.1:6379: 3 nodes, 4 GPUs" in out
    for name in WORKERS:
        assert any(line.split()[:1] == [name] and line.split()[-1] == "2" for line in out.splitlines()), out
    assert "fan-out: 8 runs of 1 GPU and 0 CPU each, 4 at once: about" in out


@pytest.mark.slow
def test_a_worker_node_that_dies_mid_fanout_loses_no_run(cluster, tmp_path):
    """Runs it was training are retried on the other worker; the runs it left RUNNING are marked
    FAILED; every run ends with exactly one FINISHED MLflow run. (Last: it leaves one worker.)"""
    from mlflow.tracking import MlflowClient

    root = _project(tmp_path / "p", seeds=(10,), epochs=20, num_gpus=2.0)  # 2 runs, one per worker
    params = fanout.config.load_params(root / "params.yaml")
    write_params(root, dataclasses.replace(params, split=dataclasses.replace(params.split, repeats=1),
                                           tracking=dataclasses.replace(params.tracking, experiment="node-dies")))
    log = tmp_path / "driver.log"
    driver = cluster.popen(TRAIN, root, log)
    client = MlflowClient(f"sqlite:///{cluster.mlflow_db}")
    deadline = time.monotonic() + 300
    while not any(r.data.tags.get("ray_node") == "wa" and r.data.metrics for r in _children(_runs(cluster, "node-dies"))):
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    cluster.kill_node("wa")  # mid-training: a run of wa's has logged an epoch
    assert driver.wait(timeout=600) == 0, log.read_text()[-6000:]

    runs = _children(_runs(cluster, "node-dies"))
    finished = [r.info.run_name for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(c.name for c in cells_for(fanout.config.load_params(root / "params.yaml")))
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert failed and all(r.data.tags["ray_node"] == "wa" and r.data.tags["abandoned"] for r in failed)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert "left RUNNING by a dead node, is marked FAILED" in log.read_text()
    for name in ("s10", "s10-f0.5"):
        info = json.loads((root / "out" / "models" / GROUP / name / "run.json").read_text())
        assert client.get_run(info["run_id"]).info.status == "FINISHED"
