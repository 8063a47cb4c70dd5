"""The fast data path: decode and resize once into a memory-mapped uint8 store,
then augment whole batches on the training device.

Decoding PNGs with PIL on every epoch is most of the cost of a standard recipe on
small images; here each image is decoded once per (dataset, size) and cached, so
an epoch only gathers rows of a uint8 array. The store is a `.npy` memmap, so
datasets larger than RAM still work.
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import AugmentParams
from .models import IMAGENET_MEAN, IMAGENET_STD


def store_key(paths: list[str], hashes: list[str], size: int) -> str:
    """A key that changes when any image, the order or the size changes."""
    digest = hashlib.sha256(str(size).encode())
    for path, content_hash in zip(paths, hashes):
        digest.update(f"{path}\0{content_hash}\n".encode())
    return digest.hexdigest()[:16]


def _decode_resized(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8)


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
            store[i] = _decode_resized(paths[i], size)

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


class GpuAugment(torch.nn.Module):
    """Per-sample random rotation, translation and horizontal flip on a float batch.

    kornia draws independent parameters for every image in the batch (torchvision's
    v2 transforms would apply one draw to the whole batch tensor).
    """

    def __init__(self, params: AugmentParams):
        super().__init__()
        import kornia.augmentation as K

        steps = []
        if params.hflip:
            steps.append(K.RandomHorizontalFlip())
        if params.rotation or params.translate:
            steps.append(
                K.RandomAffine(
                    degrees=params.rotation,
                    translate=(params.translate, params.translate) if params.translate else None,
                    padding_mode="border",
                    p=1.0,
                )
            )
        self.steps = K.AugmentationSequential(*steps) if steps else torch.nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.steps(images)


def to_model_input(images_u8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N,3,H,W) → float in [0,1] on the device (non-blocking from pinned memory)."""
    images = images_u8.to(device, non_blocking=True).float().div_(255.0)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std on `device`, made once: a host-to-GPU copy per batch would wait for the GPU."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation, used in every condition so they differ only in init."""
    mean, std = _mean_std(images.device)
    return (images - mean) / std
