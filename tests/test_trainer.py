"""The step loop (trainer.py): the GPU-shaped step computes what a plain PyTorch step computes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_params

from transfer_study import models, transforms
from transfer_study.cells import Cell
from transfer_study.config import AugmentParams
from transfer_study.trainer import Trainer

NO_AUGMENT = AugmentParams(rotation=0.0, translate=0.0, hflip=False)


def _batches(count: int, size: int = 32, rows: int = 4):
    generator = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=generator),
             torch.randint(0, 3, (rows,), generator=generator)) for _ in range(count)]


def _plain_losses(model: torch.nn.Module, batches, lr: float, label_smoothing: float = 0.0) -> list[float]:
    """The textbook loop the study describes: normalise, forward, cross-entropy, Adam; one sync per step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # the Trainer's kernel on a CPU
    model.train()
    losses = []
    for images_u8, labels in batches:
        images = (images_u8.float().contiguous(memory_format=torch.channels_last) / 255 - torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            models.IMAGENET_STD).view(1, 3, 1, 1)
        loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_the_step_follows_the_plain_loss_trajectory():
    params = tiny_params(augment=NO_AUGMENT)
    batches = _batches(5)
    torch.manual_seed(0)
    trainer = Trainer(params, Cell("resnet18", "scratch", 0), 3, torch.device("cpu"))
    reference = models.build_model("resnet18", 3, pretrained=False)
    reference.load_state_dict(trainer.model.state_dict())
    reference.to(memory_format=torch.channels_last)  # the same kernels: the comparison is of the loop

    ours = []
    for batch in batches:  # one-batch epochs give the loss of every step
        ours.append(trainer.train_epoch([batch], None)[0])
    plain = _plain_losses(reference, batches, lr=params.train.lr)
    assert plain[0] > plain[-1], "the reference did not learn: the comparison would be empty"
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(plain), rtol=1e-3, atol=1e-4)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_label_smoothing_reaches_the_training_loss():
    """The quick and tuned profiles train with train.label_smoothing: the step's loss is the smoothed one."""
    params = tiny_params(augment=NO_AUGMENT, label_smoothing=0.2)
    batches = _batches(2)
    torch.manual_seed(0)
    trainer = Trainer(params, Cell("resnet18", "scratch", 0), 3, torch.device("cpu"))
    references = []
    for smoothing in (0.2, 0.0):
        reference = models.build_model("resnet18", 3, pretrained=False)
        reference.load_state_dict(trainer.model.state_dict())
        references.append(_plain_losses(reference.to(memory_format=torch.channels_last), batches,
                                        params.train.lr, label_smoothing=smoothing))
    ours = [trainer.train_epoch([batch], None)[0] for batch in batches]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(references[0]), rtol=1e-3, atol=1e-4)
    assert abs(ours[0] - references[1][0]) > 0.01, "smoothing 0.2 should change the loss"


def test_label_smoothing_reaches_the_head_only_loss_of_a_frozen_cell():
    """A frozen cell without augmentation trains its head on cached features (train_head_epoch)."""
    params = tiny_params(augment=NO_AUGMENT, label_smoothing=0.2, batch_size=6)
    trainer = Trainer(params, Cell("efficientnet_lite0", "frozen", 0), 3, torch.device("cpu"))
    features = torch.randn(6, trainer.model.head.in_features, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():  # one batch of all six rows: the epoch's loss is that of the head before its step
        smoothed, plain = (F.cross_entropy(trainer.model.head(features), labels, label_smoothing=s).item()
                           for s in (0.2, 0.0))
    loss, _ = trainer.train_head_epoch(features, labels, torch.Generator().manual_seed(0), None)
    assert loss == pytest.approx(smoothed, abs=1e-5) and abs(smoothed - plain) > 0.01


def test_an_epoch_sums_loss_and_accuracy_over_every_image():
    params = tiny_params(augment=NO_AUGMENT)
    trainer = Trainer(params, Cell("resnet18", "scratch", 0), 3, torch.device("cpu"))  # no dropout
    batches = _batches(2, rows=4) + _batches(1, rows=3)  # a smaller last batch, as epochs end
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss, accuracy = trainer.train_epoch(batches, None)
    trainer.model.load_state_dict(before)
    trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=params.train.lr)  # fresh, as at first
    per_batch = [trainer.train_epoch([b], None) for b in batches]
    rows = [len(b[1]) for b in batches]
    assert abs(loss - sum(l * n for (l, _), n in zip(per_batch, rows)) / sum(rows)) < 1e-4
    assert abs(accuracy - sum(a * n for (_, a), n in zip(per_batch, rows)) / sum(rows)) < 1e-6


def test_augmentation_runs_on_the_device_batch_per_sample():
    trainer = Trainer(tiny_params(), Cell("resnet18", "scratch", 0), 3, torch.device("cpu"))
    assert isinstance(trainer.augment, transforms.DeviceAugment) and trainer.augment.active
    assert trainer.graph is None and not trainer.use_graph, "CUDA graphs are for CUDA only"


def test_learning_rate_schedules():
    from transfer_study.trainer import learning_rate

    assert [learning_rate("constant", 1e-4, s, 10) for s in (0, 9)] == [1e-4, 1e-4]
    cosine = [learning_rate("cosine", 1.0, s, 11) for s in range(11)]
    assert cosine[0] == 1.0 and abs(cosine[5] - 0.5) < 1e-9 and cosine[-1] < 1e-12
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    one = [learning_rate("onecycle", 1.0, s, 101) for s in range(101)]
    assert abs(one[0] - 1 / 25) < 1e-9 and max(one) == one[25] == 1.0
    assert one[-1] == pytest.approx(1e-4) and all(a <= b for a, b in zip(one[:26], one[1:26]))


def test_the_optimiser_follows_the_schedule_step_by_step():
    params = tiny_params(augment=NO_AUGMENT, schedule="cosine", lr=1e-3)
    trainer = Trainer(params, Cell("resnet18", "scratch", 0), 3, torch.device("cpu"))
    trainer.set_schedule(steps_per_epoch=3, epochs=2, steps_done=3)  # resumed at epoch 2
    trainer.train_epoch(_batches(2), None)
    assert trainer.steps_done == 5
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
