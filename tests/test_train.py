"""Training: every architecture × condition end to end, the frozen backbone, weights, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import interrupt_training_at_epoch, make_split_project, tiny_params
from mlflow.tracking import MlflowClient
from PIL import Image

from transfer_study import imagestore, models, serve, transforms
from transfer_study.cells import Cell
from transfer_study.checkpoints import load_checkpoint
from transfer_study.config import UserError
from transfer_study.trainer import Trainer, loss_of
from transfer_study.train import train_cell

FAST_ARCHS = ("resnet18", "efficientnet_lite0")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    make_split_project(tmp_path)
    return tmp_path


def _run_cell(project: Path, tracking_uri: str, arch: str, condition: str, **overrides):
    params = tiny_params(**overrides)
    run_dir = train_cell(params, Cell(arch, condition, 0), project, tracking_uri)
    return params, run_dir


def _check_run(project: Path, tracking_uri: str, run_dir: Path, arch: str, condition: str) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(tracking_uri)
    run = client.get_run(info["run_id"])
    assert run.info.run_name == f"{arch}-{condition}-s0"
    assert run.data.tags["architecture"] == arch and run.data.tags["condition"] == condition
    assert run.data.tags["seed"] == "0" and "git_commit" in run.data.tags and "device" in run.data.tags
    assert "dataset_md5" in run.data.tags
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["cell.architecture"] == arch
    assert run.data.params["train.epochs"] == "1"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in run.data.metrics
    history = client.get_metric_history(info["run_id"], "val_acc")
    assert [m.step for m in history] == [1]
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert len(predictions) == 18 and {"prob_0", "prob_1", "prob_2"} <= set(predictions.columns)
    np.testing.assert_allclose(predictions[["prob_0", "prob_1", "prob_2"]].sum(axis=1), 1.0, atol=1e-4)
    model = mlflow.pyfunc.load_model(info["model_uri"])
    sample = project / predictions["path"][0]
    from transfer_study.client import encode_file

    answer = model.predict(pd.DataFrame({"image": [encode_file(sample)]}))
    assert answer["label"][0] in info["class_names"]
    assert abs(answer.filter(like="prob_").iloc[0].sum() - 1.0) < 1e-4


@pytest.mark.parametrize("condition", ["scratch", "frozen", "finetune"])
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_every_fast_cell_trains_and_logs(project, tracking_uri, use_torch_home, arch, condition):
    _, run_dir = _run_cell(project, tracking_uri, arch, condition)
    _check_run(project, tracking_uri, run_dir, arch, condition)


def test_small_cnn_trains_from_scratch_at_28_px_and_logs(project, tracking_uri):
    _, run_dir = _run_cell(project, tracking_uri, "small_cnn", "scratch", epochs=1)
    _check_run(project, tracking_uri, run_dir, "small_cnn", "scratch")
    assert json.loads((run_dir / "run.json").read_text())["image_size"] == 28


@pytest.mark.parametrize("condition", ["frozen", "finetune"])
def test_small_cnn_pretrained_cell_is_refused_before_reading_data(project, tracking_uri, monkeypatch, condition):
    monkeypatch.setattr(imagestore.TrainingData, "__init__", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(UserError, match="small_cnn has no pretrained weights"):
        _run_cell(project, tracking_uri, "small_cnn", condition)
    assert not (project / "out" / "models").exists()


# VGG-19 once, in the condition with its own rule (only the last Linear trains; the 4096-wide layers
# stay frozen): its 548 MB of weights make each cell ~20 s here, and the condition logic is the same
# code the fast architectures run in every condition.
SLOW_CELLS = [("vgg19", "frozen")] + [("inception_v3", c) for c in ("scratch", "frozen", "finetune")]


@pytest.mark.slow
@pytest.mark.parametrize("arch, condition", SLOW_CELLS)
def test_every_slow_cell_trains_and_logs(project, tracking_uri, use_torch_home, arch, condition):
    # Inception's aux classifier needs 299 px; at the tests' 75 px it is off (its path is tested below).
    _, run_dir = _run_cell(project, tracking_uri, arch, condition, max_batches_per_epoch=1, aux_logits=False)
    _check_run(project, tracking_uri, run_dir, arch, condition)


def test_frozen_backbone_is_bit_identical_after_training(project, tracking_uri):
    params = tiny_params(epochs=2)
    trainer = Trainer(params, Cell("efficientnet_lite0", "frozen", 0), 3, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = trainer.model.head.weight.detach().clone()
    assert all(p.requires_grad for p in trainer.model.head.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.head.parameters()}
    data = imagestore.TrainingData(pd.read_csv(project / "data/split/manifest.csv"), project, 32, project / "cache")
    loader = list(data.on_device(torch.device("cpu")).in_order(data.rows("train"), 4))
    for _ in range(2):
        trainer.train_epoch(loader, None)
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone changed"
    assert not torch.equal(head_before, trainer.model.head.weight), "the head did not train"


def test_scratch_does_not_start_from_pretrained(use_torch_home):
    saved = torch.load(use_torch_home / "hub/checkpoints" / models.weights_file("resnet18"), weights_only=True)
    scratch = models.build_model("resnet18", 3, pretrained=False)
    pretrained = models.build_model("resnet18", 3, pretrained=True)
    conv_scratch = scratch.backbone.conv1.weight
    conv_pretrained = pretrained.backbone.conv1.weight
    assert torch.equal(conv_pretrained, saved["conv1.weight"])
    assert not torch.equal(conv_scratch, saved["conv1.weight"])


def test_inception_trains_with_aux_loss_and_evaluates_on_main_output(use_torch_home):
    net = models.build_model("inception_v3", 3, pretrained=False, aux_logits=True)
    images, labels = torch.randn(2, 3, 299, 299), torch.tensor([0, 2])
    net.train()
    outputs = net(images)
    assert isinstance(outputs, tuple) and outputs[0].shape == outputs[1].shape == (2, 3)
    loss, logits = loss_of(outputs, labels, 0.4)
    expected = torch.nn.functional.cross_entropy(outputs[0], labels) + 0.4 * torch.nn.functional.cross_entropy(
        outputs[1], labels)
    assert torch.allclose(loss, expected) and logits is outputs[0]
    net.eval()
    assert net(images).shape == (2, 3)


def test_missing_weights_fail_before_training(project, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def no_internet(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_internet)
    monkeypatch.setattr(imagestore.TrainingData, "__init__", lambda *a, **k: pytest.fail("data was read before weights"))
    with pytest.raises(UserError) as error:
        _run_cell(project, tracking_uri, "resnet18", "frozen")
    assert models.weights_file("resnet18") in str(error.value)
    assert not (project / "out" / "models").exists()
    experiment = MlflowClient(tracking_uri).get_experiment_by_name("transfer-study")
    assert experiment is None or not MlflowClient(tracking_uri).search_runs([experiment.experiment_id])


def test_interrupted_run_resumes_the_same_mlflow_run_and_model(project, tracking_uri, monkeypatch,
                                                              tmp_path_factory, empty_mlflow_db):
    # The same cell never interrupted, in a folder and store of its own; only its weights and
    # history are compared, so its model is not logged (seconds saved).
    reference = tmp_path_factory.mktemp("uninterrupted")
    make_split_project(reference)
    shutil.copy(empty_mlflow_db, reference / "mlflow.db")
    log_model = serve.log_servable_model
    monkeypatch.setattr(serve, "log_servable_model", lambda *args: SimpleNamespace(model_uri="not logged"))
    _, reference_dir = _run_cell(reference, f"sqlite:///{reference / 'mlflow.db'}", "efficientnet_lite0",
                                 "scratch", epochs=3)
    monkeypatch.setattr(serve, "log_servable_model", log_model)

    original = interrupt_training_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run_cell(project, tracking_uri, "efficientnet_lite0", "scratch", epochs=3)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("transfer-study")
    (first,) = client.search_runs([experiment.experiment_id])
    assert first.info.status == "KILLED"

    monkeypatch.setattr(Trainer, "train_epoch", original)
    _, run_dir = _run_cell(project, tracking_uri, "efficientnet_lite0", "scratch", epochs=3)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == first.info.run_id
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.info.run_id, "val_acc")] == [1, 2, 3]
    assert not list((project / "checkpoints").glob("*/resume.pt")), "resume state left after a finished run"

    # The resumed model is the uninterrupted one, bit for bit (CPU), and so is every epoch's result.
    resumed, expected = (load_checkpoint(d / "last.pt")["model"] for d in (run_dir, reference_dir))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected), "resume did not restore the model"
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "history.csv")[columns],
                                  pd.read_csv(reference_dir / "history.csv")[columns])


def test_a_resumed_schedule_reaches_every_step_as_a_captured_step_reads_it(project, tracking_uri, monkeypatch):
    """One-cycle, interrupted after epoch 1 and resumed: every step's learning rate is the
    uninterrupted schedule's, read as a CUDA graph reads it. A captured step keeps the objects it
    saw at capture (the first step after the Trainer is made or restored) and reads their current
    values on each replay; a float, or a tensor that load_state_dict swapped in, is frozen there."""
    from transfer_study.trainer import learning_rate

    monkeypatch.setattr(serve, "log_servable_model", lambda *args: SimpleNamespace(model_uri="not logged"))
    captured, rates, step = {}, [], Trainer.step_outputs

    def step_as_replayed(self, images_u8, labels):
        rate = captured.setdefault(id(self), self.optimizer.param_groups[0]["lr"])
        rates.append(float(rate))
        return step(self, images_u8, labels)

    monkeypatch.setattr(Trainer, "step_outputs", step_as_replayed)
    original = interrupt_training_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run_cell(project, tracking_uri, "small_cnn", "scratch", epochs=3, schedule="onecycle", lr=1e-3)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    _run_cell(project, tracking_uri, "small_cnn", "scratch", epochs=3, schedule="onecycle", lr=1e-3)

    steps = 3 * 3  # 12 training images in batches of 4, three epochs
    expected = [learning_rate("onecycle", 1e-3, s, steps) for s in range(steps)]
    assert len(captured) == 2, "the interrupted and the resumed attempt each make a Trainer"
    assert rates == pytest.approx(expected, rel=1e-6)


def test_a_finished_run_writes_no_last_resume_state_and_logs_every_epoch_and_one_model(project, tracking_uri,
                                                                                     monkeypatch):
    from transfer_study.checkpoints import WorkDir

    saved, save_epoch = [], WorkDir.save_epoch
    monkeypatch.setattr(WorkDir, "save_epoch", lambda self, state, best: (saved.append(state["epoch"]),
                                                                           save_epoch(self, state, best)))
    _, run_dir = _run_cell(project, tracking_uri, "small_cnn", "scratch", epochs=3, save_every_s=0.0)
    assert saved == [1, 2], "the last epoch wrote a resume state that the run folder makes useless"
    info = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(tracking_uri)
    assert [m.step for m in client.get_metric_history(info["run_id"], "val_acc")] == [1, 2, 3]
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == pd.read_csv(run_dir / "history.csv")["val_acc"].idxmax() + 1
    models_logged = client.search_logged_models(experiment_ids=[info["experiment_id"]],
                                                filter_string=f"source_run_id = '{info['run_id']}'")
    assert len(models_logged) == 1
    served = torch.load(Path(mlflow.artifacts.download_artifacts(info["model_uri"])) / "artifacts" / "weights.pt",
                        weights_only=True)
    assert all(torch.equal(served[k], best["model"][k].cpu()) for k in served), "the served weights are not best.pt's"


def test_a_run_stopped_while_its_run_folder_is_written_trains_its_last_epoch_again_and_logs_it_once(
        project, tracking_uri, monkeypatch):
    """The last epoch saves no resume state: Ctrl-C while the model is logged (after the last epochs'
    metrics were) resumes from the last save and trains that epoch again, logging it once."""
    log_model, calls = serve.log_servable_model, []

    def stopped_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return log_model(*args)

    monkeypatch.setattr(serve, "log_servable_model", stopped_once)
    with pytest.raises(KeyboardInterrupt):
        _run_cell(project, tracking_uri, "small_cnn", "scratch", epochs=3, save_every_s=0.0)
    _, run_dir = _run_cell(project, tracking_uri, "small_cnn", "scratch", epochs=3, save_every_s=0.0)
    info = json.loads((run_dir / "run.json").read_text())
    assert [m.step for m in MlflowClient(tracking_uri).get_metric_history(info["run_id"], "val_acc")] == [1, 2, 3]
    assert len(pd.read_csv(run_dir / "history.csv")) == 3


def test_changed_params_or_data_start_fresh_and_say_so(project, tracking_uri, monkeypatch, capsys):
    cell = Cell("efficientnet_lite0", "scratch", 0)

    def interrupted_run(at: int = 2, **overrides) -> str:
        """Train until Ctrl-C in this attempt's `at`-th epoch; gives back what the attempt printed."""
        capsys.readouterr()
        original = interrupt_training_at_epoch(monkeypatch, at)
        with pytest.raises(KeyboardInterrupt):
            train_cell(tiny_params(epochs=2, **overrides), cell, project, tracking_uri)
        monkeypatch.setattr(Trainer, "train_epoch", original)
        return capsys.readouterr().err

    def resume_dirs() -> set[Path]:
        return set((project / "checkpoints").glob(f"{cell.name}-*"))

    assert "starting fresh" not in interrupted_run()
    (first,) = resume_dirs()

    # A param that changes the result: a new resume folder, from epoch 1, and a line naming the old one.
    err = interrupted_run(lr=2e-4)
    assert f"starting fresh: params or data changed since '{first}'" in err and "resuming" not in err
    (second,) = resume_dirs() - {first}
    assert load_checkpoint(second / "resume.pt")["epoch"] == 1

    # One training image changes (and the manifest records it): fresh again.
    manifest = pd.read_csv(project / "data/split/manifest.csv")
    row = manifest.index[manifest["split"] == "train"][0]
    image = project / manifest.loc[row, "path"]
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    manifest.loc[row, "sha256"] = hashlib.sha256(image.read_bytes()).hexdigest()
    manifest.to_csv(project / "data/split/manifest.csv", index=False)
    err = interrupted_run(lr=2e-4)
    assert "starting fresh: params or data changed since" in err and "resuming" not in err
    assert str(first) in err and str(second) in err
    (third,) = resume_dirs() - {first, second}
    assert load_checkpoint(third / "resume.pt")["epoch"] == 1


