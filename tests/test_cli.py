"""The CLI: bad input ends with one clear line and exit status 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

CLI = str(Path(sys.executable).parent / "transfer-study")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_missing_params_file_is_one_clear_line(tmp_path):
    result = _cli("split", cwd=tmp_path)
    assert result.returncode == 1
    assert "params file 'params.yaml' not found" in result.stderr
    assert "Traceback" not in result.stderr


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
