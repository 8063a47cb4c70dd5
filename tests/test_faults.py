"""Faults a training run survives, or reports clearly: a tracking store that goes away, SIGKILL,
a full disk, corrupt checkpoints and model artifacts; and what the served model refuses."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import interrupt_training_at_epoch, make_split_project, tiny_params
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from PIL import Image

from transfer_study import checkpoints, checksums, client, config, models, serve, tracking, train
from transfer_study.config import UserError
from transfer_study.cells import Cell
from transfer_study.trainer import Trainer

CLI = [sys.executable, "-m", "transfer_study.cli"]


# --------------------------------------------------------------------------------------------
# Helpers: a project on disk that the real CLI can train, and a process whose stderr we follow
# --------------------------------------------------------------------------------------------


def write_params(root: Path, params) -> Path:
    """params.yaml for `transfer-study train` in a test project."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(plain(dataclasses.asdict(params))))
    return path


def cli_project(root: Path, per_class: int, **train_overrides) -> Path:
    """A project folder with crops, a manifest and params.yaml for one resnet18 scratch cell."""
    make_split_project(root, per_class=per_class)
    params = tiny_params(architectures=("resnet18",), conditions=("scratch",), **train_overrides)
    write_params(root, params)
    return root


class FollowedProcess:
    """A subprocess whose stderr lines are collected by a thread, so a test can wait for one."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]):
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None and not self._reader.is_alive():
                pytest.fail(f"process exited ({self.process.returncode}) before '{text}':\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no '{text}' within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """SIGKILL the process group (the process and any children it started)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def output(self) -> str:
        return "".join(self.lines)[-6000:]


def training_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def single_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("transfer-study")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return client, runs[0]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if offset is None else offset
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# Retries of tracking calls
# --------------------------------------------------------------------------------------------


def test_tracking_calls_retry_with_backoff_and_say_so(capsys):
    failures = [MlflowException("API request failed: connection refused"),
                MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)]
    waits: list[float] = []

    def flaky():
        if failures:
            raise failures.pop(0)
        return "ok"

    assert tracking.call_with_retry("log metrics", flaky, tracking.RetryPolicy(first_delay_s=1.0),
                                    sleep=waits.append) == "ok"
    assert waits == [1.0, 2.0]
    err = capsys.readouterr().err
    assert err.count("tracking store unavailable (log metrics") == 2 and "retry 2 in 2.0s" in err


def test_the_tests_backoff_scale_shortens_the_waits_not_the_budget(monkeypatch):
    """TRANSFER_STUDY_RETRY_DELAY_SCALE (tests only, read by config.py) scales each wait and the cap."""
    def refused():
        raise MlflowException("API request failed: connection refused")

    waits: list[float] = []
    policy = tracking.RetryPolicy(budget_s=60.0, first_delay_s=1.0, max_delay_s=4.0)
    monkeypatch.setenv(config.RETRY_DELAY_SCALE_VARIABLE, "0.1")
    clock = iter(range(0, 1000, 10))  # each attempt 10 s later: the 60 s budget allows six retries
    monkeypatch.setattr(tracking.time, "monotonic", lambda: next(clock))
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.call_with_retry("log metrics", refused, policy, sleep=waits.append)
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4])
    for bad in ("0", "2", "fast"):
        monkeypatch.setenv(config.RETRY_DELAY_SCALE_VARIABLE, bad)
        message = (f"environment variable TRANSFER_STUDY_RETRY_DELAY_SCALE={bad!r} must be a number in (0, 1]; "
                   "unset it for the normal waits")
        with pytest.raises(config.ConfigError, match=f"^{re.escape(message)}$"):
            tracking.call_with_retry("log metrics", refused, policy, sleep=waits.append)


def test_tracking_calls_give_up_after_the_budget_with_a_clear_error():
    def down():
        raise ConnectionRefusedError("connection refused")

    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match="rerun the same command"):
        tracking.call_with_retry("end run", down, tracking.RetryPolicy(budget_s=0.4, first_delay_s=0.1))
    assert time.monotonic() - started < 5


def test_permanent_tracking_errors_are_not_retried():
    calls = []

    def refused():
        calls.append(1)
        raise MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException, match="bad param"):
        tracking.call_with_retry("log params", refused, sleep=lambda s: pytest.fail("retried a permanent error"))
    assert calls == [1]


