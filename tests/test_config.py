"""Typed params: defaults match the committed files, bad values name the param at fault."""

from __future__ import annotations

import dataclasses
import re

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
    extensions = [config.load_params(REPO_ROOT / f"params.{name}.yaml") for name in ("robust", "tuned")]
    names = {p.tracking.registered_model for p in (study, quick, *extensions)}
    assert len(names) == 4, "each profile registers its own model"
    robust = extensions[0]
    assert robust.data.replicates >= 10 and quick.data.replicates >= 6, "the issue-20 minimum of independent units"
    assert robust.train.early_stopping and quick.train.early_stopping and study.train.early_stopping is None
    assert study.data.replicates == 1 and not study.data.external_per_class, "the study stays the published protocol"
    assert extensions[1].train.schedule == "onecycle" and study.train.schedule == "constant"


@pytest.mark.parametrize(
    "section, change, fragment",
    [
        ("train", {"architectures": ["alexnet"]}, "train.architectures"),
        ("train", {"conditions": ["partial"]}, "train.conditions"),
        ("train", {"image_size": {"inception_v3": 64, "resnet18": 64, "vgg19": 64, "small_cnn": 28}}, "inception_v3"),
        ("train", {"checkpoint": "middle"}, "train.checkpoint"),
        ("split", {"train": 0.9}, "split ratios"),
        ("preprocess", {"cropper": "yolo"}, "preprocess.cropper"),
        ("train", {"learning_rate": 0.1}, "unknown param(s) train.learning_rate"),
        ("train", {"exclude": []}, "add small_cnn-frozen to train.exclude"),
        ("train", {"conditions": ["scratch", "frozen", "finetune"]}, "add small_cnn-finetune to train.exclude"),
        ("train", {"image_size": {"resnet18": 224, "vgg19": 224, "inception_v3": 299, "small_cnn": 15}},
         "train.image_size.small_cnn = 15; use an integer of at least 16"),
        ("train", {"image_size": {"resnet18": 28, "vgg19": 224, "inception_v3": 299, "small_cnn": 28}},
         "train.image_size.resnet18 = 28; use an integer of at least 32"),
        ("executor", {"kind": "dask"}, "executor.kind = 'dask'; choose from local, ray"),
        ("executor", {"num_gpus": 1.5}, "executor.num_gpus = 1.5; use 0, a fraction"),
        ("executor", {"num_gpus": 0, "num_cpus": 0}, "give CPU runs executor.num_cpus"),
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


def write_params(tmp_path, section: str, text: str):
    """params.yaml with `text` (YAML, as a user types it) merged into one section; gives back its path."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw[section].update(yaml.safe_load(text))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# Issue 11's cases: before, a comparison of str with int, a traceback, "train.seeds is empty"
# or "unknown condition 's'". Each message names the key, the value, the type and an example.
ISSUE_CASES = {
    "lr: five": "train.lr = 'five' is a string; expected a number, e.g. 0.0001",
    "epochs: five": "train.epochs = 'five' is a string; expected an integer, e.g. 50",
    "seeds: 1": "train.seeds = 1 is an integer; expected a list of integers, e.g. [1]",
    "seeds: 0": "train.seeds = 0 is an integer; expected a list of integers, e.g. [0]",
    "conditions: scratch": "train.conditions = 'scratch' is a string; expected a list of text values, e.g. [scratch]",
    "batch_size: 3.5": "train.batch_size = 3.5 is a number with a decimal point; expected an integer, e.g. 32",
}


@pytest.mark.parametrize("text", ISSUE_CASES)
def test_param_of_the_wrong_type_is_named_with_an_example(tmp_path, text):
    path = write_params(tmp_path, "train", text)
    with pytest.raises(ConfigError) as error:
        config.load_params(path)
    assert str(error.value) == f"{path}: {ISSUE_CASES[text]}"


@pytest.mark.parametrize("text, value", [("lr: 1e-4", 1e-4), ("lr: 5E-3", 5e-3), ("lr: 1.0e3", 1000.0)])
def test_exponents_yaml_reads_as_text_are_accepted_as_numbers(tmp_path, text, value):
    """PyYAML reads 1e-4 (no dot) and 1.0e3 (no exponent sign) as strings; the user means numbers."""
    assert isinstance(yaml.safe_load(text)["lr"], str)
    lr = config.load_params(write_params(tmp_path, "train", text)).train.lr
    assert lr == value and type(lr) is float


def test_an_integer_is_accepted_as_a_float(tmp_path):
    lr = config.load_params(write_params(tmp_path, "train", "lr: 1")).train.lr
    assert lr == 1.0 and type(lr) is float


@pytest.mark.parametrize(
    "section, text, message",
    [
        ("train", "epochs: true", "train.epochs = true is a boolean (true/false); expected an integer, e.g. 50"),
        ("train", "aux_logits: 1", "train.aux_logits = 1 is an integer; expected true or false, e.g. true"),
        ("train", "lr: nan", "train.lr = 'nan' is a string; expected a number, e.g. 0.0001"),
        ("split", "train: '0.7'", "split.train = '0.7' is a string; expected a number, e.g. 0.7 (write it without quotes)"),
        ("train", "augment: {rotation: wide}", "train.augment.rotation = 'wide' is a string; expected a number, e.g. 15.0"),
        ("train", "image_size: {resnet18: 224.0}", "train.image_size.resnet18 = 224.0 is a number with a decimal point"),
        ("train", "image_size: 224", "train.image_size = 224 is an integer; expected a mapping of names to integers"),
        ("train", "seeds: [0, one]", "train.seeds[1] = 'one' is a string; expected an integer, e.g. 0"),
        ("train", "max_batches_per_epoch: all", "expected an integer or null, e.g. null or 10"),
        ("train", "weights_dir: 7", "train.weights_dir = 7 is an integer; expected text or null, e.g. null (quote it: '7')"),
        ("tracking", "experiment: 2024", "expected text, e.g. transfer-study (quote it: '2024')"),
        ("train", "epochs: null", "train.epochs = null is empty; expected an integer, e.g. 50"),
        ("train", "seeds: []", "train.seeds is empty; give at least one, e.g. [0]"),
        ("train", "lr: -1e-3", "train.lr = -0.001; use a positive number"),
        ("train", "epoch: 5", "unknown param(s) train.epoch (did you mean train.epochs?)"),
    ],
)
def test_type_errors_name_key_value_type_and_example(tmp_path, section, text, message):
    path = write_params(tmp_path, section, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load_params(path)


def test_a_section_or_file_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train = 5 is an integer; expected a mapping"):
        config.load_params(path)
    path.write_text("- train\n")
    with pytest.raises(ConfigError, match="the file holds a list; expected a mapping"):
        config.load_params(path)


def test_every_default_round_trips_through_yaml(tmp_path):
    """Every field's annotation is one the checker knows, and the defaults pass it unchanged."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    raw = {section: {k: plain(v) for k, v in values.items()}
           for section, values in dataclasses.asdict(config.Params()).items()}
    raw["train"]["augment"] = dataclasses.asdict(config.AugmentParams())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert config.load_params(path) == config.Params()


def test_the_study_profile_keeps_the_study_s_six_cells_and_adds_a_small_cnn_scratch_row():
    from transfer_study.cells import cells_for

    study = [c.name for c in cells_for(config.load_params(REPO_ROOT / "params.yaml"))]
    assert study == [f"{a}-{c}-s0" for a in ("resnet18", "vgg19", "inception_v3") for c in ("scratch", "frozen")] + [
        "small_cnn-scratch-s0"]
    quick = config.load_params(REPO_ROOT / "params.quick.yaml")
    assert "small_cnn-scratch-s0" in [c.name for c in cells_for(quick)]
    assert quick.train.image_size["small_cnn"] == 28 == config.TrainParams().image_size["small_cnn"]


def test_missing_or_broken_params_file(tmp_path):
    missing = f"params file '{tmp_path / 'nope.yaml'}' not found; run from the project root or pass --params"
    with pytest.raises(ConfigError, match=f"^{re.escape(missing)}$"):
        config.load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match=f"^{re.escape(f'params file {str(broken)!r} is not valid YAML: ')}"
                                          "while parsing a flow sequence"):
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


