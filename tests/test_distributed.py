"""Multi-process training: sharding, loss weighting, torchrun's variables, and 2 gloo processes
giving the single-process result."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_split_project, tiny_params
from mlflow.tracking import MlflowClient
from test_faults import write_params

from transfer_study import cells, checkpoints, config, distributed, imagestore, stopping, train
from transfer_study.config import AugmentParams, ConfigError
from transfer_study.distributed import World, loss_weight, shard_batches

NO_AUGMENT = AugmentParams(rotation=0.0, translate=0.0, hflip=False)


def test_each_global_batch_is_split_disjointly_across_ranks():
    order = [7, 3, 9, 0, 4, 1, 8, 2, 6, 5, 10]
    ranks = [shard_batches(order, 4, World(rank, 2)) for rank in (0, 1)]
    assert ranks[0] == [[7, 9], [4, 8], [6, 10]] and ranks[1] == [[3, 0], [1, 2], [5]]
    for global_batch, *shards in zip([order[0:4], order[4:8], order[8:]], *ranks):
        merged = [row for shard in shards for row in shard]
        assert sorted(merged) == sorted(global_batch) and len(set(merged)) == len(merged)
    assert shard_batches(order, 4, World()) == [order[0:4], order[4:8], order[8:]]


def test_a_last_batch_smaller_than_the_world_is_dropped_on_every_rank():
    order = list(range(9))  # batches of 4, 4, 1: the 1-row batch cannot give both ranks a row
    assert [len(shard_batches(order, 4, World(rank, 2))) for rank in (0, 1)] == [2, 2]
    assert len(shard_batches(order, 4, World())) == 3


def test_weighted_rank_losses_average_to_the_global_mean_loss():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    global_mean = F.cross_entropy(logits, labels)
    world = World(0, 2)
    shards = [[0, 2, 4], [1, 3]]  # 3 and 2 rows: an uneven split
    weighted = [F.cross_entropy(logits[s], labels[s]) * loss_weight(len(s), 5, world) for s in shards]
    torch.testing.assert_close(sum(weighted) / world.size, global_mean)  # DDP averages over ranks


def test_each_rank_trains_on_its_own_shard_of_every_epoch(tmp_path, monkeypatch):
    make_split_project(tmp_path)  # 12 train images
    manifest = pd.read_csv(tmp_path / "data/split/manifest.csv")
    data = imagestore.TrainingData(manifest, tmp_path, 32, tmp_path / "cache")

    class RecordingImages:
        """Stands in for imagestore.DeviceImages: hands out the shards themselves as the batches."""

        def batches(self, shards):
            return shards

    class RecordingTrainer:
        """Stands in for trainer.Trainer: records the shards each epoch hands it."""

        device, frozen = torch.device("cpu"), False

        def __init__(self, world: World):
            self.world, self.epochs = world, []

        def set_schedule(self, steps_per_epoch, epochs, steps_done):
            pass

        def set_lr_scale(self, scale):
            pass

        def train_epoch(self, loader, progress):
            self.epochs.append(loader)
            return 0.0, 0.0

    monkeypatch.setattr(World, "sum", lambda self, values, device: list(values))  # no process group here
    ranks = [RecordingTrainer(World(rank, 2)) for rank in (0, 1)]
    params = tiny_params(epochs=2, batch_size=4)
    for trainer in ranks:
        train._train_epochs(trainer, RecordingImages(), data.rows("train"), params,
                            cells.Cell("resnet18", "scratch", 0), stopping.stop_rule(params.train, 3), None,
                            recorder=None, features=None)
    for epoch in range(2):
        rows = [[row for shard in rank.epochs[epoch] for row in shard] for rank in ranks]
        assert [len(shard) for shard in ranks[0].epochs[epoch]] == [2, 2, 2]  # per-rank batch: 4 / 2
        assert not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == data.rows("train").tolist()
    assert ranks[0].epochs[0] != ranks[0].epochs[1], "the same order every epoch"


def test_launch_env_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert config.launch_env() == config.LaunchEnv(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert config.launch_env() == config.LaunchEnv(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 and WORLD_SIZE=2"):
        config.launch_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=re.escape("environment variable WORLD_SIZE='two' must be a non-negative "
                                                    "integer (torchrun sets it)")):
        config.launch_env()


def test_a_collective_that_lost_its_peer_is_told_from_a_bug():
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:2762: Connection reset by peer")
    assert distributed.lost_a_process(gone)
    assert distributed.lost_a_process(torch.distributed.DistBackendError("NCCL communicator was aborted"))
    assert not distributed.lost_a_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_world_device_refuses_a_backend_ddp_cannot_use():
    assert World(1, 2).device(torch.device("cpu")) == torch.device("cpu")
    assert World(1, 2, local_rank=1).device(torch.device("cuda")) == torch.device("cuda", 1)
    with pytest.raises(config.UserError, match="CUDA .* or CPU"):
        World(1, 2).device(torch.device("mps"))


def _project(root: Path, **train_overrides) -> Path:
    make_split_project(root)  # 12 train images, 3 val, 3 test
    write_params(root, tiny_params(**train_overrides))
    return root


def _train(root: Path, launcher: list[str], args: list[str]) -> str:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(launcher + ["-m", "transfer_study.cli", "train"] + args, cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stderr


def _run_folder(root: Path, cell: str) -> Path:
    return root / "out" / "models" / cell / "s0"


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(tmp_path):
    # batch_size 7 over 12 images: global batches of 7 and 5, split 4+3 and 3+2 (uneven: loss_weight matters;
    # no rank gets a single image, which BatchNorm cannot train on at resnet18's 1x1 final map at 32 px).
    overrides = dict(architectures=("efficientnet_lite0", "resnet18"), conditions=("frozen", "scratch"),
                     exclude=("efficientnet_lite0-scratch", "resnet18-frozen"), epochs=2, batch_size=7,
                     lr=3e-3, augment=NO_AUGMENT)
    single = _project(tmp_path / "single", **overrides)
    ddp = _project(tmp_path / "ddp", **overrides)
    _train(single, [sys.executable], ["--arch", "efficientnet_lite0", "--condition", "frozen"])
    # Both cells in one torchrun launch: lite0 frozen (compared) and resnet18 scratch (the whole model under DDP).
    log = _train(ddp, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], [])

    cell = "efficientnet_lite0-frozen"
    one, two = (pd.read_csv(_run_folder(root, cell) / "history.csv") for root in (single, ddp))
    np.testing.assert_array_equal(one["val_acc"], two["val_acc"])
    np.testing.assert_array_equal(one["train_acc"], two["train_acc"])
    np.testing.assert_allclose(one["train_loss"], two["train_loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one["val_loss"], two["val_loss"], rtol=1e-4, atol=1e-6)
    heads = [checkpoints.load_checkpoint(_run_folder(root, cell) / "last.pt")["model"] for root in (single, ddp)]
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(heads[0][key], heads[1][key], atol=1e-4, rtol=1e-4)
    assert not torch.equal(heads[1]["head.bias"], torch.zeros_like(heads[1]["head.bias"])), "the head did not train"

    # Only rank 0 records: one MLflow run per cell, each epoch logged and printed once.
    client = MlflowClient(f"sqlite:///{ddp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transfer-study").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["efficientnet_lite0-frozen-s0", "resnet18-scratch-s0"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert log.count("[resnet18-scratch-s0] epoch 1/2") == 1 and log.count("[efficientnet_lite0-frozen-s0] done") == 1
    assert len(pd.read_csv(_run_folder(ddp, "resnet18-scratch") / "history.csv")) == 2


def _agent(root: Path, port: int, store: Path, log: Path) -> subprocess.Popen:
    """One node's torchrun agent (one process) of a two-node job meeting at 127.0.0.1:`port` (c10d)."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "--max-restarts", "0", "-m", "transfer_study.cli", "train"]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _two_node_job(tmp_path: Path, name: str, epochs: int) -> tuple[list[Path], list[subprocess.Popen], Path]:
    """Two copies of a project (two nodes' disks) and their agents; the first holds the rendezvous."""
    from postgres import free_port

    port, store = free_port(), tmp_path / f"{name}-mlflow.db"
    roots = [_project(tmp_path / f"{name}-node{n}", architectures=("small_cnn",), conditions=("scratch",),
                      epochs=epochs, batch_size=4, lr=3e-3, augment=NO_AUGMENT) for n in (0, 1)]
    agents = [_agent(roots[0], port, store, tmp_path / f"{name}-agent0.log")]
    deadline = time.monotonic() + 120
    while not _listening(port):  # the first agent holds the c10d store; then the second joins
        assert agents[0].poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}-agent0.log").read_text()
        time.sleep(0.2)
    agents.append(_agent(roots[1], port, store, tmp_path / f"{name}-agent1.log"))
    return roots, agents, store


