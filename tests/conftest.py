"""Shared fixtures: small real data, temporary MLflow stores, a pre-filled TORCH_HOME."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# In CI (CI=true) a skipped test fails the run, unless it is listed here with the reason it
# cannot run in CI's environment. CI has Fashion-MNIST (`make test` installs Debian's package)
# and PostgreSQL (.ci/run installs it), and runs as root; so nothing that needs them belongs
# here. Not listed on purpose: test_faults.py's tmpfs test, which needs CAP_SYS_ADMIN (root
# has it on CI's machine; an unprivileged container would need an entry saying so).
# --------------------------------------------------------------------------------------------
ALLOWED_SKIPS_IN_CI: dict[str, str] = {
    # "tests/test_x.py::test_name": "why CI's environment cannot run it",
}
_skipped: list[tuple[str, str]] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)  # a whole module skipped at collection


def unexpected_skips() -> list[tuple[str, str]]:
    """The skipped tests (node id, reason) that ALLOWED_SKIPS_IN_CI does not list."""
    return [(nodeid, reason) for nodeid, reason in _skipped if nodeid.split("[")[0] not in ALLOWED_SKIPS_IN_CI]


def pytest_sessionfinish(session, exitstatus) -> None:
    if _in_ci() and unexpected_skips() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _in_ci() and unexpected_skips():
        terminalreporter.section("unexpected skips (CI=true)", red=True)
        for nodeid, reason in unexpected_skips():
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line("A skip in CI means an install step failed: fix the environment, or list the test "
                              "in tests/conftest.py's ALLOWED_SKIPS_IN_CI with the reason CI cannot run it.")


def read_fmnist(count: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` Fashion-MNIST training images (N, 28, 28) and labels, from Debian's files."""
    images_gz, labels_gz = FMNIST_DIR / "train-images-idx3-ubyte.gz", FMNIST_DIR / "train-labels-idx1-ubyte.gz"
    if not images_gz.is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    with gzip.open(images_gz) as f:
        images = np.frombuffer(f.read(16 + count * 784), dtype=np.uint8)[16:].reshape(count, 28, 28)
    with gzip.open(labels_gz) as f:
        labels = np.frombuffer(f.read(8 + count), dtype=np.uint8)[8:]
    return images, labels


def fmnist_garments(classes, per_class: int) -> dict[str, np.ndarray]:
    """The first `per_class` Fashion-MNIST images (per_class, 28, 28) of each named class."""
    label_of = {"t-shirt_top": 0, "trouser": 1, "pullover": 2, "dress": 3, "coat": 4, "shirt": 6}
    images, labels = read_fmnist()
    return {name: images[np.flatnonzero(labels == label_of[name])[:per_class]] for name in classes}


def make_raw_project(root: Path, per_class: int = 6, classes=("coat", "shirt", "trouser")) -> Path:
    """A project folder with data/raw/<class>/img<n>.png: 28 px grayscale Fashion-MNIST garments,
    as `data fetch` writes them; returns the raw folder."""
    raw = root / "data" / "raw"
    for name, images in fmnist_garments(classes, per_class).items():
        (raw / name).mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(images):
            Image.fromarray(image).save(raw / name / f"img{n:03d}.png")
    return raw


def make_split_project(root: Path, per_class: int = 6, size: int = 80, classes=("coat", "shirt", "trouser")) -> Path:
    """A project folder with data/cropped/<class>/*.png (RGB, `size` px, real Fashion-MNIST
    garments) and a stratified manifest; returns the manifest path."""
    rows = []
    for name, images in fmnist_garments(classes, per_class).items():
        folder = root / "data" / "cropped" / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(images):
            path = folder / f"img{n:03d}.png"
            Image.fromarray(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(path)
            split = "train" if n < per_class - 2 else ("val" if n == per_class - 2 else "test")
            rows.append({"path": path.relative_to(root).as_posix(), "label": name, "split": split,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = root / "data" / "split" / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(manifest, index=False)
    # As the preprocess stage leaves them: the crops say how they were made (tiny_params' settings).
    from transfer_study.config import PreprocessParams
    from transfer_study.preprocess import write_crop_record

    write_crop_record(root / "data" / "cropped", PreprocessParams(size=80), {"written": len(rows)})
    return manifest


def interrupt_training_at_epoch(monkeypatch, epoch: int):
    """Make the next training raise KeyboardInterrupt (Ctrl-C) when its `epoch`-th call of
    Trainer.train_epoch starts, after the earlier epochs' resume state was saved. Returns the
    real train_epoch, to put back (monkeypatch.setattr) before the rerun."""
    from transfer_study.trainer import Trainer

    original, calls = Trainer.train_epoch, []

    def train_epoch(self, loader, progress):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return original(self, loader, progress)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    return original


@pytest.fixture(autouse=True)
def restore_tracking_uri():
    """mlflow.set_tracking_uri sets a process-wide URI and MLFLOW_TRACKING_URI; undo it after each test."""
    import mlflow

    original = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if original is not None:
        os.environ["MLFLOW_TRACKING_URI"] = original


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An initialised MLflow SQLite store, made once: creating the tables takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch, empty_mlflow_db: Path) -> str:
    """A fresh SQLite tracking store for one test (a copy of the initialised template)."""
    path = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME pre-filled with state_dicts under torchvision's file names, so the real
    cache-lookup path loads them (no internet needed). The weights are random but fixed."""
    import torch
    import torchvision

    from transfer_study import models

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(1234)
    for arch in ("resnet18", "vgg19", "inception_v3"):
        kwargs = {"aux_logits": True, "init_weights": False} if arch == "inception_v3" else {}
        net = torchvision.models.get_model(arch, weights=None, **kwargs)
        torch.save(net.state_dict(), checkpoints / models.weights_file(arch))
        del net
    return home


@pytest.fixture
def use_torch_home(torch_home: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


def tiny_params(base=None, **train_overrides):
    """Params for fast tests: 1 epoch, small images, few batches."""
    from transfer_study.config import Params, PreprocessParams, TrainParams

    base = base or Params()
    sizes = {"resnet18": 32, "vgg19": 32, "inception_v3": 75, "efficientnet_lite0": 32, "small_cnn": 28}
    train = dataclasses.replace(
        TrainParams(), epochs=1, batch_size=4, image_size=sizes, num_workers=0, seeds=(0,), save_every_s=0.0,
        architectures=("resnet18", "vgg19", "inception_v3", "efficientnet_lite0"),
        conditions=("scratch", "frozen", "finetune"),
    )
    train = dataclasses.replace(train, **train_overrides)
    return dataclasses.replace(base, train=train, preprocess=dataclasses.replace(PreprocessParams(), size=80),
                               paths=dataclasses.replace(base.paths, outputs="out"))


@pytest.fixture(scope="session")
def reproduced_repo(tmp_path_factory):
    """A repository copy with a tiny dataset versioned and `dvc repro` run, once per test run (repo.py);
    a test that changes anything works on `repo.copy_reproduced` of it."""
    from repo import reproduce

    return reproduce(tmp_path_factory.mktemp("reproduced") / "repo")
