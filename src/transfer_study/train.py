"""Stage `train`: train one (architecture, condition, seed) cell and record it as one MLflow run.

Each epoch runs validate → save the resume state (checkpoints.py) → log to MLflow, so a rerun
after Ctrl-C, a crash or SIGKILL resumes the same run from the last finished epoch. The run
folder (runs.py) is written when the cell is done. Under torchrun (distributed.py) every rank
trains; only rank 0 writes files and talks to MLflow.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import distributed, models, serve, tracking
from .cells import Cell, runs_per_group
from .checkpoints import (CHECKPOINT_DIR, WorkDir, atomic_save, copy_checkpoint, load_checkpoint,
                          result_fingerprint, stale_work_dirs)
from .config import Params, UserError, flatten_params, recorded_dataset_md5
from .distributed import SINGLE_PROCESS, World
from .imagestore import DeviceImages, TrainingData
from .preprocess import check_crops_match
from .runs import run_dir_for, write_run_info
from .split import cell_manifest, read_manifest, train_images_per_class
from .trainer import PREDICT_BATCH, Trainer, evaluate_loss
from .transforms import augments


def pick_device() -> torch.device:
    """CUDA, else MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _is_tty() -> bool:
    return sys.stderr.isatty()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# One cell, end to end
# --------------------------------------------------------------------------------------------


def train_cell(params: Params, cell: Cell, root: Path, tracking_uri: str, world: World = SINGLE_PROCESS) -> Path:
    """Train one cell, resuming an interrupted run when its fingerprint matches.

    Returns the run folder. Raises UserError for bad input (missing weights are detected
    before any training starts). Under torchrun every rank calls this; only rank 0 writes
    the run folder and the MLflow run.
    """
    started = time.perf_counter()
    t = params.train
    size = t.image_size[cell.architecture]
    models.check_input_size(cell.architecture, size)
    # Resolve weights first: a missing file must fail before any data is decoded or trained.
    if cell.pretrained:
        with world.main_first():  # rank 0 downloads; the others then find the file
            models.resolve_weights(cell.architecture, Path(t.weights_dir) if t.weights_dir else None)

    serve.requirements((params.preprocess.cropper,))  # what the logged model pins: read now, not after the last epoch
    # The crops on disk decide the preprocessing the model learns and the served model repeats.
    check_crops_match(root / params.paths.cropped, params.preprocess)
    manifest, fingerprint = cell_data(params, cell, root)
    run_dir = run_dir_for(root / params.paths.outputs / "models", cell.group, cell.variant)
    work = WorkDir.for_run(root, cell.name, fingerprint)

    device = world.device(pick_device())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its kernels once
    seed_everything(cell.seed)
    with world.main_first():  # rank 0 builds the image store; the others then read it
        data = TrainingData(manifest, root, size, root / CHECKPOINT_DIR / "stores")
    images = data.on_device(device)
    if device.type == "cuda" and not images.resident:
        log(f"[{cell.name}] the image store does not fit in GPU memory: batches are copied from the host")
    trainer = Trainer(params, cell, len(data.class_names), device, world)
    state = work.load_state()
    if state is not None:
        trainer.restore(state)
        if world.is_main:  # before the MLflow run is continued: a corrupt file must leave it alone
            work.check_best(state)
    elif world.is_main:
        for stale in stale_work_dirs(root / CHECKPOINT_DIR, cell.name, work.path):
            log(f"[{cell.name}] starting fresh: params or data changed since '{stale}' was written; it is kept "
                f"(delete it unless you go back to those settings)")
    start_epoch = state["epoch"] + 1 if state else 1
    if world.rank > 0:
        # Other ranks draw their own augmentation and dropout; rank 0 keeps the single-process stream.
        torch.manual_seed(cell.seed * 1_000_003 + world.rank * 10_007 + start_epoch)

    if not world.is_main:
        _train_epochs(trainer, images, data.rows("train"), params, cell, start_epoch, recorder=None)
        world.barrier()  # wait for rank 0 to finish the cell
        return run_dir

    tracker, experiment_id = _start_run(params, cell, root, tracking_uri, work, state,
                                        {"fingerprint": fingerprint, "image_size": size, "device": device,
                                         "num_train": len(data.rows("train")), "world_size": world.size,
                                         "train_per_class": train_images_per_class(manifest)})
    try:
        val_rows = data.rows("val")
        recorder = EpochRecorder(trainer, work, tracker, lambda: images.in_order(val_rows, PREDICT_BATCH),
                                 data.class_names, cell, params, state)
        log(f"[{cell.name}] ready to train on {device} after {time.perf_counter() - started:.1f}s")
        _train_epochs(trainer, images, data.rows("train"), params, cell, start_epoch, recorder)
        finishing = time.perf_counter()
        summary = _finish_cell(trainer, data, images, params, cell, run_dir, work, tracker, recorder,
                               {"experiment_id": experiment_id, "fingerprint": fingerprint, "image_size": size})
        log(f"[{cell.name}] run folder written and model logged in {time.perf_counter() - finishing:.1f}s")
    except KeyboardInterrupt:
        log(f"[{cell.name}] interrupted; rerun the same command to resume from the last finished epoch")
        tracker.abandon("KILLED")
        raise
    except BaseException:
        tracker.abandon("FAILED")
        raise
    world.barrier()
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    log(f"[{cell.name}] done: best val_acc={recorder.best_val:.4f}; run {summary['run_id']} → {run_dir}{peak}")
    return run_dir