def test_mlflow_http_retries_are_off_only_during_a_call(monkeypatch):
    monkeypatch.setenv(tracking.MLFLOW_HTTP_RETRIES_VARIABLE, "5")
    seen = tracking.call_with_retry("probe", lambda: os.environ[tracking.MLFLOW_HTTP_RETRIES_VARIABLE])
    assert seen == "0" and os.environ[tracking.MLFLOW_HTTP_RETRIES_VARIABLE] == "5"


def test_a_retried_metrics_request_that_reached_the_store_logs_nothing_twice(tracking_uri, monkeypatch):
    experiment_id = tracking.ensure_experiment(tracking_uri, "transfer-study", None)
    tracker = tracking.RunTracker.start(tracking_uri, experiment_id, "cell")
    real_log_batch, calls = tracker.client.log_batch, []

    def lost_answer(*args, **kwargs):
        calls.append(1)
        real_log_batch(*args, **kwargs)  # the store has it ...
        if len(calls) == 1:
            raise MlflowException("connection reset by peer")  # ... but the answer is lost

    monkeypatch.setattr(tracker.client, "log_batch", lost_answer)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    tracker.log_metrics({"val_acc": 0.5, "train_loss": 1.0}, step=1)
    tracker.finish()
    assert len(calls) == 2
    assert [m.step for m in MlflowClient(tracking_uri).get_metric_history(tracker.run_id, "val_acc")] == [1]


def test_resume_logs_the_epochs_the_store_missed(tracking_uri, capsys):
    experiment_id = tracking.ensure_experiment(tracking_uri, "transfer-study", None)
    tracker = tracking.RunTracker.start(tracking_uri, experiment_id, "cell")
    history = [dict(epoch=e, train_loss=1.0 / e, train_acc=0.5, val_loss=1.0, val_acc=0.1 * e, seconds=1.0)
               for e in (1, 2, 3)]
    for row in history[:2]:  # the process died after saving epoch 3, before logging it
        tracker.log_metrics(tracking.epoch_metrics(row), step=row["epoch"])
    tracker.log_missing_epochs(history, "resnet18-scratch-s0")
    tracker.finish()
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(tracker.run_id, "val_acc")]
    assert steps == [1, 2, 3]
    assert "logging epoch 3's metrics" in capsys.readouterr().err


def test_a_run_that_cannot_be_continued_names_the_resume_folder_to_delete(tracking_uri, tmp_path):
    spec = tracking.CellRun(experiment="transfer-study", run_name="resnet18-scratch-s0", params={"a": "1"}, tags={})
    store = MlflowClient(tracking_uri)
    deleted = store.create_run(tracking.ensure_experiment(tracking_uri, "transfer-study", None)).info.run_id
    store.delete_run(deleted)
    work = tmp_path / "checkpoints" / "resnet18-scratch-s0-0123456789ab"
    for run_id in (deleted, "f" * 32):  # deleted from this store; never in it (another store's)
        with pytest.raises(UserError) as error:
            tracking.start_cell_run(tracking_uri, spec, run_id, work)
        message = str(error.value)
        assert f"cannot continue MLflow run {run_id} of '{work}' in {tracking_uri}" in message
        assert f"delete '{work}' to train the cell again" in message
        assert mlflow.active_run() is None
    tracker, _ = tracking.start_cell_run(tracking_uri, spec, None, work)  # no resume: a new run
    assert tracker.run_id != deleted and store.get_run(tracker.run_id).data.params == {"a": "1"}
    tracker.finish()


# --------------------------------------------------------------------------------------------
# Checkpoints: checksums, corruption, full disk
# --------------------------------------------------------------------------------------------


def test_resume_state_and_best_checkpoint_are_verified_before_use(project_with_manifest, tracking_uri, monkeypatch):
    root = project_with_manifest
    params, cell = tiny_params(epochs=2), Cell("efficientnet_lite0", "scratch", 0)
    original = interrupt_training_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train.train_cell(params, cell, root, tracking_uri)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    (folder,) = (root / checkpoints.CHECKPOINT_DIR).glob(f"{cell.name}-*")  # what training wrote
    work = checkpoints.WorkDir(folder)
    state = work.load_state()
    assert state["epoch"] == 1 and state["best_sha256"] == checksums.file_sha256(work.best_file(1))

    flip_byte(work.best_file(1))
    with pytest.raises(UserError, match="best-e1.pt' is corrupt: checksum mismatch"):
        train.train_cell(params, cell, root, tracking_uri)
    assert mlflow.active_run() is None, "a refused resume left its MLflow run active in the process"
    assert work.load_state()["epoch"] == 1, "training went on from a resume state whose best checkpoint is corrupt"
    flip_byte(work.best_file(1))  # intact again: the resume state is what is damaged next
    flip_byte(work.state_file, offset=100)
    with pytest.raises(UserError, match="resume.pt' is corrupt: checksum mismatch"):
        train.train_cell(params, cell, root, tracking_uri)
    assert not (root / "out" / "models").exists(), "training went ahead on a corrupt resume state"


