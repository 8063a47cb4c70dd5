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

    After iteration, `rates` holds images/s of each window and `cpu_ms` the CPU milliseconds per
    image that this process and its DataLoader workers spent in it (cpu_seconds).
    """

    def __init__(self, make_batches: Callable[[], Iterator], warmup: int, batches: int, windows: int,
                 device: torch.device):
        self.make_batches, self.warmup, self.batches, self.windows = make_batches, warmup, batches, windows
        self.device = device
        self.rates: list[float] = []
        self.cpu_ms: list[float] = []

    def result(self) -> tuple[float, float]:
        """(images/s, CPU ms per image) of the first window: what a window function returns."""
        return self.rates[0], self.cpu_ms[0]

    def __iter__(self):
        source = iter(self.make_batches())
        total = self.warmup + self.batches * self.windows
        started, cpu_started, images = 0.0, 0.0, 0
        for i in range(total + 1):
            measured = i - self.warmup
            if measured >= 0 and measured % self.batches == 0:
                sync(self.device)
                now, cpu = time.perf_counter(), cpu_seconds()
                if measured > 0:  # close the window that just ended
                    self.rates.append(images / (now - started))
                    self.cpu_ms.append(1000 * (cpu - cpu_started) / images)
                started, cpu_started, images = now, cpu, 0
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


def alternate_windows(fast_window: Callable[[], float | tuple[float, float]],
                      baseline_window: Callable[[], float | tuple[float, float]], windows: int) -> tuple[dict, dict]:
    """Run fast and baseline windows in turn (ABAB...), so that load from other work on a shared
    machine falls on both alike; the median rate of each path and every window's rate, and the
    median CPU ms per image where a window gives one (a window returns a rate or (rate, CPU ms))."""
    fast, base = [], []
    for _ in range(windows):
        fast.append(fast_window())
        base.append(baseline_window())
    return _window_summary(fast), _window_summary(base)


def _window_summary(results: list) -> dict:
    rates = [r[0] if isinstance(r, tuple) else r for r in results]
    summary = {"img_s": statistics.median(rates), "windows": rates}
    cpu = [r[1] for r in results if isinstance(r, tuple)]
    if cpu:
        summary["cpu_ms_per_img"] = statistics.median(cpu)
    return summary


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (every thread) and its live child processes (the
    standard recipe's DataLoader workers). On a shared machine a path with more processes gets a
    larger share of the cores, so wall-clock ratios drift with the load; CPU time per image does not."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in _child_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass  # the child ended meanwhile
    return total


def _child_pids() -> list[int]:
    """This process's children, from /proc (empty off Linux)."""
    pids = []
    try:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    except OSError:
        pass
    return pids


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