def cell_data(params: Params, cell: Cell, root: Path) -> tuple[pd.DataFrame, str]:
    """The cell's manifest (every row, with the split this cell uses) and its result fingerprint,
    which names its resume state and tells a finished run of the same params (fanout.py)."""
    manifest = cell_manifest(read_manifest(root / params.paths.manifest), cell.repeat, cell.fraction)
    return manifest, result_fingerprint(params, cell, manifest)


def _start_run(params: Params, cell: Cell, root: Path, tracking_uri: str, work: WorkDir, state: dict | None,
               facts: dict) -> tuple[tracking.RunTracker, str]:
    """Start the cell's MLflow run, or continue the one an interrupted attempt began (logging the
    epochs the store missed first); `facts` holds fingerprint, image_size, device, num_train and world_size."""
    device = facts["device"]
    spec = tracking.CellRun(
        experiment=params.tracking.experiment, run_name=cell.name,
        params=flatten_params(params) | {"cell.architecture": cell.architecture, "cell.condition": cell.condition,
                                         "cell.seed": str(cell.seed), "cell.image_size": str(facts["image_size"]),
                                         "cell.repeat": str(cell.repeat), "cell.fraction": str(cell.fraction),
                                         "cell.fingerprint": facts["fingerprint"]},
        tags={"architecture": cell.architecture, "condition": cell.condition, "seed": str(cell.seed),
              "split_repeat": str(cell.repeat), "train_fraction": str(cell.fraction),
              "train_per_class": f"{facts['train_per_class']:g}",
              "git_commit": tracking.git_commit(root), "dataset_md5": recorded_dataset_md5(root),
              "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
              "num_train_images": str(facts["num_train"]), "world_size": str(facts["world_size"])},
    )
    run_id = state["run_id"] if state else work.read_run_id()
    parent = cell.group if runs_per_group(params) > 1 else None  # nested under one row per study cell
    tracker, experiment_id = tracking.start_cell_run(tracking_uri, spec, run_id, work.path, parent)
    work.write_run_id(tracker.run_id)
    manifest_path = root / params.paths.manifest
    tracker.log_dataset_input(read_manifest(manifest_path), manifest_path, params.paths.manifest,
                              spec.tags["dataset_md5"])
    if state is not None:
        log(f"[{cell.name}] resuming MLflow run {tracker.run_id} from epoch {state['epoch'] + 1} "
            f"(state: {work.state_file})")
        tracker.log_missing_epochs(state["history"], cell.name)
    return tracker, experiment_id