def test_frozen_without_augmentation_trains_the_head_on_cached_features(project, tracking_uri, capsys, monkeypatch):
    """The backbone sees each image once; validation, training and the run's predictions take its
    features from there, and the predictions are the whole model's (best.pt) on the images."""
    from transfer_study.config import AugmentParams

    params = tiny_params(epochs=2, augment=AugmentParams(rotation=0.0, translate=0.0, hflip=False))
    trainer = Trainer(params, Cell("efficientnet_lite0", "frozen", 0), 3, torch.device("cpu"))
    data = imagestore.TrainingData(pd.read_csv(project / "data/split/manifest.csv"), project, 32, project / "cache")
    batches = list(data.on_device(torch.device("cpu")).in_order(data.rows("train"), 4))
    features, labels = trainer.cached_features(batches)
    images, _ = batches[0]
    with torch.no_grad():
        direct = trainer.model.forward_features(
            transforms.normalize(transforms.to_model_input(images, torch.device("cpu"), False)))
    torch.testing.assert_close(features[: len(direct)], direct)
    assert labels.tolist() == data.labels[data.rows("train")].tolist()

    seen = []  # images through the backbone, by the cached path or the whole model
    for method in ("forward_features", "forward"):
        original = getattr(models.TransferNet, method)
        monkeypatch.setattr(models.TransferNet, method,
                            lambda self, x, original=original: seen.append(len(x)) or original(self, x))
    run_dir = train_cell(params, Cell("efficientnet_lite0", "frozen", 0), project, tracking_uri)
    assert "cached features" in capsys.readouterr().err
    assert len(pd.read_csv(run_dir / "history.csv")) == 2
    predictions = pd.read_csv(run_dir / "predictions.csv")
    # each image once, for every epoch and split; then MLflow checks the logged model on its input example
    assert seen == [len(data.manifest), len(serve.example_images())] and len(predictions) == len(data.manifest)
    trainer.model.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    probs, _ = trainer.predict(data.on_device(torch.device("cpu")).in_order(np.arange(len(predictions)), 8))
    np.testing.assert_allclose(predictions.filter(like="prob_").to_numpy(), probs, atol=1e-5)