@pytest.fixture
def project_with_manifest(tmp_path: Path) -> Path:
    make_split_project(tmp_path)
    return tmp_path


def _fill_disk_then_save(folder: Path) -> None:
    """Save a small checkpoint, then one larger than the disk at the same path; check the result."""
    path = folder / "last.pt"
    checkpoints.atomic_save({"epoch": 1, "model": {"w": torch.ones(1000)}}, path)
    with pytest.raises(UserError) as error:
        checkpoints.atomic_save({"epoch": 2, "model": {"w": torch.randn(1024 * 1024)}}, path)  # 4 MB
    message = str(error.value)
    assert str(path) in message and "free disk space" in message and "no space left" in message
    assert checkpoints.load_checkpoint(path)["epoch"] == 1, "the previous checkpoint was damaged"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "last.pt.sha256"], "temp files left behind"


def test_full_disk_on_a_real_filesystem_gives_a_clear_error(tmp_path):
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        _fill_disk_then_save(mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_full_disk_via_dev_full_gives_a_clear_error(tmp_path, monkeypatch):
    # /dev/full fails every write with ENOSPC: the kernel's own full disk, without mounting one.
    real_open = open

    def open_temp_on_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith(".pt.tmp") and "w" in mode and Path(str(file)[:-4]).exists():
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", open_temp_on_full_disk, raising=False)
    _fill_disk_then_save(tmp_path)


# --------------------------------------------------------------------------------------------
# The logged model: weights checksum; what the served pyfunc refuses
# --------------------------------------------------------------------------------------------


def test_corrupt_model_artifact_fails_to_load_with_a_clear_message(tmp_path, tracking_uri):
    model = models.build_model("efficientnet_lite0", 3, pretrained=False).eval()
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment("artifacts", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id):
        info = serve.log_servable_model(model, "efficientnet_lite0", ["a", "b", "c"], 32, tiny_params(),
                                        Path("best.pt"))
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download")))
    config = json.loads(next(local.rglob("config.json")).read_text())
    weights = next(local.rglob("weights.pt"))
    assert config["weights_sha256"] == checksums.file_sha256(weights)
    mlflow.pyfunc.load_model(str(local))  # intact: loads

    flip_byte(weights)
    with pytest.raises(serve.CorruptModel, match="corrupt: checksum mismatch") as error:
        mlflow.pyfunc.load_model(str(local))
    assert "weights.pt" in str(error.value)


def _png_base64(size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


NOT_BASE64 = "row 0: 'image' is not valid base64; encode the file bytes with base64"
NOT_AN_IMAGE = "row 0: the file is not an image (PNG, JPEG or WebP) Pillow can read; use a JPEG, PNG or WebP file"


@pytest.mark.parametrize("value, message", [("/etc/passwd", NOT_BASE64), ("/etc/shadow1", NOT_AN_IMAGE),
                                            ("file:///etc/passwd", NOT_BASE64),
                                            ("http://example.com/shirt.png", NOT_BASE64),
                                            ("s3://bucket/key.png", NOT_BASE64)],
                         ids=["path", "12-character path", "file URL", "http URL", "s3 URL"])
def test_pyfunc_refuses_paths_and_urls(value, message, monkeypatch):
    """A path or URL is refused as the text it is (a 12-character path happens to be valid base64), never opened."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched a URL"))
    with pytest.raises(serve.BadRequest, match=f"^{re.escape(message)}$"):
        serve.images_from_request(pd.DataFrame({"image": [value]}))


def test_pyfunc_refuses_the_path_of_a_real_image(tmp_path):
    path = tmp_path / "shirt.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    assert len(serve.images_from_request(pd.DataFrame({"image": [client.encode_file(path)]}))) == 1
    with pytest.raises(serve.BadRequest, match=f"^{re.escape(NOT_BASE64)}$"):
        serve.images_from_request(pd.DataFrame({"image": [str(path)]}))


def test_pyfunc_caps_the_whole_request(monkeypatch):
    image = _png_base64()
    monkeypatch.setattr(serve, "MAX_REQUEST_BASE64_CHARS", 3 * len(image))
    assert len(serve.images_from_request(pd.DataFrame({"image": [image] * 3}))) == 3
    with pytest.raises(serve.BadRequest, match="send fewer images per request"):
        serve.images_from_request(pd.DataFrame({"image": [image] * 4}))


# --------------------------------------------------------------------------------------------
# Real processes: SIGKILL mid-epoch; the tracking server killed and restarted
# --------------------------------------------------------------------------------------------

EPOCHS = 4


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_continues_the_same_run(tmp_path, tracking_uri):
    root = cli_project(tmp_path / "project", per_class=30, epochs=EPOCHS, batch_size=8,
                       image_size={"resnet18": 64, "vgg19": 32, "inception_v3": 75, "efficientnet_lite0": 32})
    first = FollowedProcess(CLI + ["train"], root, training_env(tracking_uri))
    try:
        first.wait_for(f"epoch 1/{EPOCHS}", timeout=300)
        time.sleep(0.5)  # into epoch 2, which takes seconds
        first.kill()
    finally:
        first.kill()
    assert first.process.returncode == -signal.SIGKILL
    assert not any(f"epoch {EPOCHS}/{EPOCHS}" in line for line in first.lines), "killed too late to test a resume"
    (state_file,) = (root / checkpoints.CHECKPOINT_DIR).glob("resnet18-scratch-s0-*/resume.pt")
    assert checkpoints.load_checkpoint(state_file)["epoch"] == 1, "not killed during epoch 2"
    client, run = single_run(tracking_uri)
    assert run.info.status == "RUNNING"  # SIGKILL leaves no chance to end it

    second = FollowedProcess(CLI + ["train"], root, training_env(tracking_uri))
    assert second.finish(timeout=600) == 0, second.output()
    assert f"resuming MLflow run {run.info.run_id} from epoch 2" in second.output()
    client, resumed = single_run(tracking_uri)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    for key in ("train_loss", "val_acc", "val_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, EPOCHS + 1))
    run_dir = root / "out" / "models" / "resnet18-scratch" / "s0"
    assert len(pd.read_csv(run_dir / "history.csv")) == EPOCHS
    checkpoints.load_checkpoint(run_dir / "best.pt")  # verified against its checksum
    assert not any((root / checkpoints.CHECKPOINT_DIR).glob("resnet18-*")), "resume state left after a finished run"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_tracking_server(folder: Path, port: int) -> FollowedProcess:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    server = FollowedProcess(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        folder, env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
        if server.process.poll() is not None:
            pytest.fail(f"mlflow server exited:\n{server.output()}")
    server.kill()
    pytest.fail(f"mlflow server did not answer /health within 180s:\n{server.output()}")


@pytest.mark.slow
def test_tracking_server_killed_and_restarted_mid_training(tmp_path):
    root = cli_project(tmp_path / "project", per_class=20, epochs=EPOCHS, batch_size=8)
    store = tmp_path / "server"
    store.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_tracking_server(store, port)
    # Retries 10× more often than a user's (waits 0.1 s to 1.5 s), within the same 120 s budget:
    # the restart is waited for, not slept through.
    env = training_env(uri) | {config.RETRY_DELAY_SCALE_VARIABLE: "0.1"}
    training = FollowedProcess(CLI + ["train"], root, env)
    try:
        training.wait_for(f"epoch 1/{EPOCHS}", timeout=300)  # printed once epoch 1 is logged
        server.kill()
        training.wait_for("tracking store unavailable", timeout=300)  # epoch 2's logging retries
        server = _start_tracking_server(store, port)
        assert training.finish(timeout=600) == 0, training.output()
        assert "; retry 2 in 0.2s" in training.output()  # the scaled backoff
        client, run = single_run(uri)
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_acc"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, EPOCHS + 1))
        assert json.loads((root / "out/models/resnet18-scratch/s0/run.json").read_text())["run_id"] == run.info.run_id
    finally:
        training.kill()
        server.kill()


def test_local_artifacts_go_beside_the_sqlite_store(tmp_path):
    assert tracking.artifact_location_for(f"sqlite:///{tmp_path / 'mlflow.db'}") == (tmp_path / "mlartifacts").as_uri()
    assert tracking.artifact_location_for("http://127.0.0.1:5000") is None  # the server decides
