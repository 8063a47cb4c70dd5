"""The data of a cell: the split manifest's images decoded and resized once into a
memory-mapped uint8 store, gathered in whole batches (augmentation: transforms.py).

Decoding PNGs with PIL on every epoch is most of the cost of a standard recipe on
small images; here each image is decoded once per (dataset, size) and cached, so
an epoch only gathers rows of a uint8 array. The store is a `.npy` memmap, so
datasets larger than RAM still work.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .config import UserError
from .transforms import resize_to_input


def store_key(paths: list[str], hashes: list[str], size: int) -> str:
    """A key that changes when any image, the order or the size changes."""
    digest = hashlib.sha256(str(size).encode())
    for path, content_hash in zip(paths, hashes):
        digest.update(f"{path}\0{content_hash}\n".encode())
    return digest.hexdigest()[:16]


def build_store(paths: list[Path], hashes: list[str], size: int, cache_dir: Path) -> np.ndarray:
    """Return an (N, size, size, 3) uint8 memmap of the images, building it once.

    The store is written under a temporary name and renamed when complete, so an
    interrupted build is never mistaken for a finished one.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = store_key([str(p) for p in paths], hashes, size)
    final = cache_dir / f"images-{size}px-{key}.npy"
    if final.exists():
        return np.load(final, mmap_mode="r")
    partial = final.with_suffix(".partial.npy")
    store = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))

    def fill(rows: range) -> None:
        for i in rows:
            with Image.open(paths[i]) as img:
                store[i] = resize_to_input(img, size)

    # Chunks, not a task per image: pool.map submits every task at once (~2 KB of heap each),
    # which would make memory grow with the dataset.
    chunks = [range(start, min(start + 256, len(paths))) for start in range(0, len(paths), 256)]
    with ThreadPoolExecutor() as pool:
        list(pool.map(fill, chunks))
    store.flush()
    del store
    partial.rename(final)
    return np.load(final, mmap_mode="r")


class BatchSource(torch.utils.data.Dataset):
    """Index a store with a list of rows: one item is a whole uint8 batch (N, 3, H, W)."""

    def __init__(self, store: np.ndarray, labels: np.ndarray):
        self.store = store
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sorted(rows)  # sorted reads are sequential in the memmap
        images = torch.from_numpy(np.ascontiguousarray(self.store[rows])).permute(0, 3, 1, 2)
        return images, self.labels[rows]


def batch_loader(
    source: BatchSource, batch_size: int, shuffle: bool, seed: int, num_workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """A DataLoader that yields whole uint8 batches gathered from the store."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.utils.data.RandomSampler(source, generator=generator) if shuffle else range(len(source))
    sampler = torch.utils.data.BatchSampler(base, batch_size=batch_size, drop_last=False)
    return torch.utils.data.DataLoader(
        source,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def shard_loader(source: BatchSource, shards: list[list[int]], num_workers: int,
                 pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader yielding one whole uint8 batch per shard (a list of rows), in order."""
    return torch.utils.data.DataLoader(source, sampler=shards, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory)


class TrainingData:
    """Stores and labels of the train and val (and all) rows, at one image size."""

    def __init__(self, manifest: pd.DataFrame, root: Path, size: int, cache_dir: Path):
        self.class_names = sorted(manifest["label"].unique())
        index = {name: i for i, name in enumerate(self.class_names)}
        self.manifest = manifest.reset_index(drop=True)
        self.labels = self.manifest["label"].map(index).to_numpy()
        paths = [root / p for p in self.manifest["path"]]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(
                f"{len(missing)} image(s) in the manifest are missing, e.g. '{missing[0]}'; "
                "rerun `dvc repro preprocess split`"
            )
        self.store = build_store(paths, list(self.manifest["sha256"]), size, cache_dir)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def source(self, rows: np.ndarray | None = None) -> BatchSource:
        if rows is None:
            return BatchSource(self.store, self.labels)
        return BatchSource(_RowView(self.store, rows), self.labels[rows])


class _RowView:
    """A subset of the store's rows, indexable like the store."""

    def __init__(self, store: np.ndarray, rows: np.ndarray):
        self.store, self.rows = store, rows

    def __getitem__(self, idx):
        return self.store[self.rows[idx]]

    def __len__(self) -> int:
        return len(self.rows)
