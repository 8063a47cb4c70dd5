"""Checkpoint files and a cell's resume state.

Every checkpoint is written atomically with a `.sha256` file beside it, and is checked
against it before it is loaded: a corrupt file is reported, never used. The resumable
state of a cell lives outside DVC's outs (DVC deletes outs before a stage runs), under
`checkpoints/<cell>-<fingerprint>/` (WorkDir), keyed by the run name and a hash of the
params and data that affect the result, so a rerun after Ctrl-C, a crash or SIGKILL
resumes from the last finished epoch, and only when nothing that matters changed.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import torch

from .cells import Cell
from .checksums import file_sha256
from .config import Params, UserError

CHECKPOINT_DIR = "checkpoints"


def result_fingerprint(params: Params, cell: Cell, manifest: pd.DataFrame) -> str:
    """Hash of everything that changes the result of a cell: a resume is only
    trusted when this matches."""
    relevant = {
        "train": dataclasses.asdict(params.train),
        "preprocess": dataclasses.asdict(params.preprocess),
        "cell": dataclasses.asdict(cell),
        "data": sorted(zip(manifest["sha256"], manifest["split"], manifest["label"])),
    }
    relevant["train"].pop("architectures")
    relevant["train"].pop("conditions")
    relevant["train"].pop("seeds")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stale_work_dirs(checkpoint_dir: Path, cell_name: str, current: Path) -> list[Path]:
    """The cell's resume folders other than `current`: written under another fingerprint, that is,
    before params or data that change the result were changed."""
    pattern = re.compile(re.escape(cell_name) + r"-[0-9a-f]{12}")
    return sorted(p for p in checkpoint_dir.glob(f"{cell_name}-*")
                  if p.is_dir() and p != current and pattern.fullmatch(p.name))


class _HashingWriter:
    """A binary file wrapper that hashes what passes through it and keeps the first write error
    (torch.save reports a failed write as a bare RuntimeError; the OSError says why)."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.digest, self.error = handle, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            written = self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.digest.update(data)
        return written

    def flush(self) -> None:
        self.handle.flush()


def checksum_path(path: Path) -> Path:
    """Where the SHA-256 of `path` is kept: `<name>.sha256`, in `sha256sum` format."""
    return path.with_name(path.name + ".sha256")


