"""Typed params: defaults match the committed files, bad values name the param at fault."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT

from transfer_study import config
from transfer_study.config import ConfigError


def test_committed_profiles_load():
    study = config.load_params(REPO_ROOT / "params.yaml")
    quick = config.load_params(REPO_ROOT / "params.quick.yaml")
    assert study.train.epochs == 50 and study.train.lr == 1e-4 and study.train.batch_size == 32
    assert set(study.train.architectures) == {"resnet18", "vgg19", "inception_v3", "small_cnn"}
    assert quick.paths.outputs != study.paths.outputs
    assert quick.tracking.experiment != study.tracking.experiment
    assert quick.tracking.registered_model != study.tracking.registered_model


@pytest.mark.parametrize(
    "section, change, fragment",
    [
        ("train", {"architectures": ["alexnet"]}, "train.architectures"),
        ("train", {"conditions": ["partial"]}, "train.conditions"),
        ("train", {"image_size": {"inception_v3": 64, "resnet18": 64, "vgg19": 64, "small_cnn": 28}}, "inception_v3"),
        ("train", {"checkpoint": "middle"}, "train.checkpoint"),
        ("split", {"train": 0.9}, "split ratios"),
        ("preprocess", {"cropper": "yolo"}, "preprocess.cropper"),
        ("train", {"learning_rate": 0.1}, "params.train.learning_rate"),
        ("train", {"exclude": []}, "add small_cnn-frozen to train.exclude"),
        ("train", {"conditions": ["scratch", "frozen", "finetune"]}, "add small_cnn-finetune to train.exclude"),
        ("train", {"image_size": {"resnet18": 224, "vgg19": 224, "inception_v3": 299, "small_cnn": 15}},
         "train.image_size.small_cnn = 15; use an integer of at least 16"),
        ("train", {"image_size": {"resnet18": 28, "vgg19": 224, "inception_v3": 299, "small_cnn": 28}},
         "train.image_size.resnet18 = 28; use an integer of at least 32"),
    ],
)
def test_bad_params_name_the_param(tmp_path, section, change, fragment):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw[section].update(change)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        config.load_params(path)
    assert fragment in str(error.value) and str(path) in str(error.value)


def test_the_study_profile_keeps_the_study_s_six_cells_and_adds_a_small_cnn_scratch_row():
    from transfer_study.cells import cells_for

    study = [c.name for c in cells_for(config.load_params(REPO_ROOT / "params.yaml"))]
    assert study == [f"{a}-{c}-s0" for a in ("resnet18", "vgg19", "inception_v3") for c in ("scratch", "frozen")] + [
        "small_cnn-scratch-s0"]
    quick = config.load_params(REPO_ROOT / "params.quick.yaml")
    assert "small_cnn-scratch-s0" in [c.name for c in cells_for(quick)]
    assert quick.train.image_size["small_cnn"] == 28 == config.TrainParams().image_size["small_cnn"]


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_params(broken)


def test_tracking_uri_is_absolute_sqlite_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert config.tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5555")
    assert config.tracking_uri(tmp_path) == "http://127.0.0.1:5555"


def test_flatten_params_covers_nested_values():
    flat = config.flatten_params(config.Params())
    assert flat["train.augment.rotation"] == "15.0"
    assert flat["train.image_size.inception_v3"] == "299"
    assert flat["train.architectures"] == "resnet18,vgg19,inception_v3"


def test_conda_yaml_carries_the_lock_pins():
    """`mlflow run` without --env-manager local builds conda.yaml: it must match requirements.lock."""
    lock = {line.strip() for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    conda = yaml.safe_load((REPO_ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert set(pip_section) == lock
    assert "torch==2.15.0" in lock and "torchvision==0.29.2" in lock
