"""The preflight (`transfer-study plan`): which cells the params train, on which device, for about
how long on this machine, and whether they can. Weights, disk and data are checked before any stage
runs, so what would fail hours into a run fails now, in seconds, naming the file or param and the fix.

The estimate comes from a few real training steps of each model here (trainer.Trainer on random
uint8 batches of the cell's size and batch), scaled by the images per epoch (the manifest's row
counts; no image is decoded), the epochs and the validation and prediction passes. The arithmetic,
the disk rule and the profile choice are pure functions; timing, files and the network are the edges.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cells import Cell, cells_for
from .config import ConfigError, Params, SplitParams, TrainParams, UserError

# Profile → params file; `make run` picks the study on a CUDA GPU, the quick profile elsewhere.
PROFILES = {"study": "params.yaml", "quick": "params.quick.yaml"}
PROBE_BATCH = 2  # the smallest batch BatchNorm trains on: the timing starts there
SECOND_BATCH = 8  # the next: far enough from the first to tell a step's fixed part from its per-image part
TIMING_BUDGET_S = 8.0  # per model; a model too slow to reach train.batch_size in it is extrapolated
PROBE_TIMEOUT_S = 5.0  # for the HEAD request that asks whether a missing weights file can be downloaded
FLOAT_BYTES = 4
# Copies of a cell's weights that stay on disk: best.pt and last.pt in its run folder, DVC's cached
# copy of each, and the model MLflow logs.
KEPT_WEIGHT_COPIES = 5
# Seconds per run besides its steps and passes: the MLflow run and its dataset input, the model
# logged, the run folder written. Measured at 2.2-2.7 s per EfficientNet-Lite0 run on the 2-core VM
# (load average 6-9); on a small dataset this, not training, is most of a run.
RUN_BOOKKEEPING_S = 2.5
AFTER_TRAINING_STAGES = 3  # evaluate, report, register: one process each, after the train stages


# --------------------------------------------------------------------------------------------
# Pure: sizes, the time arithmetic, the disk rule, the profile choice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSizes:
    """Images per split, and where the counts come from (the manifest, data/raw or the params)."""

    train: int
    val: int
    test: int
    source: str

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


def expected_split_sizes(n_images: int, split: SplitParams, source: str) -> SplitSizes:
    """About how many of `n_images` each split gets (split.py rounds per class; this, overall)."""
    val, test = round(n_images * split.val), round(n_images * split.test)
    return SplitSizes(n_images - val - test, val, test, source)


@dataclass(frozen=True)
class ModelTiming:
    """One architecture at one size on this device, measured."""

    train_step_s: float  # a training step of every layer on train.batch_size images (scratch, finetune)
    predict_s_per_image: float  # a forward pass in eval mode (validation, prediction, a frozen backbone)
    timed_batch: int  # the largest batch timed: train.batch_size, or fewer when a step is slow


@dataclass(frozen=True)
class CellEstimate:
    cell: Cell
    image_size: int
    train_images_per_s: float  # the rate of its training steps
    epoch_s: float  # training steps and the validation pass of one epoch
    total_s: float  # every epoch, the frozen backbone's feature cache, the final prediction


def estimate_cell(cell: Cell, t: TrainParams, sizes: SplitSizes, timing: ModelTiming) -> CellEstimate:
    """How long `cell` trains: train.epochs × (its steps per epoch over its share of the training
    images (cell.fraction) × a step's seconds + the validation images × a forward pass), plus a
    forward pass over every image at the end.

    A frozen cell's step is its backbone's forward pass under no_grad (the head's share is
    negligible); without augmentation that pass runs once, on cached features, as train.py does.
    Building the image store and logging the model add seconds per cell and are left out.
    """
    from .transforms import augments  # imports torch: kept out of `make ui`'s start

    train_images = round(sizes.train * cell.fraction)
    steps = math.ceil(train_images / t.batch_size)
    if t.max_batches_per_epoch is not None:
        steps = min(steps, t.max_batches_per_epoch)
    frozen = cell.condition == "frozen"
    cached = frozen and not augments(t.augment) and t.max_batches_per_epoch is None
    step_s = timing.predict_s_per_image * t.batch_size if frozen else timing.train_step_s
    epoch_s = (0.0 if cached else steps * step_s) + sizes.val * timing.predict_s_per_image
    once_s = ((train_images if cached else 0) + sizes.total) * timing.predict_s_per_image
    return CellEstimate(cell, t.image_size[cell.architecture], t.batch_size / step_s, epoch_s,
                        t.epochs * epoch_s + once_s)


@dataclass(frozen=True)
class Overhead:
    """What a pipeline run costs besides training and prediction: starting each stage's process
    (importing torch and MLflow: timed here) and each run's bookkeeping (RUN_BOOKKEEPING_S)."""

    processes: int
    process_start_s: float
    runs: int

    @property
    def total_s(self) -> float:
        return self.processes * self.process_start_s + self.runs * RUN_BOOKKEEPING_S


def pipeline_overhead(cells: list[Cell], process_start_s: float) -> Overhead:
    """One train process per (architecture, condition) with cells (dvc.yaml's train matrix), the
    stages after training, and every run's bookkeeping."""
    return Overhead(len({c.group for c in cells}) + AFTER_TRAINING_STAGES, process_start_s, len(cells))


def step_seconds(batch_size: int, timed: list[tuple[int, float]]) -> float:
    """Seconds of a training step on `batch_size` images, from steps timed on growing batches
    [(images, seconds per step), ...]: the largest batch's time, extrapolated linearly beyond it
    with the per-image cost between the two largest batches. That cost is kept between half and
    all of the largest batch's average, since a step has a fixed part and a busy machine is noisy."""
    images, seconds = timed[-1]
    if images >= batch_size or len(timed) == 1:
        return seconds * batch_size / images
    smaller, smaller_seconds = timed[-2]
    per_image = (seconds - smaller_seconds) / (images - smaller)
    per_image = min(max(per_image, seconds / (2 * images)), seconds / images)
    return seconds + per_image * (batch_size - images)


@dataclass(frozen=True)
class CellFootprint:
    """A cell's weights: every parameter, and those the optimiser trains (Adam keeps two moments each)."""

    name: str
    parameters: int
    trainable: int


def disk_needed(footprints: list[CellFootprint], store_bytes: int) -> int:
    """Bytes the cells' files take: KEPT_WEIGHT_COPIES copies of each cell's weights; while the
    largest cell trains, its resume state (weights + Adam's moments) written beside the previous
    one before the rename, and its best-epoch checkpoint; and the uint8 image stores."""
    if not footprints:
        return store_bytes
    kept = sum(KEPT_WEIGHT_COPIES * f.parameters for f in footprints)
    training = max(2 * (f.parameters + 2 * f.trainable) + f.parameters for f in footprints)
    return (kept + training) * FLOAT_BYTES + store_bytes


def store_bytes(n_images: int, sizes: set[int]) -> int:
    """The uint8 (N, size, size, 3) image stores, one per image size."""
    return sum(n_images * size * size * 3 for size in sizes)


def check_disk(needed: int, free: int, folder: Path) -> None:
    """UserError when `free` bytes at `folder` are fewer than `needed`."""
    if free < needed:
        raise UserError(
            f"the disk holding '{folder}' has {gigabytes(free)} free, and these cells' checkpoints, models and "
            f"image stores need about {gigabytes(needed)}; free space there, or train fewer cells "
            f"(train.architectures, train.conditions, train.exclude)"
        )


def choose_profile(requested: str | None, cuda: bool) -> tuple[str, str]:
    """The profile `make run` runs, and why: the one asked for; else the study on a CUDA GPU and
    the quick profile without one (the study's 50 epochs at 224-299 px take days on a CPU)."""
    if requested:
        if requested not in PROFILES:
            raise ConfigError(f"PROFILE={requested}: choose one of {', '.join(PROFILES)}")
        return requested, f"the {requested} profile ({PROFILES[requested]}), as asked"
    if cuda:
        return "study", f"a CUDA GPU is here: the study profile ({PROFILES['study']})"
    return "quick", (f"no CUDA GPU here: the quick profile ({PROFILES['quick']}) instead of the study "
                     f"({PROFILES['study']}, days on a CPU); PROFILE=study chooses the study anyway")


def profile_to_open(requested: str | None, cuda: bool, registered: dict[str, str]) -> tuple[str, str]:
    """The profile `make ui` and `make serve` open, and why: the one asked for; else the one whose
    champion was registered last (`registered`: profile → its registry/champion.json, newest
    last), so the model served is the one just trained, whatever the machine; else as `make run`."""
    if requested or not registered:
        return choose_profile(requested, cuda)
    profile, record = list(registered.items())[-1]
    others = ", ".join(f"PROFILE={p}" for p in PROFILES if p != profile)
    return profile, (f"the {profile} profile ({PROFILES[profile]}): its champion is the last registered ({record}); "
                     f"{others} opens the other")


def profile_of(params_path: str | Path) -> str | None:
    """The profile whose params file is `params_path`, or None for another file."""
    name = Path(params_path).as_posix()
    return next((profile for profile, path in PROFILES.items() if path == name), None)


def format_duration(seconds: float) -> str:
    """'40 s', '12 min', '3 h 28 min', '2 d 5 h'."""
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def gigabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


# --------------------------------------------------------------------------------------------
# Edges: timing real steps, weights, data, disk
# --------------------------------------------------------------------------------------------


def _clock(device) -> float:
    """perf_counter after the device's queued work (a GPU runs asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_training_steps(trainer, batch, steps: int, warmup: int = 1) -> float:
    """Seconds per training step of `trainer` on `batch` (uint8 images (N, 3, H, W), labels),
    timed over `steps` steps after `warmup` untimed ones (the first steps of a model allocate).

    Each stamp is taken when the loop asks for its next batch, i.e. after the previous step
    finished (train_epoch reads each step's loss), so any loop over (images, labels) works.
    """
    stamps: list[float] = []

    def batches():
        for _ in range(warmup + steps):
            stamps.append(_clock(trainer.device))
            yield batch
        stamps.append(_clock(trainer.device))

    trainer.train_epoch(batches(), None)
    return (stamps[-1] - stamps[warmup]) / steps


def time_prediction(trainer, batch, repeats: int) -> float:
    """Seconds per forward pass of `trainer.predict` on `batch`, after one untimed pass."""
    trainer.predict([batch])
    started = _clock(trainer.device)
    trainer.predict([batch] * repeats)
    return (_clock(trainer.device) - started) / repeats


def random_batch(n: int, size: int, num_classes: int):
    """n random uint8 images (n, 3, size, size) and labels: what a loader gives train_epoch."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, num_classes, (n,), generator=generator)


def time_growing_batches(trainer, size: int, num_classes: int, batch_size: int, min_sizes: int = 2,
                         budget_s: float = TIMING_BUDGET_S) -> list[tuple[int, float]]:
    """Training steps timed on batches of 2, 8, 16 ... images up to `batch_size`, the faster of two
    steps each (the first size after a warm-up step); [(images, seconds)].

    `min_sizes` sizes at least: two tell a step's fixed part (the optimiser's update of every
    weight, a thread hand-off per layer on a CPU) from its per-image part; scaled from 2 images
    alone, a ResNet-18 step at 64 px on a CPU looks several times slower than it is. Then larger
    sizes while their two steps, even if their time grows with the images, fit `budget_s`
    (counted from the end of the first size, whose warm-up step allocates).
    """
    timed, images, started = [], PROBE_BATCH, None
    while True:
        batch = random_batch(images, size, num_classes)
        # The faster of two steps: another process's burst on a shared CPU can double a single one.
        seconds = min(time_training_steps(trainer, batch, 1, warmup=0 if timed else 1),
                      time_training_steps(trainer, batch, 1, warmup=0))
        timed.append((images, seconds))
        started = started or time.perf_counter()
        following = min(max(2 * images, SECOND_BATCH), batch_size)
        next_cost = 2 * seconds * following / images
        if images >= batch_size or (len(timed) >= min_sizes and
                                    time.perf_counter() - started + next_cost > budget_s):
            return timed
        images = following


def time_model(params: Params, arch: str, num_classes: int, device, thorough: bool = True) -> ModelTiming:
    """Time `arch` at its train.image_size: training steps on growing batches up to
    train.batch_size (step_seconds extrapolates when the budget stops short of it), then
    forward passes on twice the largest batch, as prediction runs. Without `thorough`, a slow
    model gets one batch size (a rough estimate, for a profile that will not run here).

    The model trains every layer from random weights: a finetune step costs the same, and a
    frozen step is the forward pass timed here, so no ImageNet weights are needed."""
    from .trainer import Trainer

    t = dataclasses.replace(params.train, max_batches_per_epoch=None)  # the timed steps must all run
    trainer = Trainer(dataclasses.replace(params, train=t), Cell(arch, "scratch", 0), num_classes, device)
    size = t.image_size[arch]
    timed = time_growing_batches(trainer, size, num_classes, t.batch_size, min_sizes=2 if thorough else 1)
    train_step = step_seconds(t.batch_size, timed)
    images = 2 * timed[-1][0]  # a forward pass has little fixed cost: this batch is near the real one's rate
    predict = time_prediction(trainer, random_batch(images, size, num_classes), 1) / images
    return ModelTiming(train_step, predict, timed[-1][0])


def estimate_cells(params: Params, cells: list[Cell], sizes: SplitSizes, num_classes: int,
                   device, thorough: bool = True) -> list[CellEstimate]:
    """Each cell's estimate, timing each architecture once (its conditions and seeds share the timing)."""
    timings: dict[str, ModelTiming] = {}
    for arch in dict.fromkeys(c.architecture for c in cells):
        timings[arch] = time_model(params, arch, num_classes, device, thorough)
    return [estimate_cell(c, params.train, sizes, timings[c.architecture]) for c in cells]


def footprint(cell: Cell, t: TrainParams, num_classes: int) -> CellFootprint:
    """The cell's parameter counts, from its architecture built on the meta device (no memory, instant)."""
    import torch

    from . import models

    with torch.device("meta"):
        model = models.build_model(cell.architecture, num_classes, pretrained=False, aux_logits=t.aux_logits)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.head.parameters()) if cell.condition == "frozen" else total
    return CellFootprint(cell.name, total, trainable)


def url_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a HEAD request to `url` gets an answer below 400 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            return response.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(frozen=True)
class WeightsStatus:
    architecture: str
    path: Path | None  # the file training will load; None: training downloads it from `url`
    url: str | None


def check_weights(cells: list[Cell], weights_dir: Path | None,
                  reachable: Callable[[str], bool] = url_reachable) -> list[WeightsStatus]:
    """The ImageNet weights file of every architecture a pretrained cell needs, or, when it is
    missing but its URL answers, where training will download it from.

    Raises WeightsMissing naming the cell, the file and the fix when a file is missing and
    cannot be downloaded: training would otherwise fail at that cell, after the ones before it.
    """
    from . import models

    statuses = []
    first_cell = {}
    for cell in cells:
        if cell.pretrained:
            first_cell.setdefault(cell.architecture, cell)
    for arch, cell in first_cell.items():
        path, url = None, None
        try:
            path = models.resolve_weights(arch, weights_dir, download=False)
        except models.WeightsMissing as missing:
            url = models.weights_url(arch)
            if url is None or not reachable(url):
                where = f" and {url} cannot be reached from here" if url else ""
                raise models.WeightsMissing(f"cell {cell.name} needs ImageNet weights{where}: {missing}") from None
        statuses.append(WeightsStatus(arch, path, url))
    return statuses


@dataclass(frozen=True)
class DataState:
    """What the data stages have built so far."""

    raw_images: int  # files in raw/<class>/ (0: nothing fetched or copied yet)
    raw_classes: int
    cropped: Path
    cropped_present: bool
    manifest_sizes: SplitSizes | None
    manifest_classes: int


def usable_raw_images(root: Path, raw: str, validation: str) -> dict[str, int]:
    """Images per class folder of root/raw as `data validate` counts them: files with an image
    suffix, less those the last validation (root/validation, when there is one) excluded."""
    import json

    from .data import list_images

    try:
        excluded = set(json.loads((root / validation).read_text()).get("excluded", []))
    except (OSError, ValueError, AttributeError):
        excluded = set()
    return {label: sum(p.relative_to(root).as_posix() not in excluded and str(p) not in excluded for p in paths)
            for label, paths in list_images(root / raw).items()}


def read_data_state(params: Params, root: Path) -> DataState:
    """Count raw images (as validate does) and read the manifest's split column (no image is opened)."""
    from .split import read_manifest

    per_class = usable_raw_images(root, params.paths.raw, params.paths.validation)
    class_dirs = [label for label, count in per_class.items() if count]
    raw_images = sum(per_class.values())
    cropped = root / params.paths.cropped
    manifest_path = root / params.paths.manifest
    sizes, classes = None, 0
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        counts = manifest["split"].value_counts()
        sizes = SplitSizes(int(counts.get("train", 0)), int(counts.get("val", 0)), int(counts.get("test", 0)),
                           params.paths.manifest)
        classes = manifest["label"].nunique()
    return DataState(raw_images, len(class_dirs), cropped, cropped.is_dir() and any(cropped.iterdir()), sizes,
                     classes)


def planned_sizes(state: DataState, params: Params) -> tuple[SplitSizes, int]:
    """Split sizes and the number of classes: the manifest's, else expected from data/raw, else from
    the default dataset's params (data.per_class × data.classes)."""
    if state.manifest_sizes is not None:
        return state.manifest_sizes, state.manifest_classes
    if state.raw_images:
        return expected_split_sizes(state.raw_images, params.split, params.paths.raw), state.raw_classes
    n = params.data.per_class * len(params.data.classes)
    return expected_split_sizes(n, params.split, "data.per_class × data.classes"), len(params.data.classes)


def data_lines(state: DataState, params: Params, skip_data: bool) -> list[str]:
    """What exists and which stage builds the rest; UserError when the stages that build the crops
    will not run (`--skip-data`) and there are none."""
    p = params.paths
    if not state.cropped_present and skip_data:
        raise UserError(f"'{state.cropped}' (paths.cropped) is empty and --skip-data skips the stages that "
                        f"build it; run `dvc repro preprocess` first, or drop --skip-data")
    lines = [f"{p.raw}: {state.raw_images} images in {state.raw_classes} class folders" if state.raw_images
             else f"{p.raw}: empty; the data fetch stage writes the default dataset (Fashion-MNIST) first"]
    lines.append(f"{p.cropped}: present" if state.cropped_present
                 else f"{p.cropped}: not built yet; the preprocess stage builds it")
    if state.manifest_sizes is None:
        lines.append(f"{p.manifest}: not built yet; the split stage builds it")
    else:
        s = state.manifest_sizes
        lines.append(f"{p.manifest}: {s.train} train, {s.val} val, {s.test} test images")
    return lines


# --------------------------------------------------------------------------------------------
# The preflight
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    params_path: str
    device: str
    estimates: list[CellEstimate]
    sizes: SplitSizes
    timing_s: float  # how long timing the models took
    overhead: Overhead | None  # what the whole pipeline run adds to training; None: not estimated
    data: list[str]
    weights: list[WeightsStatus]
    disk: tuple[int, int, Path] | None  # needed, free, folder; None when not checked


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


@dataclass(frozen=True)
class ThisMachine:
    """Where the runs train unless told otherwise: here. Checks the weights files here and times
    the models on this machine's device (fanout.RayNode does both on a node of a Ray cluster)."""

    reachable: Callable[[str], bool] = url_reachable

    def check_weights(self, cells: list[Cell], t: TrainParams) -> list[WeightsStatus]:
        return check_weights(cells, Path(t.weights_dir) if t.weights_dir else None, self.reachable)

    def estimate(self, params: Params, cells: list[Cell], sizes: SplitSizes, num_classes: int,
                 thorough: bool) -> tuple[str, list[CellEstimate]]:
        """The device's name and each cell's estimate, timed here."""
        from .train import pick_device  # imports MLflow's pyfunc: after the checks, which must be quick

        device = pick_device()
        return device_name(device), estimate_cells(params, cells, sizes, num_classes, device, thorough=thorough)


def preflight(params: Params, params_path: str, root: Path, skip_data: bool = False, checks: bool = True,
              reachable: Callable[[str], bool] | None = None, host=None) -> Plan:
    """Check data, weights and disk, then time each architecture; without `checks` (a profile
    that will not run here), time it only, and roughly.

    The checks run first and raise UserError at the first problem, before anything is timed.
    `reachable` tells whether a weights URL answers (default: url_reachable). `host` is where the
    runs train, which checks the weights and times the models: ThisMachine unless given.
    """
    # A stage process starts by importing torch and then MLflow (train's imports): both are timed
    # here, where they happen anyway, as the start of each stage's process.
    started = time.perf_counter()
    import torch  # noqa: F401  (the weights and disk checks need it)

    import_s = time.perf_counter() - started
    host = host or ThisMachine(reachable or url_reachable)
    cells = cells_for(params)
    t = params.train
    state = read_data_state(params, root)
    sizes, num_classes = planned_sizes(state, params)
    data, weights, disk = [], [], None
    if checks:
        data = data_lines(state, params, skip_data)
        weights = host.check_weights(cells, t)
        footprints = [footprint(c, t, max(num_classes, 2)) for c in cells]
        needed = disk_needed(footprints, store_bytes(sizes.total, {t.image_size[c.architecture] for c in cells}))
        free = shutil.disk_usage(root).free
        check_disk(needed, free, root)
        disk = (needed, free, root)
    started = time.perf_counter()
    from . import train  # noqa: F401  (imports MLflow's pyfunc: after the checks, which must be quick)

    import_s += time.perf_counter() - started
    started = time.perf_counter()
    device, estimates = host.estimate(params, cells, sizes, max(num_classes, 2), thorough=checks)
    return Plan(params_path, device, estimates, sizes, time.perf_counter() - started,
                pipeline_overhead(cells, import_s), data, weights, disk)


def format_plan(plan: Plan) -> str:
    """The plan as the lines `transfer-study plan` prints."""
    width = max([len(e.cell.name) for e in plan.estimates] + [4])
    count = len(plan.estimates)
    lines = [f"plan for {plan.params_path}: {count} cell{'' if count == 1 else 's'} on {plan.device}",
             f"  {'cell':<{width}}   px  train img/s  per epoch  total"]
    for e in plan.estimates:
        lines.append(f"  {e.cell.name:<{width}}  {e.image_size:>3}  {e.train_images_per_s:>11.1f}  "
                     f"{format_duration(e.epoch_s):>9}  {format_duration(e.total_s)}")
    total = sum(e.total_s for e in plan.estimates)
    s = plan.sizes
    lines.append(f"  total: about {format_duration(total)} of training and prediction "
                 f"({s.train} train, {s.val} val, {s.test} test images, from {s.source}; "
                 f"timed from real steps of each model here in {plan.timing_s:.0f} s)")
    if plan.overhead:
        o = plan.overhead
        lines.append(f"  the whole run: about {format_duration(total + o.total_s)}, with {o.processes} stage processes "
                     f"starting in {o.process_start_s:.0f} s each (timed here) and {o.runs} runs' MLflow logging "
                     f"and run folders (about {RUN_BOOKKEEPING_S:g} s each)")
    if plan.data:
        lines += ["data:"] + [f"  {line}" for line in plan.data]
    if plan.weights:
        lines.append("weights:")
        for w in plan.weights:
            lines.append(f"  {w.architecture}: {w.path}" if w.path else
                         f"  {w.architecture}: not here yet; training downloads it from {w.url} "
                         f"(`transfer-study weights fetch` does it now)")
    if plan.disk:
        needed, free, folder = plan.disk
        lines.append(f"disk: about {gigabytes(needed)} for checkpoints, models and image stores; "
                     f"{gigabytes(free)} free at {folder}")
    return "\n".join(lines)

