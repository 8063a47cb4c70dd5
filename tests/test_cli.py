"""The CLI: bad input ends with one clear line and exit status 1, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from test_config import ISSUE_CASES

from transfer_study.cli import main

CLI = str(Path(sys.executable).parent / "transfer-study")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_missing_params_file_is_one_clear_line(tmp_path):
    result = _cli("split", cwd=tmp_path)
    assert result.returncode == 1
    assert "params file 'params.yaml' not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", ISSUE_CASES)
def test_train_with_a_mistyped_param_stops_before_mlflow(tmp_path, monkeypatch, capsys, text):
    """The real entry point: one `error:` line, exit 1, and no tracking store or run created."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["train"].update(yaml.safe_load(text))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store would be ./mlflow.db
    monkeypatch.setattr(sys, "argv", ["transfer-study", "--params", "bad.yaml", "train"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and out == ""
    assert err.splitlines() == [f"error: bad.yaml: {ISSUE_CASES[text]}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no mlflow.db, mlruns or outputs


def test_split_before_preprocess_says_what_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    result = _cli("split", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "dvc repro preprocess" in result.stderr


def test_train_unknown_architecture_names_the_param(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    result = _cli("train", "--arch", "alexnet", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train.architectures" in result.stderr


def test_validate_strict_fails_on_warnings_with_the_file_named(tmp_path):
    from PIL import Image

    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    for label in ("a", "b"):
        folder = tmp_path / "data" / "raw" / label
        folder.mkdir(parents=True)
        for n in range(4):
            Image.new("RGB", (40, 40), (n * 50, 10, 200 if label == "a" else 20)).save(folder / f"{n}.png")
    (tmp_path / "data/raw/a/broken.jpg").write_bytes(b"not a jpeg")
    relaxed = _cli("data", "validate", cwd=tmp_path)
    assert relaxed.returncode == 0, relaxed.stderr
    strict = _cli("data", "validate", "--strict", cwd=tmp_path)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert "broken.jpg" in strict.stdout + strict.stderr


def _tiny_params_file(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"].update(architectures=["resnet18"], conditions=["scratch"], epochs=1, batch_size=4,
                           image_size={"resnet18": 32, "vgg19": 32, "inception_v3": 299, "efficientnet_lite0": 32})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def _make_dry_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`make -n ARGS` in `project` on this Python's environment, with no GPU visible: make prints
    the commands and runs only the lines that call $(MAKE), i.e. the profile choice."""
    for name in ("Makefile", "requirements.lock", "pyproject.toml", "params.quick.yaml"):
        shutil.copy2(REPO_ROOT / name, project / name)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    # As a user types it, not as a sub-make of `make test` (which would print its directory too).
    for name in ("PROFILE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)
    venv = Path(sys.executable).parent.parent
    return subprocess.run(["make", "-n", *args, f"VENV={venv}"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_make_run_without_a_gpu_runs_the_quick_profile_and_says_so(tmp_path):
    _tiny_params_file(tmp_path)  # stands in for the study's params.yaml, so its estimate takes seconds
    result = _make_dry_run(tmp_path, "run")
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU here: the quick profile" in result.stderr
    assert "plan for params.yaml: 1 cell on cpu" in result.stderr  # the study's estimate, for the record
    commands = result.stdout.splitlines()
    assert commands[-3:] == ["transfer-study --params params.quick.yaml plan", "dvc repro profiles/quick/dvc.yaml",
                             "transfer-study --params params.quick.yaml next-steps"]
    assert "dvc repro" not in commands  # the study's pipeline

    study = _make_dry_run(tmp_path, "run", "PROFILE=study")
    assert study.returncode == 0, study.stderr
    assert ["transfer-study plan", "dvc repro", "transfer-study next-steps"] == study.stdout.splitlines()[-3:]


def test_profile_asked_for_is_kept_and_a_wrong_one_is_one_clear_line(tmp_path):
    _tiny_params_file(tmp_path)
    study = _cli("profile", "--params-file", "study", cwd=tmp_path)
    assert study.returncode == 0 and study.stdout.strip() == "params.yaml"
    wrong = _cli("profile", "big", cwd=tmp_path)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "PROFILE=big: choose one of study, quick" in wrong.stderr


def test_serve_before_any_run_says_to_train_first(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    result = _cli("serve", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "make run" in result.stderr and not (tmp_path / "mlflow.db").exists()


def test_validate_verbose_lists_conversions_and_the_size_images_are_upscaled_to(tmp_path, monkeypatch, capsys):
    """`data validate --verbose`: each conversion per file, and the upscale to the profile's largest input."""
    from PIL import Image

    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())  # inception_v3: 299 px
    for label in ("a", "b"):
        folder = tmp_path / "data" / "raw" / label
        folder.mkdir(parents=True)
        for n in range(3):
            Image.new("RGB", (200, 150), (n * 60, 10, 90 if label == "a" else 20)).save(folder / f"{n}.png")
    Image.new("CMYK", (200, 200), (0, 255, 255, 0)).save(tmp_path / "data/raw/a/print.jpg")
    Image.new("L", (28, 28), 128).save(tmp_path / "data/raw/b/thumb.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["transfer-study", "data", "validate", "--verbose"])
    main()
    out = capsys.readouterr().out
    assert "INFO: data/raw/a/print.jpg: CMYK colours converted to RGB" in out
    assert "INFO: data/raw/b/thumb.png: grayscale copied to the three RGB channels" in out
    assert "INFO: data/raw/b/thumb.png: 28x28 is far below the model's 299 px input: upscaled at least 10.7x" in out
    assert out.count("upscaled") == 1  # 200x150 is within 2x of 299 px


def test_train_of_an_excluded_cell_leaves_the_folder_dvc_expects(tmp_path, monkeypatch):
    """dvc.yaml's matrix has a stage for small_cnn-frozen too; it must leave models/small_cnn-frozen."""
    from click.testing import CliRunner

    from transfer_study import cli

    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.cli, ["train", "--arch", "small_cnn", "--condition", "frozen"], obj={})
    assert result.exit_code == 0, result.output
    assert "small_cnn-frozen is listed in train.exclude; nothing to train" in result.output
    assert (tmp_path / "models" / "small_cnn-frozen" / "EXCLUDED").is_file()
    assert not list((tmp_path / "models").glob("*/s*")), "an excluded cell left a run folder"
