"""Clocks and memory probes shared by every benchmark section.

Nothing here imports mlflow, dvc or click: the training and data sections must run on a GPU
machine that has only torch, torchvision, pandas and scikit-learn (see bench/README.md).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def progress(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SteadyStateBatches:
    """Wrap a batch source: let `warmup` batches pass untimed, then time `windows` windows of
    `batches` batches each, and stop.

    The consumer's own loop asks for the batches (it can be `Trainer.train_epoch`, which we do
    not own), so a window's clock starts when its first batch is *requested*: by then the
    previous step has finished (the loops here call `loss.item()` or `sync`). When the source
    runs dry it is remade, i.e. a new epoch starts, as it would in training.

    After iteration, `rates` holds images/s of each window.
    """

    def __init__(self, make_batches: Callable[[], Iterator], warmup: int, batches: int, windows: int,
                 device: torch.device):
        self.make_batches, self.warmup, self.batches, self.windows = make_batches, warmup, batches, windows
        self.device = device
        self.rates: list[float] = []

    def __iter__(self):
        source = iter(self.make_batches())
        total = self.warmup + self.batches * self.windows
        started, images = 0.0, 0
        for i in range(total + 1):
            measured = i - self.warmup
            if measured >= 0 and measured % self.batches == 0:
                sync(self.device)
                now = time.perf_counter()
                if measured > 0:  # close the window that just ended
                    self.rates.append(images / (now - started))
                started, images = now, 0
            if i == total:
                return
            try:
                batch = next(source)
            except StopIteration:
                source = iter(self.make_batches())
                batch = next(source)
            images += len(batch[1])
            yield batch

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


def alternate_windows(fast_window: Callable[[], float], baseline_window: Callable[[], float],
                      windows: int) -> tuple[dict, dict]:
    """Run fast and baseline windows in turn (ABAB...), so that load from other work on a shared
    machine falls on both alike; the median rate of each path and every window's rate."""
    fast, base = [], []
    for _ in range(windows):
        fast.append(fast_window())
        base.append(baseline_window())
    return ({"img_s": statistics.median(fast), "windows": fast},
            {"img_s": statistics.median(base), "windows": base})


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Call fn `warmup` times untimed, then `repeats` times; median seconds and every timing."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank, of a non-empty list."""
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def _status_kib(field: str) -> int | None:
    """One `kB` field of /proc/self/status (VmHWM, RssAnon ...), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def anonymous_rss_bytes() -> int | None:
    """This process's resident anonymous memory now (RssAnon): heap and tensors, no file pages."""
    kib = _status_kib("RssAnon")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (VmHWM): includes file pages of a memmap it touched."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


class PeakAnonymousMemory:
    """Sample RssAnon (heap, tensors; not memmap file pages) every `interval` s; keep the peak.

    Peak RSS (VmHWM) counts the store's file pages once they are read, though the kernel can drop
    them at any time; anonymous memory is what must stay flat as the dataset grows.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_bytes = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            kib = _status_kib("RssAnon")
            if kib is not None:
                self.peak_bytes = max(self.peak_bytes, kib * 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakAnonymousMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(device: torch.device) -> dict:
    """What the figures were measured on: host, CPU, usable cores, GPU, versions, load."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
