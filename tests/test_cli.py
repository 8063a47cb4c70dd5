"""The CLI: bad input ends with one clear line and exit status 1, never a traceback."""

from __future__ import annotations

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