@pytest.mark.slow
def test_two_torchrun_nodes_train_one_run_and_a_lost_node_ends_it_with_a_clear_error(tmp_path):
    """torchrun on two 'nodes' (agents on loopback, c10d rendezvous, a project copy each) trains one
    run of world size 2; killing one node's agent and its process ends the other's within a minute,
    saying what happened and how to go on (about 30 s on 2 cores)."""
    import psutil

    roots, agents, store = _two_node_job(tmp_path, "kill", epochs=100_000)
    logs = [tmp_path / f"kill-agent{n}.log" for n in (0, 1)]
    deadline = time.monotonic() + 300
    while not any("ready to train" in log.read_text() for log in logs):
        assert all(a.poll() is None for a in agents) and time.monotonic() < deadline, logs[0].read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(2)  # training
    doomed = psutil.Process(agents[1].pid)
    for process in [doomed, *doomed.children(recursive=True)]:  # a node dies: its agent and its process
        process.kill()
    killed = time.monotonic()
    try:
        code = agents[0].wait(timeout=60)
    finally:
        for agent in agents:
            for process in psutil.Process(agent.pid).children(recursive=True) if agent.poll() is None else []:
                process.kill()
            agent.kill()
    assert code != 0 and time.monotonic() - killed < 60
    assert "the torchrun job lost a process" in logs[0].read_text(), logs[0].read_text()[-4000:]
    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([client.get_experiment_by_name("transfer-study").experiment_id])
    assert run.data.tags["world_size"] == "2"  # one run, rank 0's, of both nodes' processes
