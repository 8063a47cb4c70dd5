"""The training step loop of one cell on one device (one rank under DDP): the model of a
condition, its optimiser, an epoch over uint8 batches, and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed, models
from .cells import Cell
from .config import Params
from .distributed import SINGLE_PROCESS, World
from .transforms import GpuAugment, model_input, normalize, to_model_input


def loss_of(outputs, labels: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the main output, plus aux_weight × the aux loss when Inception gives one."""
    if isinstance(outputs, tuple):
        logits, aux = outputs
        return F.cross_entropy(logits, labels) + aux_weight * F.cross_entropy(aux, labels), logits
    return F.cross_entropy(outputs, labels), outputs


class Trainer:
    """One cell's model, optimiser and per-epoch loops on one device (one rank under DDP)."""

    def __init__(self, params: Params, cell: Cell, num_classes: int, device: torch.device,
                 world: World = SINGLE_PROCESS):
        self.params, self.cell, self.device, self.world = params, cell, device, world
        t = params.train
        self.model = models.build_for_condition(
            cell.architecture, num_classes, cell.condition,
            weights_dir=Path(t.weights_dir) if t.weights_dir else None, aux_logits=t.aux_logits,
        )
        self.frozen = cell.condition == "frozen"
        # channels_last speeds convolutions with cuDNN and with oneDNN on CPU (bench/: Lite0 1.66x at 64 px).
        self.channels_last = device.type in ("cuda", "cpu")
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)
        # What a training step runs: the trained part, under DDP wrapped so that its gradients
        # are averaged across ranks. Checkpoints, validation and prediction use self.model.
        self.trained = world.wrap(self.model.head if self.frozen else self.model, device)
        self.augment = GpuAugment(t.augment).to(device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _no_autocast()

    def restore(self, state: dict) -> None:
        """Continue from a resume state: weights, optimiser and RNG."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])


    def _forward(self, images: torch.Tensor):
        if self.frozen:
            with torch.no_grad():
                features = self.model.forward_features(images)
            return self.trained(features)
        return self.trained(images)

    def _step(self, loss: torch.Tensor, batch_rows: int) -> None:
        """Backward and optimiser step; under DDP the loss is weighted so that the averaged
        gradient is that of the whole global batch, even when it does not split evenly."""
        if self.world.distributed:
            (global_rows,) = self.world.sum([batch_rows], self.device)
            loss = loss * distributed.loss_weight(batch_rows, int(global_rows), self.world)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _epoch_means(self, total_loss: float, correct: float, seen: float) -> tuple[float, float]:
        """Mean loss and accuracy of an epoch over every rank's images."""
        total_loss, correct, seen = self.world.sum([total_loss, correct, seen], self.device)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def train_epoch(self, loader, progress: tqdm | None) -> tuple[float, float]:
        models.train_mode(self.model, self.cell.condition)
        total_loss, correct, seen = 0.0, 0, 0
        limit = self.params.train.max_batches_per_epoch
        for step, (images_u8, labels) in enumerate(loader):
            if limit is not None and step >= limit:
                break
            images = to_model_input(images_u8, self.device, self.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            with torch.no_grad():
                images = normalize(self.augment(images))
            with self.autocast:
                loss, logits = loss_of(self._forward(images), labels, self.params.train.aux_weight)
            self._step(loss, len(labels))
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            if progress is not None:
                progress.update(len(labels))
                progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        return self._epoch_means(total_loss, correct, seen)

    @torch.no_grad()
    def cached_features(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen backbone features (N, D) and labels of every image in a loader, computed once."""
        self.model.backbone.eval()
        features, labels_out = [], []
        for images_u8, labels in loader:
            images = model_input(images_u8, self.device, self.channels_last)
            with self.autocast:
                features.append(self.model.forward_features(images).float())
            labels_out.append(labels.to(self.device))
        return torch.cat(features), torch.cat(labels_out)

    def train_head_epoch(self, features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                         progress: tqdm | None) -> tuple[float, float]:
        """One epoch of the head alone on cached features (frozen condition without augmentation).

        Under DDP every rank holds every feature and takes its shard of each global batch."""
        self.model.head.train()
        total_loss, correct, seen = 0.0, 0, 0
        order = torch.randperm(len(labels), generator=generator).tolist()
        for rows in distributed.shard_batches(order, self.params.train.batch_size, self.world):
            batch = torch.tensor(rows, device=self.device)
            logits = self.trained(features[batch])
            loss = F.cross_entropy(logits, labels[batch])
            self._step(loss, len(rows))
            total_loss += loss.item() * len(rows)
            correct += (logits.argmax(1) == labels[batch]).sum().item()
            seen += len(rows)
            if progress is not None:
                progress.update(len(rows))
        return self._epoch_means(total_loss, correct, seen)

    @torch.no_grad()
    def predict(self, loader) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, K) and labels (N,) over a loader, in its order."""
        self.model.eval()
        probs, labels_out = [], []
        for images_u8, labels in loader:
            images = model_input(images_u8, self.device, self.channels_last)
            with self.autocast:
                logits = self.model(images)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels_out.append(labels.numpy())
        return np.concatenate(probs), np.concatenate(labels_out)


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def evaluate_loss(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of predicted probabilities (N, K) against labels (N,)."""
    eps = 1e-12
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + eps)))
    return loss, float(np.mean(probs.argmax(1) == labels))
