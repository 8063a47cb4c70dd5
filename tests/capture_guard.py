"""What CUDA graph capture refuses, checked on a machine without a GPU (tests only).

`CaptureGuard` is a torch dispatch mode: every aten op run inside it is checked, and the first
one that a captured CUDA graph could not hold raises `CaptureRefused`, naming the op, the module
whose forward (or the backward node) ran it, and the line of our code that issued it:

- a tensor made from Python values (`torch.tensor`, `x.new_tensor`: `aten.lift_fresh`), which
  on a GPU is a host-to-device copy at every call;
- a copy between the host and the device, or a host tensor read by a device op (its value would
  be fixed when the graph is captured, as a CPU learning rate is by a fused optimiser);
- a value read on the host (`.item()`, `float()`, `bool()`: `aten._local_scalar_dense`, `equal`);
- an output whose shape depends on the data (`nonzero`, `masked_select`, boolean indexing,
  `unique` ...: ops tagged `dynamic_output_shape`).

Run the code on the "meta" device: no arithmetic is done (so every profile's real image size
costs nothing), tensors still carry shapes, dtypes and devices, and any host tensor that reaches
the step shows up as a CPU tensor beside meta ones.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HOST_READS = {torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}
MADE_FROM_PYTHON = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default,
          torch.ops.aten._copy_from_and_resize.default}
PROJECT = Path(__file__).resolve().parent.parent


class CaptureRefused(AssertionError):
    """An op that CUDA graph capture would refuse (or silently freeze)."""


def refusal(func, args: tuple, kwargs: dict, device: torch.device) -> str | None:
    """Why capture refuses `func(*args, **kwargs)` on `device`, or None when it can hold it."""
    if func in MADE_FROM_PYTHON:
        return ("builds a tensor from Python values (torch.tensor / new_tensor): a host-to-device copy at every "
                "call; make it once, as a registered buffer")
    if torch.Tag.data_dependent_output in func.tags or func in HOST_READS:
        return "reads a tensor's value on the host (.item(), float(), bool(), tolist()): a device-to-host sync"
    if torch.Tag.dynamic_output_shape in func.tags and not _integer_gather(func, args):
        return "gives an output whose shape depends on the data (nonzero, masked_select, boolean indexing, unique)"
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    devices = {t.device.type for t in tensors}
    if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
        devices.add(torch.device(kwargs["device"]).type)
    if device.type in devices and len(devices) > 1:
        if func in COPIES:
            return "copies between the host and the device"
        return "reads a host tensor in a device op: a captured graph keeps the value it had at capture"
    return None


def _integer_gather(func, args: tuple) -> bool:
    """aten.index with integer indices: its output shape is the indices' (only a boolean mask's is not)."""
    if func is not torch.ops.aten.index.Tensor:
        return False
    indices = [i for i in args[1] if i is not None]
    return all(not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in indices)


def _our_line() -> str:
    """The innermost frame of this project's code (not torch's, not this file's)."""
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != here and PROJECT in path.parents and ".venv" not in path.parts:
            return f"{path.relative_to(PROJECT)}:{frame.lineno} ({frame.name})"
    return "no project frame"


class CaptureGuard(TorchDispatchMode):
    """Refuse, inside the `with` block, every op on `device` that a CUDA graph could not capture.

    `model`'s submodules are named in the message (by forward hooks on every module)."""

    def __init__(self, device: torch.device, model: torch.nn.Module | None = None):
        super().__init__()
        self.device = device
        self.names = {id(m): f"{name or 'the model'} ({type(m).__name__})"
                      for name, m in (model.named_modules() if model is not None else [])}
        self.modules: list[torch.nn.Module] = []
        self.handles = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.handles = [register_module_forward_pre_hook(self._entered), register_module_forward_hook(self._left)]
        return super().__enter__()

    def _entered(self, module, _args) -> None:
        self.modules.append(module)

    def _left(self, _module, _args, _output) -> None:  # returns None: the output stays as it is
        self.modules.pop()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.modules.clear()
        return super().__exit__(*exc)

    def where(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"backward ({node.name()})"
        named = [self.names[id(m)] for m in self.modules if id(m) in self.names]
        return named[-1] if named else (type(self.modules[-1]).__name__ if self.modules else "the step itself")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = refusal(func, args, kwargs, self.device)
        if reason is not None:
            raise CaptureRefused(f"{func} {reason}; in {self.where()} at {_our_line()}")
        return func(*args, **kwargs)