def test_crops_made_with_other_settings_stop_training_before_it_starts(project, tracking_uri):
    """The crops record their cropper; a profile asking for another one is an error naming both,
    not a model trained on one preprocessing and served with another."""
    import dataclasses

    params = tiny_params()
    other = dataclasses.replace(params, preprocess=dataclasses.replace(params.preprocess, cropper="none"))
    with pytest.raises(UserError) as error:
        train_cell(other, Cell("resnet18", "scratch", 0), project, tracking_uri)
    assert "cropper: crops 'foreground', profile 'none'" in str(error.value)
    assert "dvc repro preprocess" in str(error.value)
    assert not (project / "out").exists() and not (project / "checkpoints").exists()


def test_a_cell_ends_with_a_logged_model_where_only_mlflow_skinny_is_installed(project, tracking_uri, monkeypatch):
    """A training client often has mlflow-skinny, not mlflow: the model's requirements pin that one,
    and the check happens before the first epoch rather than after the last."""
    import importlib.metadata

    real_version = importlib.metadata.version

    def without_mlflow(name: str) -> str:
        if name == "mlflow":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version("mlflow") if name == "mlflow-skinny" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_mlflow)
    run_dir = train_cell(tiny_params(max_batches_per_epoch=1), Cell("resnet18", "scratch", 0), project,
                         tracking_uri)
    model_uri = json.loads((run_dir / "run.json").read_text())["model_uri"]
    requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text()
    assert f"mlflow-skinny=={real_version('mlflow')}" in requirements.splitlines()
    assert not any(line.startswith("mlflow==") for line in requirements.splitlines())


