"""params_check.py: the check-params stage finds what would make `dvc repro` fail after deleting outputs."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import REPO_ROOT

from transfer_study import params_check
from transfer_study.config import ConfigError


@pytest.fixture
def project(tmp_path):
    """The committed pipelines and params files, in a folder of their own."""
    for name in ("dvc.yaml", "params.yaml", "params.quick.yaml", "profiles/quick/dvc.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    return tmp_path


def edit(path, change) -> None:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_committed_pipelines_pass_and_list_what_their_stages_track(project):
    assert params_check.check_pipelines(project) == ["params.yaml: checked", "params.quick.yaml: checked"]
    quick = params_check.tracked_params(yaml.safe_load((project / "profiles/quick/dvc.yaml").read_text()),
                                        "profiles/quick")
    assert set(quick) == {"params.quick.yaml"}  # resolved from the stages' wdir, ../..
    assert {"train.epochs", "train.label_smoothing", "preprocess", "tracking.registered_model"} <= set(
        quick["params.quick.yaml"])
    study = params_check.tracked_params(yaml.safe_load((project / "dvc.yaml").read_text()), ".")
    assert set(study) == {"params.yaml"} and "train.epochs" in study["params.yaml"]


def test_the_issue_s_typo_is_named_with_the_key_it_meant(project):
    """`epochs: 4` edited to `epoch: 3`: the misspelt key is unknown, and the right one missing."""
    edit(project / "params.quick.yaml", lambda raw: raw["train"].update(epoch=raw["train"].pop("epochs")))
    with pytest.raises(ConfigError, match=r"params.quick.yaml: unknown param\(s\) train.epoch "
                                          r"\(did you mean train.epochs\?\)"):
        params_check.check_pipelines(project)


def test_a_missing_param_a_stage_tracks_is_named_with_its_default(project):
    edit(project / "params.quick.yaml", lambda raw: raw["train"].pop("label_smoothing"))
    with pytest.raises(ConfigError, match=r"params.quick.yaml: train.label_smoothing is missing, and "
                                          r"profiles/quick/dvc.yaml tracks it; add it back, e.g. train.label_smoothing: 0.0"):
        params_check.check_pipelines(project)


def test_profiles_that_share_the_crops_must_make_them_alike(project):
    """The README's cropper advice edits both files; one forgotten would stop training after DVC deleted its models."""
    edit(project / "params.yaml", lambda raw: raw["preprocess"].update(cropper="none"))
    with pytest.raises(ConfigError, match=r"params.yaml and params.quick.yaml share the crops in 'data/cropped' but "
                                          r"not their preprocess settings \(cropper: 'none' vs 'foreground'\)"):
        params_check.check_pipelines(project)


def test_a_target_imagenet_does_not_have_is_caught_before_any_stage(project):
    for name in ("params.yaml", "params.quick.yaml"):
        edit(project / name, lambda raw: raw["preprocess"].update(cropper="proposals", targets=["temple"]))
    with pytest.raises(ConfigError, match="params.yaml: preprocess.targets: 'temple' is not an ImageNet class"):
        params_check.check_pipelines(project)


def test_the_note_never_changes(project):
    first = params_check.write_note(project).read_bytes()
    edit(project / "params.quick.yaml", lambda raw: raw["train"].update(epochs=7))
    assert params_check.write_note(project).read_bytes() == first  # so no later stage reruns for it
