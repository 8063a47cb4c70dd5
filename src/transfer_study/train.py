"""Stage `train`: train one (architecture, condition, seed) cell and record it as one MLflow run.

Each epoch runs validate → save the resume state (checkpoints.py) → log to MLflow, so a rerun
after Ctrl-C, a crash or SIGKILL resumes the same run from the last finished epoch. The run
folder (runs.py) is written when the cell is done. Under torchrun (distributed.py) every rank
trains; only rank 0 writes files and talks to MLflow.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import distributed, models, serve, tracking
from .cells import Cell, runs_per_group
from .checkpoints import (CHECKPOINT_DIR, WorkDir, atomic_save, load_checkpoint, result_fingerprint,
                          stale_work_dirs)
from .config import Params, UserError, flatten_params, recorded_dataset_md5
from .distributed import SINGLE_PROCESS, World
from .imagestore import DeviceImages, TrainingData
from .preprocess import check_crops_match
from .runs import run_dir_for, write_run_info
from .split import cell_manifest, read_manifest, train_images_per_class
from .stopping import Progress, StopRule, epoch_steps, progress, stop_rule
from .trainer import PREDICT_BATCH, Trainer, caches_features, evaluate_loss


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
    rule = stop_rule(t, epoch_steps(len(data.rows("train")), t))
    features = frozen_features(trainer, images)
    predict_rows = row_predictor(trainer, images, features)

    if not world.is_main:
        _train_epochs(trainer, images, data.rows("train"), params, cell, rule, state, None, features)
        world.barrier()  # wait for rank 0 to finish the cell
        return run_dir

    tracker, experiment_id = _start_run(params, cell, root, tracking_uri, work, state,
                                        {"fingerprint": fingerprint, "image_size": size, "device": device,
                                         "num_train": len(data.rows("train")), "world_size": world.size,
                                         "train_per_class": train_images_per_class(manifest)})
    try:
        val_rows = data.rows("val")
        recorder = EpochRecorder(trainer, work, tracker, lambda: predict_rows(val_rows),
                                 data.class_names, cell, params, state, rule)
        log(f"[{cell.name}] ready to train on {device} after {time.perf_counter() - started:.1f}s")
        _train_epochs(trainer, images, data.rows("train"), params, cell, rule, state, recorder, features)
        finishing = time.perf_counter()
        summary = _finish_cell(trainer, data, predict_rows, params, cell, run_dir, work, tracker, recorder,
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
    """The cell's manifest (its replicate's rows, with the split this cell uses, and the external
    rows) and its result fingerprint, which names its resume state and tells a finished run of the
    same params (fanout.py)."""
    manifest = cell_manifest(read_manifest(root / params.paths.manifest), cell.repeat, cell.fraction, cell.replicate)
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
                                         "cell.replicate": str(cell.replicate),
                                         "cell.fingerprint": facts["fingerprint"]},
        tags={"architecture": cell.architecture, "condition": cell.condition, "seed": str(cell.seed),
              "replicate": str(cell.replicate),
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


def frozen_features(trainer: Trainer, images: DeviceImages) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A frozen backbone's features (N, D) and labels of every image of the cell, in the store's
    order, computed once: its backbone is in eval mode, so they never change, and validation, the
    cached-feature training and the final predictions all take theirs from here. None otherwise."""
    if not trainer.frozen:
        return None
    return trainer.cached_features(images.in_order(np.arange(len(images)), PREDICT_BATCH))


def row_predictor(trainer: Trainer, images: DeviceImages,
                  features: tuple[torch.Tensor, torch.Tensor] | None) -> Callable[[np.ndarray], tuple]:
    """(probabilities, labels) of the given rows of the store, with the model's current weights:
    the model on the images, or, for a frozen backbone, the head on its features (frozen_features).
    Validation calls it each epoch, and the run's predictions come from it."""
    if features is not None:
        return lambda rows: trainer.predict_features(*(f[torch.as_tensor(rows, device=f.device)] for f in features))
    return lambda rows: trainer.predict(images.in_order(rows, PREDICT_BATCH))


