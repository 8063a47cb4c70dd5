"""The training step loop of one cell on one device (one rank under DDP): the model of a
condition, its optimiser, an epoch over uint8 batches, and prediction.

Built for the GPU and correct on any device: loss and accuracy are summed on the device and
read once per epoch (no host sync per step); Adam is fused on CUDA; and on one CUDA GPU the
whole fixed-shape step (augment, forward, backward, optimiser) is captured once in a CUDA
graph and replayed (`StepGraph`), which removes the launch overhead that dominates small
batches. Last, smaller batches of an epoch run eagerly through the same function.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed, models
from .cells import Cell
from .config import Params, TrainParams
from .distributed import SINGLE_PROCESS, World
from .transforms import DeviceAugment, model_input, normalize, to_model_input

PREDICT_BATCH = 256  # validation and prediction: no gradients, so large batches
# ... except on a CPU, where a batch's activations should stay in cache: Lite0 at 64 px predicts in
# 1.1 ms per image in chunks of 64 and 2.0 ms in chunks of 256 (per-thread CPU time, 2 cores).
CPU_PREDICT_CHUNK = 64
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture, as CUDA graphs require


def caches_features(condition: str, train: TrainParams) -> bool:
    """Whether a run trains its head on backbone features computed once (Trainer.cached_features):
    a frozen backbone, in eval mode, whose augmentation is none or flips alone (then each training
    image's mirror image is cached too)."""
    flips_at_most = not train.augment.rotation and not train.augment.translate
    return condition == "frozen" and flips_at_most and train.max_batches_per_epoch is None


def loss_of(outputs, labels: torch.Tensor, aux_weight: float,
            label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the main output, plus aux_weight × the aux loss when Inception gives one."""
    if isinstance(outputs, tuple):
        logits, aux = outputs
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return loss + aux_weight * F.cross_entropy(aux, labels, label_smoothing=label_smoothing), logits
    return F.cross_entropy(outputs, labels, label_smoothing=label_smoothing), outputs


def learning_rate(schedule: str, peak: float, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total_steps`.

    constant: `peak` throughout (the study). cosine: from `peak` down to 0. onecycle: a linear
    warm-up from peak/25 over the first quarter, then cosine down to peak/10⁴ (Smith's one-cycle,
    as torch.optim.lr_scheduler.OneCycleLR with linear annealing up).
    """
    progress = min(step / max(total_steps - 1, 1), 1.0)
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    warm = 0.25
    if progress < warm:
        return peak * (1 / 25 + (1 - 1 / 25) * progress / warm)
    down = (progress - warm) / (1 - warm)
    return peak * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * down)))


def channels_last_on(device: torch.device) -> bool:
    """Whether models and batches are laid out channels_last on `device`: it speeds convolutions with
    cuDNN, and with oneDNN on a CPU (Lite0 at 64 px: 1.5x less CPU time per training step)."""
    return device.type in ("cuda", "cpu")