def test_a_missing_requirement_stops_the_cell_before_training(project, tracking_uri, monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version

    def without_torchvision(name: str) -> str:
        if name == "torchvision":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_torchvision)
    with pytest.raises(UserError, match="torchvision is not installed"):
        train_cell(tiny_params(), Cell("resnet18", "scratch", 0), project, tracking_uri)
    assert not (project / "checkpoints").exists(), "training started before the check"


def test_early_stopping_keeps_the_rules_best_epoch_and_records_how_the_run_ended(project, tracking_uri):
    """run.json and metrics.json record the training rule's outcome on the run's own history
    (stopping.progress), and best.pt holds the epoch the rule calls best."""
    from transfer_study.config import EarlyStoppingParams
    from transfer_study.stopping import progress, stop_rule

    rule = EarlyStoppingParams(patience_steps=3, min_steps=0, max_steps=12, lr_reductions=1, lr_factor=0.5)
    params, run_dir = _run_cell(project, tracking_uri, "small_cnn", "scratch", epochs=99, early_stopping=rule)
    info = json.loads((run_dir / "run.json").read_text())
    history = pd.read_csv(run_dir / "history.csv").to_dict("records")
    decision = progress(history, stop_rule(params.train, 3))  # 12 training images, batches of 4
    assert decision.stop and info["max_epochs"] == 4 and info["replicate"] == 0
    assert {k: info[k] for k in ("epochs", "best_epoch", "hit_cap")} == {
        "epochs": len(history), "best_epoch": decision.best_epoch, "hit_cap": decision.hit_cap}
    assert json.loads((run_dir / "metrics.json").read_text())["best_epoch"] == decision.best_epoch
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == decision.best_epoch
    run = MlflowClient(tracking_uri).get_run(info["run_id"])
    assert run.data.tags["replicate"] == "0" and run.data.metrics["best_epoch"] == decision.best_epoch
    assert run.data.params["train.early_stopping.patience_steps"] == "3"