def test_the_default_dataset_version_is_the_one_data_dvc_records(tmp_path):
    """The report compares with the study only on this version: the constant must follow data.dvc."""
    assert config.recorded_dataset_md5(REPO_ROOT) == config.DEFAULT_DATASET_MD5
    assert config.recorded_dataset_md5(tmp_path) == "unknown"  # no data.dvc: not the default dataset
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123.dir\n  path: data/raw\n")
    assert config.recorded_dataset_md5(tmp_path) == "0123.dir"
    (tmp_path / "data.dvc").write_text("- not a dvc file\n")
    with pytest.raises(ConfigError, match="data.dvc' is not a DVC file"):
        config.recorded_dataset_md5(tmp_path)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"repeats": 0}, "split.repeats"),
        ({"repeats": 2.5}, "split.repeats"),
        ({"repeats": True}, "split.repeats"),
        ({"seed": -1}, "split.seed"),
        ({"train_fractions": []}, "split.train_fractions"),
        ({"train_fractions": 0.5}, "split.train_fractions"),
        ({"train_fractions": [0.5, 0]}, "(0, 1]"),
        ({"train_fractions": [1.5]}, "(0, 1]"),
        ({"train_fractions": ["half"]}, "split.train_fractions[0] = 'half' is a string"),
        ({"train_fractions": [0.5, 0.5]}, "twice"),
    ],
)
def test_bad_split_repeats_or_fractions_name_the_param(tmp_path, change, fragment):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["split"].update(change)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        config.load_params(path)


def test_split_repeats_and_fractions_default_to_the_study_and_load_from_yaml(tmp_path):
    assert config.load_params(REPO_ROOT / "params.yaml").split == config.SplitParams()
    assert config.SplitParams().repeats == 1 and config.SplitParams().train_fractions == (1.0,)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["split"].update({"repeats": 3, "train_fractions": [0.1, 0.25, 1]})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    split = config.load_params(path).split
    assert split.repeats == 3 and split.train_fractions == (0.1, 0.25, 1)


def test_replicates_and_the_external_set_are_checked_against_what_fashion_mnist_holds(tmp_path):
    for data, match in (({"replicates": 21}, "data.replicates = 21; .* 1 to 20 disjoint replicates"),
                        ({"replicates": 7, "per_class": 1000}, "1 to 6 disjoint replicates"),
                        ({"replicates": 0}, "data.replicates = 0"),
                        ({"external_per_class": 1001}, "data.external_per_class = 1001")):
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": data}))
        with pytest.raises(ConfigError, match=match):
            config.load_params(tmp_path / "p.yaml")
def test_a_ray_executor_needs_a_named_cluster(monkeypatch):
    """Never a cluster started on the fly: a forgotten address would train everything here, quietly."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        config.ray_address(config.ExecutorParams(kind="ray"))
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert config.ray_address(config.ExecutorParams(kind="ray")) == "head:6379"
    assert config.ray_address(config.ExecutorParams(kind="ray", ray_address="auto")) == "auto"
    assert config.ExecutorParams(num_gpus=0.5).cpus_per_run == 0 and config.ExecutorParams(num_gpus=0).cpus_per_run == 1
