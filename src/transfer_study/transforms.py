"""The model's input, defined once for training and serving (like torchvision's presets.py).

An image reaches a model as: RGB crop (preprocess.crop_and_fit) → `resize_to_input`
(uint8, size × size) → `to_model_input` (float in [0, 1] on the device) → `normalize`
(ImageNet mean/std). Training keeps the uint8 step in its image store and adds `DeviceAugment`
between the last two; serving runs the same functions on the uploaded images.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
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


class DeviceAugment(torch.nn.Module):
    """Per-sample random rotation, translation and horizontal flip of a float batch, drawn and
    applied on the batch's device.

    The same transforms as kornia's RandomHorizontalFlip + RandomAffine(degrees, translate,
    padding_mode="border") (tests/test_transforms.py checks the warp against kornia's), in one
    affine_grid + grid_sample with parameters drawn by torch.rand on the device: no host round
    trip and a fixed set of kernels, so a training step can be captured in a CUDA graph.
    Images must be square (the crops are).
    """

    def __init__(self, params: AugmentParams):
        super().__init__()
        self.max_angle = math.radians(params.rotation)
        self.max_shift = 2.0 * params.translate  # normalised coordinates: a side spans 2
        self.hflip = params.hflip
        self.active = augments(params)
        self.flips_only = params.hflip and not params.rotation and not params.translate

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return images
        if self.flips_only:  # the warp below would be an exact copy or mirror: skip its resampling
            flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
            return torch.where(flip, images.flip(3), images)
        draws = torch.rand(images.shape[0], 4, device=images.device)
        angle = (draws[:, 0] * 2 - 1) * self.max_angle
        shift = (draws[:, 1:3] * 2 - 1) * self.max_shift
        flip = torch.where(draws[:, 3] < 0.5, -1.0, 1.0) if self.hflip else torch.ones_like(angle)
        return affine_warp(images, angle, shift, flip)


def affine_warp(images: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip (flip = -1) then rotate by `angle` radians about the centre and shift by `shift`
    (normalised units, a side spans 2) each image of a square (N, C, H, W) batch; edges repeat."""
    cos, sin = angle.cos(), angle.sin()
    # affine_grid maps each output point x to the input point S·R(-angle)·(x - shift).
    inverse_rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    linear = torch.stack([flip, torch.ones_like(flip)], -1).unsqueeze(-1) * inverse_rotation
    theta = torch.cat([linear, -(linear @ shift.unsqueeze(-1))], -1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
