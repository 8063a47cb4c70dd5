"""Checkpoint files: checksums beside them, verified before use; the resume folders of a cell
(fault cases through training: test_faults.py; resume itself: test_train.py)."""

from __future__ import annotations

import pytest
import torch

from transfer_study import checkpoints
from transfer_study.config import UserError


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
    with pytest.raises(UserError, match="not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")


def test_stale_work_dirs_are_the_cells_other_fingerprints(tmp_path):
    for name in ("resnet18-scratch-s0-0123456789ab", "resnet18-scratch-s0-ba9876543210",
                 "resnet18-scratch-s01-0123456789ab", "resnet18-scratch-s0-notafingerpr", "stores"):
        (tmp_path / name).mkdir()
    current = tmp_path / "resnet18-scratch-s0-0123456789ab"
    assert checkpoints.stale_work_dirs(tmp_path, "resnet18-scratch-s0", current) == [
        tmp_path / "resnet18-scratch-s0-ba9876543210"]