def test_a_frozen_backbone_with_flips_caches_each_image_and_its_mirror_image(project):
    from transfer_study.config import AugmentParams

    params = tiny_params(augment=AugmentParams(rotation=0.0, translate=0.0, hflip=True))
    trainer = Trainer(params, Cell("efficientnet_lite0", "frozen", 0), 3, torch.device("cpu"))
    data = imagestore.TrainingData(pd.read_csv(project / "data/split/manifest.csv"), project, 32, project / "cache")
    batches = list(data.on_device(torch.device("cpu")).in_order(data.rows("train"), 4))
    mirrored, _ = trainer.cached_features(batches, flipped=True)
    images, _ = batches[0]
    with torch.no_grad():
        flipped = trainer.model.forward_features(
            transforms.normalize(transforms.to_model_input(images.flip(3), torch.device("cpu"), False)))
    torch.testing.assert_close(mirrored[: len(flipped)], flipped)
    features = torch.stack([trainer.cached_features(batches)[0], mirrored])
    seen = []
    trainer.trained = lambda batch: seen.append(batch.clone()) or trainer.model.head(batch)
    trainer.train_head_epoch(features, torch.zeros(features.shape[1], dtype=torch.long), torch.Generator().manual_seed(0),
                             None)
    rows = torch.cat(seen)
    from_mirror = [any(torch.equal(row, f) for f in features[1]) for row in rows]
    assert 0 < sum(from_mirror) < len(rows), "every image, or none, was flipped"
