"""The GPU step can be captured as a CUDA graph, checked without a GPU (capture_guard.py).

For every architecture × condition of every profile (params*.yaml), at the profile's own image
size and batch size: one training step (augment, normalise, forward, loss, backward) and one
prediction batch run under CaptureGuard on the meta device, after one eager warm-up step, as
trainer.StepGraph captures. Pretrained conditions use a random initialisation of the same
architecture: what is checked is the modules' code, not their weights (torchvision's ImageNet
weights cannot be fetched here). Not run here: the optimiser's update, which on CUDA is torch's
fused, capturable Adam (tests/test_train.py checks that a resumed schedule still reaches it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from capture_guard import CaptureGuard, CaptureRefused

from transfer_study import models
from transfer_study.cells import cells_for
from transfer_study.config import load_params
from transfer_study.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
META = torch.device("meta")


def _profile_cells() -> list[tuple[str, object]]:
    """(profile file, cell) for each distinct architecture × condition of every profile."""
    chosen = []
    for path in sorted(ROOT.glob("params*.yaml")):
        params = load_params(path)
        seen = set()
        for cell in cells_for(params):
            if cell.group not in seen:
                seen.add(cell.group)
                chosen.append((path.name, cell))
    return chosen


PROFILE_CELLS = _profile_cells()


def _meta_trainer(params, cell) -> Trainer:
    """The cell's Trainer with its model on the meta device, laid out as on CUDA (channels_last)."""
    with torch.device(META):
        trainer = Trainer(params, cell, len(params.data.classes), META)
    trainer.channels_last = True
    trainer.model.to(memory_format=torch.channels_last)
    trainer.optimizer.step = lambda *args, **kwargs: None  # torch's capturable Adam on CUDA (module docstring)
    return trainer


def test_every_profile_and_cell_is_checked():
    profiles = {profile for profile, _ in PROFILE_CELLS}
    assert {"params.yaml", "params.quick.yaml", "params.robust.yaml", "params.tuned.yaml"} <= profiles
    assert {"efficientnet_lite0", "resnet18", "vgg19", "inception_v3", "small_cnn"} <= {
        cell.architecture for _, cell in PROFILE_CELLS}
    assert {"scratch", "frozen", "finetune"} <= {cell.condition for _, cell in PROFILE_CELLS}


@pytest.mark.parametrize("profile, cell", PROFILE_CELLS, ids=[f"{p}:{c.group}" for p, c in PROFILE_CELLS])
def test_the_step_and_prediction_can_be_captured(profile, cell, monkeypatch):
    params = load_params(ROOT / profile)
    monkeypatch.setattr(models, "resolve_weights", lambda *args, **kwargs: None)  # random init, same modules
    trainer = _meta_trainer(params, cell)
    size, batch = params.train.image_size[cell.architecture], params.train.batch_size
    # As DeviceImages gives them: a channels_last view of the NHWC uint8 store, labels on the device.
    images = torch.empty(batch, size, size, 3, dtype=torch.uint8, device=META).permute(0, 3, 1, 2)
    labels = torch.zeros(batch, dtype=torch.long, device=META)
    models.train_mode(trainer.model, cell.condition)
    trainer.step_outputs(images, labels)  # the eager warm-up before capture: lazily made state exists
    with CaptureGuard(META, trainer.model):
        loss, correct = trainer.step_outputs(images, labels)
    assert loss.shape == () and correct.shape == ()
    trainer.model.eval()
    with torch.inference_mode(), CaptureGuard(META, trainer.model):
        probs = trainer.predict_batch(images)
    assert probs.shape == (batch, len(params.data.classes))


class _Offender(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how, self.conv = how, torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if self.how == "python values":
            return x * x.new_tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
        if self.how == "item":
            return x * x.mean().item()
        if self.how == "data-dependent shape":
            return x[x > 0].sum() + x.sum()
        if self.how == "host tensor":
            return x * torch.ones(1, 4, 1, 1, device="cpu")
        if self.how == "host copy":
            return x.to("cpu")
        return F.relu(x)


@pytest.mark.parametrize("how, words", [
    ("python values", "aten.lift_fresh.default builds a tensor from Python values"),
    ("item", "aten._local_scalar_dense.default reads a tensor's value on the host"),
    ("data-dependent shape", "output whose shape depends on the data"),
    ("host tensor", "reads a host tensor in a device op"),
    ("host copy", "aten._to_copy.default copies between the host and the device"),
])
def test_the_guard_refuses_what_capture_refuses_naming_op_module_and_line(how, words):
    with torch.device(META):
        model = torch.nn.Sequential(_Offender(how))
    with pytest.raises(CaptureRefused) as refused:
        with CaptureGuard(META, model):
            model(torch.empty(2, 3, 8, 8, device=META))
    message = str(refused.value)
    assert words in message
    assert "in 0 (_Offender)" in message and "tests/test_capture.py:" in message and "(forward)" in message


class _PythonValueInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * grad.new_tensor(2.0)


def test_the_guard_lets_capturable_code_through_and_names_backward_nodes():
    with torch.device(META):
        model = torch.nn.Sequential(_Offender("none"))
    x = torch.empty(2, 3, 8, 8, device=META)
    with CaptureGuard(META, model):
        model(x).sum().backward()  # factories, Python scalars and integer gathers are fine
        x[torch.zeros(2, dtype=torch.long, device=META)].sum()
    with pytest.raises(CaptureRefused, match=r"lift_fresh.* in backward \(_PythonValueInBackwardBackward\)"):
        with CaptureGuard(META, model):
            _PythonValueInBackward.apply(model(x)).sum().backward()
