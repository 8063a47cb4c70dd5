"""Checkpoint files: checksums beside them, verified before use (fault cases: test_faults.py)."""

from __future__ import annotations

import pytest

from transfer_study import checkpoints
from transfer_study.config import UserError


def test_corrupt_checkpoint_is_reported_not_loaded(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        checkpoints.load_checkpoint(bad)
