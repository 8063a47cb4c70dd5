"""The standard recipe every fast-path figure is compared with.

What a typical transfer-learning tutorial (and torchvision's reference scripts, minus their
tuning) does: `ImageFolder` over the crops, PIL transforms decoding and augmenting every image
on every epoch in 2 DataLoader workers, fp32, blocking copies from unpinned memory, and in the
frozen condition a backbone that keeps `requires_grad=True` (only the head is in the optimizer,
so backward still walks the whole backbone).

The model itself is the project's (`models.build_model`), so the two paths differ only in the
recipe around it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torchvision import datasets, transforms

from transfer_study import models
from transfer_study.config import AugmentParams, Params
from transfer_study.models import IMAGENET_MEAN, IMAGENET_STD
from transfer_study.trainer import loss_of

BASELINE_WORKERS = 2


def standard_transform(size: int, augment: AugmentParams) -> transforms.Compose:
    """Augment the stored crop with PIL, then resize to the model's size and normalise."""
    return transforms.Compose([
        transforms.RandomRotation(augment.rotation),
        transforms.RandomAffine(degrees=0, translate=(augment.translate, augment.translate)),
        transforms.RandomHorizontalFlip(),
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_folder(cropped: Path, root: Path, manifest: pd.DataFrame, transform) -> datasets.ImageFolder:
    """ImageFolder over the crops, narrowed to the manifest's train rows (the fast path's rows)."""
    dataset = datasets.ImageFolder(str(cropped), transform=transform)
    train = {str((root / p).resolve()) for p in manifest.loc[manifest["split"] == "train", "path"]}
    dataset.samples = [s for s in dataset.samples if str(Path(s[0]).resolve()) in train]
    dataset.imgs, dataset.targets = dataset.samples, [label for _, label in dataset.samples]
    return dataset


def standard_loader(dataset, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """Shuffled batches decoded and augmented in BASELINE_WORKERS worker processes."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=BASELINE_WORKERS,
        generator=torch.Generator().manual_seed(seed),
    )


class StandardTrainer:
    """fp32 training of the project's model with the standard recipe's frozen condition."""

    def __init__(self, params: Params, arch: str, condition: str, num_classes: int, device: torch.device):
        t = params.train
        self.device, self.aux_weight = device, t.aux_weight
        self.model = models.build_model(
            arch, num_classes, pretrained=condition != "scratch",
            weights_dir=Path(t.weights_dir) if t.weights_dir else None,
            aux_logits=t.aux_logits and condition != "frozen", download=False,
        ).to(device)
        self.model.train()  # the whole model, backbone BatchNorm included, as a plain recipe does
        # Frozen here means "only the head is optimised"; requires_grad stays on in the backbone.
        trainable = self.model.head.parameters() if condition == "frozen" else self.model.parameters()
        self.optimizer = torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images, labels = images.to(self.device), labels.to(self.device)
        loss, _ = loss_of(self.model(images), labels, self.aux_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()