class EpochRecorder:
    """Rank 0's part of each epoch: validate, apply the training rule (stopping.progress: the best
    epoch so far, whether to stop), then, when a save is due, save the resume state and log the
    epochs it covers to MLflow.

    In that order, so no epoch is logged twice or lost: a crash before a save redoes the epochs
    since the last one, a crash after it resumes there and logs what the store missed
    (RunTracker.log_missing_epochs). A save is due every `train.save_every_s` seconds: on a GPU an
    epoch takes a second, and writing VGG-19's 1.6 GB of weights and optimiser state after each
    would take longer than the training. The last epoch saves nothing: _finish_cell writes the run
    folder from memory and logs what is left (a crash in between redoes the epochs since the last save,
    and logs none of them twice).
    """

    def __init__(self, trainer: Trainer, work: WorkDir, tracker: tracking.RunTracker,
                 validate: Callable[[], tuple[np.ndarray, np.ndarray]], class_names: list[str], cell: Cell,
                 params: Params, state: dict | None, rule: StopRule):
        self.trainer, self.work, self.tracker, self.validate = trainer, work, tracker, validate
        self.class_names, self.cell, self.rule = class_names, cell, rule
        self.save_every_s = params.train.save_every_s
        self.history: list[dict] = list(state["history"]) if state else []
        self.best_val: float = state["best_val"] if state else -1.0  # the best epoch's validation accuracy
        self.best_epoch: int = state["best_epoch"] if state else 0
        self.best_sha256: str | None = state["best_sha256"] if state else None
        self.best_weights: dict | None = None  # best weights not yet written (a copy, on the device)
        self.unlogged: list[dict] = []
        # Epochs the store holds beyond the resume state: an attempt stopped while it wrote the run
        # folder had logged them; training them again must not log them twice.
        self.logged_before = set(tracker.logged_steps("val_acc")) if state else set()
        self.last_save = time.perf_counter()

    def record(self, epoch: int, train_loss: float, train_acc: float, started: float) -> Progress:
        """Validate after `epoch` and keep its weights if it is the best so far; returns the training
        rule's decision (stop here? the learning rate's factor from now on)."""
        trainer = self.trainer
        val_probs, val_labels = self.validate()
        val_loss, val_acc = evaluate_loss(val_probs, val_labels)
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - started)
        self.history.append(row)
        self.unlogged.append(row)
        decision = progress(self.history, self.rule)
        if decision.best_epoch == epoch:
            self.best_val, self.best_epoch = val_acc, epoch
            self.best_weights = {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                                 "epoch": epoch, "val_acc": val_acc, "class_names": self.class_names}
        if not decision.stop and time.perf_counter() - self.last_save >= self.save_every_s:
            # The last epoch writes no resume state: the run folder follows at once (_finish_cell).
            self.save(epoch)
        notes = [f"learning rate x{decision.lr_scale:g}"] if decision.lr_scale != 1 else []
        if decision.stop:
            notes.append(f"stopping: best epoch {decision.best_epoch}"
                         + (", at the cap while still improving" if decision.hit_cap else ""))
        log(f"[{self.cell.name}] epoch {epoch}/{self.rule.max_epochs} train_loss={train_loss:.4f} "
            f"train_acc={train_acc:.4f} val_loss={val_loss:.4f} val_acc={val_acc:.4f} ({row['seconds']:.1f}s)"
            + "".join(f"; {note}" for note in notes))
        return decision

    def outcome(self) -> dict:
        """What run.json and metrics.json record of the training rule: epochs trained, the cap, the
        best epoch and whether the run hit the cap while still improving."""
        decision = progress(self.history, self.rule)
        return {"epochs": decision.epochs, "max_epochs": self.rule.max_epochs, "best_epoch": decision.best_epoch,
                "hit_cap": decision.hit_cap}

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
        self.log_unlogged()
        self.last_save = time.perf_counter()

    def log_unlogged(self) -> None:
        """Log the epochs finished since the last save to MLflow (those the store lacks)."""
        for row in self.unlogged:
            if row["epoch"] not in self.logged_before:
                self.tracker.log_metrics(tracking.epoch_metrics(row), step=row["epoch"])
        self.unlogged = []

    def best_checkpoint(self) -> dict:
        """The best epoch's checkpoint: from memory when no save wrote it yet, else its verified file."""
        if self.best_weights is not None:
            return self.best_weights
        return load_checkpoint(self.work.best_file(self.best_epoch), self.best_sha256)