class Trainer:
    """One cell's model, optimiser and per-epoch loops on one device (one rank under DDP)."""

    def __init__(self, params: Params, cell: Cell, num_classes: int, device: torch.device,
                 world: World = SINGLE_PROCESS):
        self.params, self.cell, self.device, self.world = params, cell, device, world
        t = params.train
        if device.type == "cuda":
            # Fixed shapes: cuDNN times its kernels once. Here, so that every Trainer (train_cell, the
            # preflight's timing, bench/) runs with the settings training uses.
            torch.backends.cudnn.benchmark = True
        self.model = models.build_for_condition(
            cell.architecture, num_classes, cell.condition,
            weights_dir=Path(t.weights_dir) if t.weights_dir else None, aux_logits=t.aux_logits,
        )
        self.frozen = cell.condition == "frozen"
        self.channels_last = channels_last_on(device)
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.use_graph = device.type == "cuda" and t.cuda_graphs and not world.distributed
        cuda = device.type == "cuda"
        # fused: one kernel for the whole update (on a CPU too: a ResNet-18 step at 64 px costs 7% less
        # CPU time, as little as plain SGD's); capturable: its step counters live on the GPU (graphs).
        fused = device.type in ("cuda", "cpu") or None
        # A changing rate (a schedule, or the training rule's cuts: set_lr_scale) lives in one tensor on
        # the device, which _write_lr fills in place: a captured step reads each new value from it
        # (restore puts it back after loading a state).
        changing = t.schedule != "constant" or t.early_stopping is not None
        self.lr: torch.Tensor | None = None
        if changing and (fused or self.use_graph):
            self.lr = torch.tensor(t.lr, dtype=torch.float32, device=device)
        self.optimizer = torch.optim.Adam(trainable, lr=t.lr if self.lr is None else self.lr,
                                          weight_decay=t.weight_decay, fused=fused, capturable=self.use_graph)
        self.steps_done, self.total_steps = 0, 1  # the schedule's clock (set_schedule)
        self.lr_scale = 1.0  # the training rule's factor on the schedule (stopping.progress)
        # What a training step runs: the trained part, under DDP wrapped so that its gradients
        # are averaged across ranks. Checkpoints, validation and prediction use self.model.
        self.trained = world.wrap(self.model.head if self.frozen else self.model, device)
        self.augment = DeviceAugment(t.augment)
        self.autocast_dtype = torch.bfloat16 if cuda else None
        self.predict_chunk = CPU_PREDICT_CHUNK if device.type == "cpu" else PREDICT_BATCH
        self.graph: StepGraph | None = None

    def restore(self, state: dict) -> None:
        """Continue from a resume state: weights, optimiser and RNG."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr is not None:
            # load_state_dict puts the saved rate in the groups, a CPU tensor (map_location="cpu") or a
            # float: a captured fused step would read it once, as a number, and keep that rate for good.
            saved = self.optimizer.param_groups[0]["lr"]
            self.lr.fill_(float(saved))
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.graph = None  # a graph holds the old tensors' addresses: capture again

    def set_schedule(self, steps_per_epoch: int, epochs: int, steps_done: int) -> None:
        """Where the learning-rate schedule stands: `steps_done` of steps_per_epoch × epochs."""
        self.total_steps, self.steps_done = max(steps_per_epoch * epochs, 1), steps_done

    def set_lr_scale(self, scale: float) -> None:
        """Multiply the schedule's learning rate by `scale` from the next step on (the training rule's cuts)."""
        self.lr_scale = scale
        if self.params.train.schedule == "constant":
            self._write_lr(self.params.train.lr * scale)

    def _write_lr(self, value: float) -> None:
        if self.lr is not None:
            self.lr.fill_(value)
            return
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def _advance_schedule(self) -> None:
        t = self.params.train
        if t.schedule == "constant":
            return
        self._write_lr(self.lr_scale * learning_rate(t.schedule, t.lr, self.steps_done, self.total_steps))
        self.steps_done += 1

    def autocast(self, enabled: bool = True):
        """bf16 autocast on CUDA (without its weight cache, which CUDA graphs cannot hold); off elsewhere."""
        if self.autocast_dtype is None or not enabled:
            return contextlib.nullcontext()  # torch.autocast refuses some device types even when disabled
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _forward(self, images: torch.Tensor):
        if self.frozen:
            with torch.no_grad():
                features = self.model.forward_features(images)
            return self.trained(features)
        return self.trained(images)

    def step_outputs(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment, forward, backward and optimiser step on one batch; returns the batch's summed
        loss and number of correct predictions as device tensors (no host sync)."""
        rows = labels.shape[0]
        images = to_model_input(images_u8, self.device, self.channels_last)
        with torch.no_grad():
            images = normalize(self.augment(images))
        with self.autocast():
            loss, logits = loss_of(self._forward(images), labels, self.params.train.aux_weight,
                                   self.params.train.label_smoothing)
        scaled = loss
        if self.world.distributed:
            # weighted so that the averaged gradient is that of the whole global batch, even when
            # it does not split evenly across ranks (one small all-reduce per step, DDP only)
            (global_rows,) = self.world.sum([rows], self.device)
            scaled = loss * distributed.loss_weight(rows, int(global_rows), self.world)
        # In place (not None): a captured graph's gradients keep their addresses across eager steps.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        scaled.backward()
        self.optimizer.step()
        return loss.detach().float() * rows, (logits.detach().argmax(1) == labels).sum()

    def _epoch_means(self, total_loss: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float]:
        """Mean loss and accuracy of an epoch over every rank's images (the epoch's one host sync)."""
        total_loss, correct, seen = self.world.sum([float(total_loss), float(correct), seen], self.device)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    progress: tqdm | None) -> tuple[float, float]:
        """One epoch over (uint8 images, labels) batches; returns (mean loss, accuracy)."""
        models.train_mode(self.model, self.cell.condition)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        limit = self.params.train.max_batches_per_epoch
        for step, (images_u8, labels) in enumerate(batches):
            if limit is not None and step >= limit:
                break
            labels = labels.to(self.device, non_blocking=True)
            self._advance_schedule()
            if self.use_graph and self.graph is None and labels.shape[0] == self.params.train.batch_size:
                self.graph = StepGraph(self, images_u8, labels)
            if self.graph is not None and self.graph.fits(labels):
                batch_loss, batch_correct = self.graph.replay(images_u8, labels)
            else:
                batch_loss, batch_correct = self.step_outputs(images_u8, labels)
            total_loss += batch_loss
            correct += batch_correct
            seen += labels.shape[0]
            if progress is not None:
                progress.update(labels.shape[0])
        return self._epoch_means(total_loss, correct, seen)

    @torch.no_grad()
    def cached_features(self, batches, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen backbone features (N, D) and labels of every image in `batches` (with `flipped`, of
        their mirror images), computed once."""
        self.model.backbone.eval()
        features, labels_out = [], []
        for images_u8, labels in batches:
            for chunk in images_u8.split(self.predict_chunk):
                images = model_input(chunk, self.device, self.channels_last)
                with self.autocast():
                    features.append(self.model.forward_features(images.flip(3) if flipped else images).float())
            labels_out.append(labels.to(self.device))
        return torch.cat(features), torch.cat(labels_out)

    @torch.inference_mode()
    def predict_features(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """predict's probabilities and labels from cached frozen-backbone features (N, D): the head alone."""
        self.model.eval()
        return torch.softmax(self.model.forward_head(features).float(), dim=1).cpu().numpy(), labels.cpu().numpy()

    def train_head_epoch(self, features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                         progress: tqdm | None) -> tuple[float, float]:
        """One epoch of the head alone on cached features (frozen condition without augmentation, or
        with flips alone: features (2, N, D) of the images and their mirror images, one of the two
        drawn for each image with probability 1/2, as the flip would be).

        Under DDP every rank holds every feature and takes its shard of each global batch."""
        self.model.head.train()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        order = torch.randperm(len(labels), generator=generator).tolist()
        if features.dim() == 3:
            flipped = (torch.rand(len(labels), generator=generator) < 0.5).long().to(self.device)
            features = features[flipped, torch.arange(len(labels), device=self.device)]
        for rows in distributed.shard_batches(order, self.params.train.batch_size, self.world):
            batch = torch.tensor(rows, device=self.device)
            self._advance_schedule()
            logits = self.trained(features[batch])
            loss = F.cross_entropy(logits, labels[batch], label_smoothing=self.params.train.label_smoothing)
            scaled = loss
            if self.world.distributed:
                (global_rows,) = self.world.sum([len(rows)], self.device)
                scaled = loss * distributed.loss_weight(len(rows), int(global_rows), self.world)
            self.optimizer.zero_grad(set_to_none=True)
            scaled.backward()
            self.optimizer.step()
            total_loss += loss.detach() * len(rows)
            correct += (logits.detach().argmax(1) == labels[batch]).sum()
            seen += len(rows)
            if progress is not None:
                progress.update(len(rows))
        return self._epoch_means(total_loss, correct, seen)

    @torch.inference_mode()
    def predict(self, batches) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, K) and labels (N,) over (uint8 images, labels) batches, in their order."""
        self.model.eval()
        probs, labels_out = [], []
        for images_u8, labels in batches:
            probs += [self.predict_batch(chunk) for chunk in images_u8.split(self.predict_chunk)]
            labels_out.append(labels)
        return torch.cat(probs).cpu().numpy(), torch.cat(labels_out).cpu().numpy()

    def predict_batch(self, images_u8: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, K) of one uint8 batch, on the device (the model in eval mode)."""
        images = model_input(images_u8, self.device, self.channels_last)
        with self.autocast():
            logits = self.model(images)
        return torch.softmax(logits.float(), dim=1)


