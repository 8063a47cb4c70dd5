"""Checkpoint files: checksums beside them, verified before use; the resume folders of a cell
(fault cases through training: test_faults.py; resume itself: test_train.py)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import re

import pandas as pd
import pytest
import torch

from transfer_study import checkpoints
from transfer_study.cells import Cell
from transfer_study.config import Params, SplitParams, UserError
from transfer_study.split import manifest_frame


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoint_with_a_flipped_byte_and_its_old_checksum_is_refused(tmp_path):
    path = tmp_path / "best.pt"
    weights = torch.arange(1000.0)
    digest = checkpoints.atomic_save({"model": {"w": weights}, "epoch": 3}, path)
    assert checkpoints.checksum_path(path).read_text().split() == [digest, "best.pt"]
    assert torch.equal(checkpoints.load_checkpoint(path)["model"]["w"], weights)

    flip_byte(path, path.read_bytes().find(weights.numpy().tobytes()) + 400)  # inside the tensor's bytes
    # torch.load alone takes the damaged file and gives other weights: only the checksum can tell.
    assert not torch.equal(torch.load(path, weights_only=False)["model"]["w"], weights)
    assert checkpoints.checksum_path(path).read_text().split() == [digest, "best.pt"]  # a valid-looking .sha256
    for load in (checkpoints.load_checkpoint, checkpoints.verify_checksum):
        with pytest.raises(UserError, match="checksum mismatch") as error:
            load(path)
        assert f"'{path}' is corrupt" in str(error.value) and "delete it and rerun" in str(error.value)


def test_a_checkpoint_is_checked_against_the_checksum_the_caller_expects(tmp_path):
    path = tmp_path / "best-e1.pt"
    digest = checkpoints.atomic_save({"epoch": 1}, path)
    assert checkpoints.verify_checksum(path, digest) == digest
    with pytest.raises(UserError, match="checksum mismatch"):
        checkpoints.load_checkpoint(path, expected_sha256="0" * 64)  # another file than the state names


def test_checkpoint_without_its_checksum_is_not_trusted(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}}, path)  # written by something other than atomic_save
    with pytest.raises(UserError, match="no checksum file 'last.pt.sha256'"):
        checkpoints.load_checkpoint(path)
    message = f"checkpoint '{tmp_path / 'missing.pt'}' not found; delete '{tmp_path}' and rerun to train again"
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")


def test_stale_work_dirs_are_the_cells_other_fingerprints(tmp_path):
    for name in ("resnet18-scratch-s0-0123456789ab", "resnet18-scratch-s0-ba9876543210",
                 "resnet18-scratch-s01-0123456789ab", "resnet18-scratch-s0-notafingerpr", "stores"):
        (tmp_path / name).mkdir()
    current = tmp_path / "resnet18-scratch-s0-0123456789ab"
    assert checkpoints.stale_work_dirs(tmp_path, "resnet18-scratch-s0", current) == [
        tmp_path / "resnet18-scratch-s0-ba9876543210"]


def _manifest(seed: int = 0, repeats: int = 1) -> pd.DataFrame:
    """A split manifest of 3 classes × 10 images, as `split` writes it (repeat 0 in `split`)."""
    items = pd.DataFrame({"path": [f"c/{k}/{i}.png" for k in "abc" for i in range(10)],
                          "label": [k for k in "abc" for _ in range(10)],
                          "sha256": [f"{k}{i:063x}" for k in "abc" for i in range(10)]})
    return manifest_frame(items, SplitParams(seed=seed, repeats=repeats))


def test_the_fingerprint_changes_when_an_image_moves_to_another_split():
    """A resume continues a model whose earlier epochs saw the train split: if split.seed (or the
    ratios) moved an image into val or test, the same contents under the same labels must not resume."""
    params, cell = Params(), Cell("resnet18", "scratch", 0)
    manifest = _manifest(seed=0)
    fingerprint = checkpoints.result_fingerprint(params, cell, manifest)
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint)
    reseeded = _manifest(seed=1)
    assert sorted(zip(reseeded["sha256"], reseeded["label"])) == sorted(zip(manifest["sha256"], manifest["label"]))
    assert checkpoints.result_fingerprint(params, cell, reseeded) != fingerprint
    swapped = manifest.copy()
    train, val = swapped.index[swapped["split"] == "train"][0], swapped.index[swapped["split"] == "val"][0]
    swapped.loc[[train, val], "split"] = ["val", "train"]  # one image in each direction
    assert checkpoints.result_fingerprint(params, cell, swapped) != fingerprint
    # Neither the row order nor the cells params list change a cell's result.
    shuffled = manifest.sample(frac=1, random_state=0)
    assert checkpoints.result_fingerprint(params, cell, shuffled) == fingerprint
    more_cells = dataclasses.replace(params, train=dataclasses.replace(params.train, seeds=(0, 1, 2)))
    assert checkpoints.result_fingerprint(more_cells, cell, manifest) == fingerprint
    other_cell = Cell("resnet18", "scratch", 1)
    assert checkpoints.result_fingerprint(params, other_cell, manifest) != fingerprint


def test_the_fingerprint_changes_with_an_images_label_and_not_with_the_order_params_list_sizes():
    params, cell = Params(), Cell("resnet18", "scratch", 0)
    manifest = _manifest()
    fingerprint = checkpoints.result_fingerprint(params, cell, manifest)
    relabelled = manifest.copy()
    relabelled.loc[0, "label"] = "b"  # the same image moved to another class folder
    assert checkpoints.result_fingerprint(params, cell, relabelled) != fingerprint
    # params.yaml lists image sizes in any order: the same sizes are the same result
    reordered = dict(reversed(list(params.train.image_size.items())))
    assert list(reordered) != list(params.train.image_size)
    same = dataclasses.replace(params, train=dataclasses.replace(params.train, image_size=reordered))
    assert checkpoints.result_fingerprint(same, cell, manifest) == fingerprint
    cropped = dataclasses.replace(params, preprocess=dataclasses.replace(params.preprocess, margin=0.2))
    assert checkpoints.result_fingerprint(cropped, cell, manifest) != fingerprint


def test_a_checkpoint_saved_into_a_new_folder_has_its_checksum_beside_it(tmp_path):
    """Each checkpoint is written once (issue 23: no copies), hashed while it is written."""
    target = tmp_path / "models" / "cell" / "best.pt"  # folders made as needed
    weights = {"w": torch.arange(10.0)}
    digest = checkpoints.atomic_save(weights, target)
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    assert checkpoints.checksum_path(target).read_text() == f"{digest}  best.pt\n"
    assert torch.equal(checkpoints.load_checkpoint(target)["w"], weights["w"])
    assert sorted(p.name for p in target.parent.iterdir()) == ["best.pt", "best.pt.sha256"]  # no temp files


@pytest.mark.parametrize("failure, said", [
    (OSError(errno.ENOSPC, "No space left on device"),
     "no space left on the device; free disk space and rerun the same command (training resumes from the last "
     "finished epoch)"),
    (OSError(errno.EACCES, "Permission denied"),
     "Permission denied; check the folder is writable, free disk space and rerun"),
    (RuntimeError("[enforce fail at inline_container.cc] unexpected pos"),
     "[enforce fail at inline_container.cc] unexpected pos; check the folder is writable, free disk space and rerun"),
], ids=["full disk", "not writable", "torch's bare error"])
def test_a_failed_write_says_why_and_leaves_no_temp_files(tmp_path, failure, said):
    path = tmp_path / "last.pt"

    def write(handle):
        handle.write(b"part of a checkpoint")
        raise failure

    with pytest.raises(UserError) as error:
        checkpoints._atomic_write(path, write)
    assert str(error.value) == f"could not write checkpoint '{path}': {said}"
    assert list(tmp_path.iterdir()) == []


def test_a_work_dir_keeps_one_best_file_and_checks_it_against_the_state(tmp_path):
    work = checkpoints.WorkDir(tmp_path / "checkpoints" / "resnet18-scratch-s0-0123456789ab")
    first, second = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    work.save_epoch({"epoch": 1, "best_epoch": 1}, first)
    work.save_epoch(work.load_state() | {"epoch": 2}, None)  # no improvement: the best file stays
    state = work.load_state()
    assert state["epoch"] == 2 and sorted(p.name for p in work.path.iterdir()) == [
        "best-e1.pt", "best-e1.pt.sha256", "resume.pt", "resume.pt.sha256"]
    work.check_best(state)
    work.save_epoch(state | {"epoch": 3, "best_epoch": 3}, second)
    state = work.load_state()
    assert sorted(p.name for p in work.path.glob("best-*")) == ["best-e3.pt", "best-e3.pt.sha256"]
    assert torch.equal(checkpoints.load_checkpoint(work.best_file(3), state["best_sha256"])["w"], second["w"])
    # A valid checkpoint with its own checksum file, but not the one the state names: refused.
    checkpoints.atomic_save(first, work.best_file(3))
    with pytest.raises(UserError, match="checksum mismatch"):
        work.check_best(state)


def test_a_work_dir_remembers_its_mlflow_run_and_is_removed_whole(tmp_path):
    work = checkpoints.WorkDir(tmp_path / "checkpoints" / "cell-0123456789ab")
    assert work.read_run_id() is None and work.load_state() is None
    work.write_run_id("0" * 32)  # makes its folders
    work.write_run_id("a" * 32)  # and again, replacing it
    assert work.read_run_id() == "a" * 32 and (work.path / "run_id").read_text() == "a" * 32 + "\n"
    assert sorted(p.name for p in work.path.iterdir()) == ["run_id"]
    (work.path / "run_id").write_text("\n")
    assert work.read_run_id() is None  # an empty file names no run
    work.remove()
    assert not work.path.exists() and (tmp_path / "checkpoints").is_dir()
    work.remove()  # nothing left to remove: no error
