"""SHA-256 of files: content hashes for the manifest, checksums for checkpoints and models."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class HashingWriter:
    """A binary file wrapper that hashes what passes through it (a checksum computed while writing,
    not by reading the file again) and keeps the first write error (torch.save reports a failed
    write as a bare RuntimeError; the OSError says why)."""

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


def save_with_sha256(obj: object, path: Path) -> str:
    """torch.save `obj` to `path` (no fsync, no rename: for temporary files); its SHA-256."""
    import torch

    with open(path, "wb") as handle:
        writer = HashingWriter(handle)
        torch.save(obj, writer)
    return writer.digest.hexdigest()