class EpochRecorder:
    """Rank 0's part of each epoch: validate, then, when a save is due, save the resume state and
    log the epochs it covers to MLflow.

    In that order, so no epoch is logged twice or lost: a crash before a save redoes the epochs
    since the last one, a crash after it resumes there and logs what the store missed
    (RunTracker.log_missing_epochs). A save is due every `train.save_every_s` seconds and after
    the last epoch: on a GPU an epoch takes a second, and writing VGG-19's 1.6 GB of weights and
    optimiser state after each would take longer than the training.
    """

    def __init__(self, trainer: Trainer, work: WorkDir, tracker: tracking.RunTracker,
                 val_batches: Callable[[], Iterator], class_names: list[str], cell: Cell, params: Params,
                 state: dict | None):
        self.trainer, self.work, self.tracker, self.val_batches = trainer, work, tracker, val_batches
        self.class_names, self.cell = class_names, cell
        self.epochs, self.save_every_s = params.train.epochs, params.train.save_every_s
        self.history: list[dict] = list(state["history"]) if state else []
        self.best_val: float = state["best_val"] if state else -1.0
        self.best_epoch: int = state["best_epoch"] if state else 0
        self.best_sha256: str | None = state["best_sha256"] if state else None
        self.best_weights: dict | None = None  # best weights not yet written (a copy, on the device)
        self.unlogged: list[dict] = []
        self.last_save = time.perf_counter()

    def record(self, epoch: int, train_loss: float, train_acc: float, started: float) -> None:
        trainer = self.trainer
        val_probs, val_labels = trainer.predict(self.val_batches())
        val_loss, val_acc = evaluate_loss(val_probs, val_labels)
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - started)
        self.history.append(row)
        self.unlogged.append(row)
        if val_acc > self.best_val:
            self.best_val, self.best_epoch = val_acc, epoch
            self.best_weights = {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                                 "epoch": epoch, "val_acc": val_acc, "class_names": self.class_names}
        if epoch == self.epochs or time.perf_counter() - self.last_save >= self.save_every_s:
            self.save(epoch)
        log(f"[{self.cell.name}] epoch {epoch}/{self.epochs} train_loss={train_loss:.4f} train_acc={train_acc:.4f} "
            f"val_loss={val_loss:.4f} val_acc={val_acc:.4f} ({row['seconds']:.1f}s)")

    def save(self, epoch: int) -> None:
        """Write the resume state after `epoch` (and the best weights, if new), then log the epochs since the last save."""
        trainer = self.trainer
        state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(trainer.device) if trainer.device.type == "cuda" else None,
                 "epoch": epoch, "best_val": self.best_val,
                 "best_epoch": self.best_epoch, "best_sha256": self.best_sha256, "history": self.history,
                 "run_id": self.tracker.run_id}
        self.work.save_epoch(state, self.best_weights)
        self.best_sha256, self.best_weights = state["best_sha256"], None
        for row in self.unlogged:
            self.tracker.log_metrics(tracking.epoch_metrics(row), step=row["epoch"])
        self.unlogged, self.last_save = [], time.perf_counter()


def _train_epochs(trainer: Trainer, images: DeviceImages, train_rows: np.ndarray, params: Params, cell: Cell,
                  start_epoch: int, recorder: EpochRecorder | None) -> None:
    """Train epochs start_epoch..train.epochs on this rank; rank 0's recorder validates and records each."""
    t = params.train
    feature_cache = None
    if start_epoch <= t.epochs and trainer.frozen and not augments(t.augment) and t.max_batches_per_epoch is None:
        # Without augmentation a frozen backbone sees the same images every epoch: compute once.
        feature_cache = trainer.cached_features(images.in_order(train_rows, PREDICT_BATCH))
        if recorder is not None:
            log(f"[{cell.name}] frozen backbone, no augmentation: training the head on cached features")
    steps_per_epoch = math.ceil(len(train_rows) / t.batch_size)
    if t.max_batches_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, t.max_batches_per_epoch)
    trainer.set_schedule(steps_per_epoch, t.epochs, steps_done=(start_epoch - 1) * steps_per_epoch)
    progress = CellProgress(cell.name, len(train_rows) * (t.epochs - start_epoch + 1), enabled=recorder is not None)
    for epoch in range(start_epoch, t.epochs + 1):
        started = time.perf_counter()
        # Every rank draws the same order from this seed and takes its own shard of each batch.
        order = torch.Generator().manual_seed(cell.seed * 100_003 + epoch)
        with progress.epoch(epoch, t.epochs, len(train_rows)) as bar:
            if feature_cache is not None:
                train_loss, train_acc = trainer.train_head_epoch(*feature_cache, order, bar)
            else:
                permutation = torch.randperm(len(train_rows), generator=order)
                shards = distributed.shard_batches(train_rows[permutation.numpy()].tolist(), t.batch_size,
                                                   trainer.world)
                train_loss, train_acc = trainer.train_epoch(images.batches(shards), bar)
        if recorder is not None:
            recorder.record(epoch, train_loss, train_acc, started)


