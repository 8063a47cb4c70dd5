"""The model's input, defined once for training and serving (like torchvision's presets.py).

An image reaches a model as: RGB crop (preprocess.crop_and_fit) → `resize_to_input`
(uint8, size × size) → `to_model_input` (float in [0, 1] on the device) → `normalize`
(ImageNet mean/std). Training keeps the uint8 step in its image store and adds `GpuAugment`
between the last two; serving runs the same functions on the uploaded images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from .config import AugmentParams
from .models import IMAGENET_MEAN, IMAGENET_STD


def resize_to_input(img: Image.Image, size: int) -> np.ndarray:
    """An RGB image → (size, size, 3) uint8, resized bilinearly (no reducing gap: exact, repeatable)."""
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def uint8_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """RGB images → a (N, 3, size, size) uint8 batch, as the image store holds them."""
    return torch.from_numpy(np.stack([resize_to_input(img, size) for img in images])).permute(0, 3, 1, 2)


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


def model_input(images_u8: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A uint8 batch → the normalised float batch a model takes (no augmentation)."""
    return normalize(to_model_input(images_u8, device, channels_last))


def augments(augment: AugmentParams) -> bool:
    """Whether the augmentation params change images at all."""
    return bool(augment.rotation or augment.translate or augment.hflip)


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