def _write_failure(path: Path, exc: BaseException) -> str:
    """What to tell the user when writing `path` failed."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"could not write checkpoint '{path}': no space left on the device; free disk space and rerun "
                "the same command (training resumes from the last finished epoch)")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"could not write checkpoint '{path}': {reason}; check the folder is writable, free disk space and rerun"


def _atomic_write(path: Path, write: Callable[[_HashingWriter], None]) -> str:
    """write() into a temp file, fsync, then rename it and its checksum file into place.

    A crash or a full disk never leaves a truncated file under the real name, and the temp
    files are removed on failure. Returns the file's SHA-256; raises UserError on failure.
    """
    tmp = path.with_name(path.name + ".tmp")
    sidecar = checksum_path(path)
    sidecar_tmp = sidecar.with_name(sidecar.name + ".tmp")
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            writer = _HashingWriter(handle)
            write(writer)
            handle.flush()
            os.fsync(handle.fileno())
        digest = writer.digest.hexdigest()
        with open(sidecar_tmp, "w") as handle:
            handle.write(f"{digest}  {path.name}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        os.replace(sidecar_tmp, sidecar)
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError when a write fails
        tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)
        raise UserError(_write_failure(path, writer.error if writer and writer.error else exc)) from None
    return digest


def atomic_save(obj: object, path: Path) -> str:
    """torch.save `obj` to `path` atomically, with `path.sha256` beside it; returns the SHA-256."""
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def copy_checkpoint(source: Path, target: Path) -> str:
    """Copy a verified checkpoint (and its checksum) atomically; returns the SHA-256."""
    expected = verify_checksum(source)
    with open(source, "rb") as handle:
        digest = _atomic_write(target, lambda out: shutil.copyfileobj(handle, out, 1 << 20))
    if digest != expected:
        raise UserError(f"checkpoint '{source}' changed while it was copied to '{target}'; rerun")
    return digest


def verify_checksum(path: Path, expected: str | None = None) -> str:
    """Check `path` against `expected`, or else against its `.sha256` file; return the SHA-256.

    Raises UserError naming the file when it is missing, has no checksum or does not match it.
    """
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found; delete '{path.parent}' and rerun to train again")
    if expected is None:
        sidecar = checksum_path(path)
        if not sidecar.is_file():
            raise UserError(f"checkpoint '{path}' has no checksum file '{sidecar.name}', so it cannot be told "
                            "from a corrupt one; delete it and rerun to train again")
        expected = (sidecar.read_text().split() or [""])[0]
    actual = file_sha256(path)
    if actual != expected:
        raise UserError(f"checkpoint '{path}' is corrupt: checksum mismatch (SHA-256 {actual[:16]}…, "
                        f"expected {expected[:16]}…); delete it and rerun to train again")
    return actual


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> dict:
    """Load a checkpoint written by atomic_save after verifying its checksum; a corrupt file is
    a clear error, never used."""
    verify_checksum(path, expected_sha256)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the file cannot be trusted
        raise UserError(f"checkpoint '{path}' is corrupt or unreadable ({type(exc).__name__}); "
                        f"delete it and rerun to train again") from None


class WorkDir:
    """The resumable state of one cell, outside DVC's outs: `checkpoints/<cell>-<fingerprint>/`.

    - `resume.pt`: model, optimiser, RNG, history, best epoch (and its SHA-256) and MLflow run id,
      after the last finished epoch;
    - `best-e<k>.pt`: the best weights so far, of the epoch resume.pt names;
    - `run_id`: the MLflow run, written as soon as it exists, so a crash before the first
      checkpoint continues that run instead of starting another.
    """

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_run(cls, root: Path, run_name: str, fingerprint: str) -> WorkDir:
        """The resume folder of run `run_name` (a cells.Cell's name) under `root`'s checkpoints/."""
        return cls(Path(root) / CHECKPOINT_DIR / f"{run_name}-{fingerprint}")

    @property
    def state_file(self) -> Path:
        return self.path / "resume.pt"

    def best_file(self, epoch: int) -> Path:
        return self.path / f"best-e{epoch}.pt"

    def load_state(self) -> dict | None:
        """The verified resume state, or None when the cell starts from scratch."""
        return load_checkpoint(self.state_file) if self.state_file.is_file() else None

    def check_best(self, state: dict) -> None:
        """Verify that the best checkpoint is the one the state names (rank 0, on resume)."""
        verify_checksum(self.best_file(state["best_epoch"]), state["best_sha256"])

    def save_epoch(self, state: dict, best_weights: dict | None) -> None:
        """Write the new best weights (when this epoch improved them), then the state naming them,
        then drop best files of other epochs. A crash in between leaves the previous state, and
        the files it names, intact."""
        if best_weights is not None:
            state["best_sha256"] = atomic_save(best_weights, self.best_file(state["best_epoch"]))
        atomic_save(state, self.state_file)
        keep = self.best_file(state["best_epoch"])
        for stale in self.path.glob("best-e*.pt"):
            if stale != keep:
                stale.unlink(missing_ok=True)
                checksum_path(stale).unlink(missing_ok=True)

    @property
    def run_id_file(self) -> Path:
        """Written when the cell's MLflow run starts: while it exists, a rerun here continues that run."""
        return self.path / "run_id"

    def read_run_id(self) -> str | None:
        path = self.run_id_file
        if not path.is_file():
            return None
        return path.read_text().strip() or None

    def write_run_id(self, run_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / "run_id.tmp"
        tmp.write_text(run_id + "\n")
        os.replace(tmp, self.run_id_file)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