def _train_epochs(trainer: Trainer, images: DeviceImages, train_rows: np.ndarray, params: Params, cell: Cell,
                  rule: StopRule, state: dict | None, recorder: EpochRecorder | None,
                  features: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Train the epochs after the resume state's (if any) on this rank until the training rule
    stops the run; rank 0's recorder validates and records each and decides, and every rank
    learns its decision. `features`: frozen_features, for a frozen backbone."""
    t = params.train
    start_epoch = state["epoch"] + 1 if state else 1
    resumed = progress(state["history"] if state else [], rule)
    stopped = resumed.stop  # stopped before an interruption
    trainer.set_lr_scale(resumed.lr_scale)
    feature_cache = None
    if not stopped and start_epoch <= rule.max_epochs and caches_features(cell.condition, t):
        # A frozen backbone sees the same images (or their mirror images) every epoch: compute once.
        rows = torch.as_tensor(train_rows, device=features[0].device)
        feature_cache = (features[0][rows], features[1][rows])
        if t.augment.hflip:
            mirrored, _ = trainer.cached_features(images.in_order(train_rows, PREDICT_BATCH), flipped=True)
            feature_cache = (torch.stack([feature_cache[0], mirrored]), feature_cache[1])
        if recorder is not None:
            log(f"[{cell.name}] frozen backbone, {'flips' if t.augment.hflip else 'no'} augmentation: training the "
                f"head on cached features")
    steps_per_epoch = epoch_steps(len(train_rows), t)
    trainer.set_schedule(steps_per_epoch, rule.max_epochs, steps_done=(start_epoch - 1) * steps_per_epoch)
    bars = CellProgress(cell.name, len(train_rows) * (rule.max_epochs - start_epoch + 1), enabled=recorder is not None)
    for epoch in range(start_epoch, rule.max_epochs + 1):
        if stopped:
            break
        started = time.perf_counter()
        # Every rank draws the same order from this seed and takes its own shard of each batch.
        order = torch.Generator().manual_seed(cell.seed * 100_003 + epoch)
        with bars.epoch(epoch, rule.max_epochs, len(train_rows)) as bar:
            if feature_cache is not None:
                train_loss, train_acc = trainer.train_head_epoch(*feature_cache, order, bar)
            else:
                permutation = torch.randperm(len(train_rows), generator=order)
                shards = distributed.shard_batches(train_rows[permutation.numpy()].tolist(), t.batch_size,
                                                   trainer.world)
                train_loss, train_acc = trainer.train_epoch(images.batches(shards), bar)
        # Rank 0 applies the rule; the others contribute zeros to the sum and so learn its decision.
        decision = recorder.record(epoch, train_loss, train_acc, started) if recorder is not None else None
        stop, lr_scale = trainer.world.sum([float(decision.stop), decision.lr_scale] if decision else [0.0, 0.0],
                                           trainer.device)
        stopped = stop > 0
        trainer.set_lr_scale(lr_scale)


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


def _finish_cell(trainer: Trainer, data: TrainingData, predict_rows: Callable[[np.ndarray], tuple],
                 params: Params, cell: Cell, run_dir: Path, work: WorkDir, tracker: tracking.RunTracker,
                 recorder: EpochRecorder, run_info: dict) -> dict:
    """Write the run folder (checkpoints, predictions, history, run.json), log the last epochs'
    metrics and the model, finish the MLflow run, then remove the resume state. Returns run.json's
    content. Each checkpoint is written once and hashed as it is written; the chosen weights are
    taken from memory, not read back."""
    t = params.train
    if not recorder.history:
        raise UserError(f"'{work.path}' holds no finished epoch; delete it and rerun")
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    best = recorder.best_checkpoint()
    atomic_save(best, best_path)
    final = recorder.history[-1]
    atomic_save({"model": trainer.model.state_dict(), "epoch": final["epoch"], "val_acc": final["val_acc"],
                 "class_names": data.class_names}, last_path)
    chosen = best_path if t.checkpoint == "best" else last_path
    if t.checkpoint == "best":
        trainer.model.load_state_dict(best["model"])
    del best
    predicting = time.perf_counter()
    probs, labels = predict_rows(np.arange(len(data.manifest)))
    log(f"[{cell.name}] predicted all {len(labels):,} images in {time.perf_counter() - predicting:.1f}s")
    predictions = pd.DataFrame({"path": data.manifest["path"], "split": data.manifest["split"],
                                "label": labels, "pred": probs.argmax(1)})
    for k in range(probs.shape[1]):
        predictions[f"prob_{k}"] = probs[:, k]
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    pd.DataFrame(recorder.history).to_csv(run_dir / "history.csv", index=False)
    recorder.log_unlogged()
    tracker.log_artifact(str(run_dir / "history.csv"))
    model = trainer.model.cpu()
    model_info = tracker.log_model(lambda: serve.log_servable_model(
        model, cell.architecture, data.class_names, run_info["image_size"], params, chosen))
    summary = {
        "run_id": tracker.run_id, "experiment_id": run_info["experiment_id"], "run_name": cell.name,
        "architecture": cell.architecture, "condition": cell.condition, "seed": cell.seed,
        "repeat": cell.repeat, "fraction": cell.fraction,
        "train_per_class": train_images_per_class(data.manifest), "class_names": data.class_names, "image_size": run_info["image_size"], "checkpoint": t.checkpoint,
        "model_uri": model_info.model_uri, "fingerprint": run_info["fingerprint"], "replicate": cell.replicate,
        **recorder.outcome(),
    }
    write_run_info(run_dir, summary)
    (run_dir / "metrics.json").write_text(json.dumps({
        "best_val_acc": recorder.best_val, "last_val_acc": final["val_acc"], "last_train_acc": final["train_acc"],
        **recorder.outcome(), "seconds": sum(h["seconds"] for h in recorder.history)}, indent=2))
    tracker.log_metrics({"best_val_acc": recorder.best_val} | {k: float(v) for k, v in recorder.outcome().items()})
    tracker.finish()
    work.remove()
    return summary