class StepGraph:
    """A training step of one batch size captured once as a CUDA graph, then replayed per batch.

    Capture follows PyTorch's whole-network recipe: a few eager warm-up steps on a side stream
    (cuDNN picks its kernels, the allocator settles), then one captured step whose input and
    output tensors are static. The warm-up steps are undone (weights, optimiser state and
    BatchNorm statistics restored), so the graph changes how the step runs, not what it computes.
    """

    def __init__(self, trainer: Trainer, images_u8: torch.Tensor, labels: torch.Tensor):
        self.images = images_u8.to(trainer.device).clone()
        self.labels = labels.clone()
        saved_model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        optimizer = trainer.optimizer
        saved_optimizer = {p: {k: v.clone() for k, v in state.items()} for p, state in optimizer.state.items()}
        side = torch.cuda.Stream(trainer.device)
        side.wait_stream(torch.cuda.current_stream(trainer.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                trainer.step_outputs(self.images, self.labels)
        torch.cuda.current_stream(trainer.device).wait_stream(side)
        # Undo the warm-up in place: the graph records these tensors' addresses, and the optimiser's
        # state must exist before capture (created inside it, it would be re-zeroed on every replay).
        trainer.model.load_state_dict(saved_model)
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if param in saved_optimizer:
                    value.copy_(saved_optimizer[param][key])
                else:
                    value.zero_()  # the first step: Adam starts from zeros, as without the graph
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.correct = trainer.step_outputs(self.images, self.labels)

    def fits(self, labels: torch.Tensor) -> bool:
        return labels.shape[0] == self.labels.shape[0]

    def replay(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the captured step on this batch; returns copies of its summed loss and correct count."""
        self.images.copy_(images_u8, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.loss.clone(), self.correct.clone()


def evaluate_loss(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of predicted probabilities (N, K) against labels (N,)."""
    eps = 1e-12
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + eps)))
    return loss, float(np.mean(probs.argmax(1) == labels))