class CellProgress:
    """Training progress: tqdm bars on a terminal; in a log (stderr not a terminal), one line at
    least every LOG_EVERY_S seconds with the cell, epoch, images done and the time left."""

    LOG_EVERY_S = 30.0

    def __init__(self, name: str, total_images: int, enabled: bool):
        self.name, self.total, self.enabled = name, max(total_images, 1), enabled
        self.done, self.started, self.last_line = 0, time.perf_counter(), time.perf_counter()
        self.label = ""

    @contextmanager
    def epoch(self, epoch: int, epochs: int, images: int):
        self.label = f"epoch {epoch}/{epochs}"
        if self.enabled and _is_tty():
            with tqdm(total=images, desc=f"{self.name} {self.label}", unit="img", leave=False) as bar:
                yield bar
        else:
            yield self if self.enabled else None

    def update(self, images: int) -> None:
        self.done += images
        now = time.perf_counter()
        if now - self.last_line >= self.LOG_EVERY_S:
            self.last_line = now
            log(progress_line(self.name, self.label, self.done, self.total, now - self.started))


def progress_line(name: str, label: str, done: int, total: int, elapsed_s: float) -> str:
    """`[cell] epoch 3/50: 2,520/63,000 images, 41s elapsed, about 16m 8s left`."""
    left = elapsed_s / max(done, 1) * (total - done)
    return (f"[{name}] {label}: {done:,}/{total:,} images, {elapsed_s:.0f}s elapsed, "
            f"about {int(left // 60)}m {int(left % 60)}s left")


def _finish_cell(trainer: Trainer, data: TrainingData, images: DeviceImages, params: Params, cell: Cell,
                 run_dir: Path, work: WorkDir, tracker: tracking.RunTracker, recorder: EpochRecorder,
                 run_info: dict) -> dict:
    """Write the run folder (checkpoints, predictions, history, run.json), log the model and
    finish the MLflow run, then remove the resume state. Returns run.json's content."""
    t = params.train
    if not recorder.history:
        raise UserError(f"'{work.path}' holds no finished epoch; delete it and rerun")
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    copy_checkpoint(work.best_file(recorder.best_epoch), best_path)
    final = recorder.history[-1]
    atomic_save({"model": trainer.model.state_dict(), "epoch": final["epoch"], "val_acc": final["val_acc"],
                 "class_names": data.class_names}, last_path)
    chosen = best_path if t.checkpoint == "best" else last_path
    trainer.model.load_state_dict(load_checkpoint(chosen)["model"])
    probs, labels = trainer.predict(images.in_order(np.arange(len(images)), PREDICT_BATCH))
    predictions = pd.DataFrame({"path": data.manifest["path"], "split": data.manifest["split"],
                                "label": labels, "pred": probs.argmax(1)})
    for k in range(probs.shape[1]):
        predictions[f"prob_{k}"] = probs[:, k]
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    pd.DataFrame(recorder.history).to_csv(run_dir / "history.csv", index=False)
    tracker.log_artifact(str(run_dir / "history.csv"))
    model = trainer.model.cpu()
    model_info = tracker.log_model(lambda: serve.log_servable_model(
        model, cell.architecture, data.class_names, run_info["image_size"], params, chosen))
    summary = {
        "run_id": tracker.run_id, "experiment_id": run_info["experiment_id"], "run_name": cell.name,
        "architecture": cell.architecture, "condition": cell.condition, "seed": cell.seed,
        "repeat": cell.repeat, "fraction": cell.fraction,
        "train_per_class": train_images_per_class(data.manifest), "class_names": data.class_names, "image_size": run_info["image_size"], "checkpoint": t.checkpoint,
        "model_uri": model_info.model_uri, "fingerprint": run_info["fingerprint"],
    }
    write_run_info(run_dir, summary)
    (run_dir / "metrics.json").write_text(json.dumps({
        "best_val_acc": recorder.best_val, "last_val_acc": final["val_acc"], "last_train_acc": final["train_acc"],
        "epochs": len(recorder.history), "seconds": sum(h["seconds"] for h in recorder.history)}, indent=2))
    tracker.log_metrics({"best_val_acc": recorder.best_val})
    tracker.finish()
    work.remove()
    return summary


