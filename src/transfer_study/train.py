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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import distributed, models, serve, tracking
from .cells import Cell
from .checkpoints import CHECKPOINT_DIR, WorkDir, atomic_save, copy_checkpoint, load_checkpoint, result_fingerprint
from .config import Params, UserError, flatten_params
from .distributed import SINGLE_PROCESS, World
from .imagestore import TrainingData, batch_loader, shard_loader
from .runs import run_dir_for, write_run_info
from .split import read_manifest
from .trainer import Trainer, evaluate_loss
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
    t = params.train
    size = t.image_size[cell.architecture]
    models.check_input_size(cell.architecture, size)
    # Resolve weights first: a missing file must fail before any data is decoded or trained.
    if cell.pretrained:
        with world.main_first():  # rank 0 downloads; the others then find the file
            models.resolve_weights(cell.architecture, Path(t.weights_dir) if t.weights_dir else None)

    serve.requirements()  # versions the logged model pins: read now, not after the last epoch
    manifest = read_manifest(root / params.paths.manifest)
    fingerprint = result_fingerprint(params, cell, manifest)
    run_dir = run_dir_for(root / params.paths.outputs / "models", cell.architecture, cell.condition, cell.seed)
    work = WorkDir(root / CHECKPOINT_DIR / f"{cell.name}-{fingerprint}")

    device = world.device(pick_device())
    seed_everything(cell.seed)
    with world.main_first():  # rank 0 builds the image store; the others then read it
        data = TrainingData(manifest, root, size, root / CHECKPOINT_DIR / "stores")
    trainer = Trainer(params, cell, len(data.class_names), device, world)
    state = work.load_state()
    if state is not None:
        trainer.restore(state)
    start_epoch = state["epoch"] + 1 if state else 1
    if world.rank > 0:
        # Other ranks draw their own augmentation and dropout; rank 0 keeps the single-process stream.
        torch.manual_seed(cell.seed * 1_000_003 + world.rank * 10_007 + start_epoch)

    if not world.is_main:
        _train_epochs(trainer, data, params, cell, start_epoch, recorder=None)
        world.barrier()  # wait for rank 0 to finish the cell
        return run_dir

    tracker, experiment_id = _start_run(params, cell, root, tracking_uri, work, state,
                                        {"fingerprint": fingerprint, "image_size": size, "device": device,
                                         "num_train": len(data.rows("train"))})
    try:
        val_loader = batch_loader(data.source(data.rows("val")), t.batch_size * 2, False, 0, 0,
                                  device.type == "cuda")
        recorder = EpochRecorder(trainer, work, tracker, val_loader, data.class_names, cell, t.epochs, state)
        _train_epochs(trainer, data, params, cell, start_epoch, recorder)
        summary = _finish_cell(trainer, data, params, cell, run_dir, work, tracker, recorder,
                               {"experiment_id": experiment_id, "fingerprint": fingerprint, "image_size": size})
    except KeyboardInterrupt:
        log(f"[{cell.name}] interrupted; rerun the same command to resume from the last finished epoch")
        tracker.abandon("KILLED")
        raise
    except BaseException:
        tracker.abandon("FAILED")
        raise
    world.barrier()
    log(f"[{cell.name}] done: best val_acc={recorder.best_val:.4f}; run {summary['run_id']} → {run_dir}")
    return run_dir


def _start_run(params: Params, cell: Cell, root: Path, tracking_uri: str, work: WorkDir, state: dict | None,
               facts: dict) -> tuple[tracking.RunTracker, str]:
    """Start the cell's MLflow run, or continue the one an interrupted attempt began (logging the
    epochs the store missed first); `facts` holds fingerprint, image_size, device and num_train."""
    device = facts["device"]
    spec = tracking.CellRun(
        experiment=params.tracking.experiment, run_name=cell.name,
        params=flatten_params(params) | {"cell.architecture": cell.architecture, "cell.condition": cell.condition,
                                         "cell.seed": str(cell.seed), "cell.image_size": str(facts["image_size"]),
                                         "cell.fingerprint": facts["fingerprint"]},
        tags={"architecture": cell.architecture, "condition": cell.condition, "seed": str(cell.seed),
              "git_commit": tracking.git_commit(root), "dataset_md5": tracking.dataset_hash(root),
              "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
              "num_train_images": str(facts["num_train"])},
    )
    run_id = state["run_id"] if state else work.read_run_id()
    tracker, experiment_id = tracking.start_cell_run(tracking_uri, spec, run_id, work.path)
    work.write_run_id(tracker.run_id)
    manifest_path = root / params.paths.manifest
    tracker.log_dataset_input(read_manifest(manifest_path), manifest_path, params.paths.manifest,
                              spec.tags["dataset_md5"])
    if state is not None:
        log(f"[{cell.name}] resuming MLflow run {tracker.run_id} from epoch {state['epoch'] + 1} "
            f"(state: {work.state_file})")
        work.check_best(state)
        tracker.log_missing_epochs(state["history"], cell.name)
    return tracker, experiment_id


class EpochRecorder:
    """Rank 0's part of each epoch: validate, save the resume state, then log to MLflow.

    In that order, so no epoch is logged twice or lost: a crash before the save redoes the
    epoch, one after it resumes after the epoch and logs it then (RunTracker.log_missing_epochs).
    """

    def __init__(self, trainer: Trainer, work: WorkDir, tracker: tracking.RunTracker, val_loader,
                 class_names: list[str], cell: Cell, epochs: int, state: dict | None):
        self.trainer, self.work, self.tracker, self.val_loader = trainer, work, tracker, val_loader
        self.class_names, self.cell, self.epochs = class_names, cell, epochs
        self.history: list[dict] = list(state["history"]) if state else []
        self.best_val: float = state["best_val"] if state else -1.0
        self.best_epoch: int = state["best_epoch"] if state else 0
        self.best_sha256: str | None = state["best_sha256"] if state else None

    def record(self, epoch: int, train_loss: float, train_acc: float, started: float) -> None:
        trainer = self.trainer
        val_probs, val_labels = trainer.predict(self.val_loader)
        val_loss, val_acc = evaluate_loss(val_probs, val_labels)
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.perf_counter() - started)
        self.history.append(row)
        best_weights = None
        if val_acc > self.best_val:
            self.best_val, self.best_epoch = val_acc, epoch
            best_weights = {"model": trainer.model.state_dict(), "epoch": epoch, "val_acc": val_acc,
                            "class_names": self.class_names}
        state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "epoch": epoch, "best_val": self.best_val,
                 "best_epoch": self.best_epoch, "best_sha256": self.best_sha256, "history": self.history,
                 "run_id": self.tracker.run_id}
        self.work.save_epoch(state, best_weights)
        self.best_sha256 = state["best_sha256"]
        self.tracker.log_metrics(tracking.epoch_metrics(row), step=epoch)
        log(f"[{self.cell.name}] epoch {epoch}/{self.epochs} train_loss={train_loss:.4f} train_acc={train_acc:.4f} "
            f"val_loss={val_loss:.4f} val_acc={val_acc:.4f} ({row['seconds']:.1f}s)")


def _train_epochs(trainer: Trainer, data: TrainingData, params: Params, cell: Cell, start_epoch: int,
                  recorder: EpochRecorder | None) -> None:
    """Train epochs start_epoch..train.epochs on this rank; rank 0's recorder validates and records each."""
    t = params.train
    pin = trainer.device.type == "cuda"
    workers = t.num_workers if pin else 0  # on a 2-core CPU workers steal compute
    train_rows = data.rows("train")
    feature_cache = None
    if start_epoch <= t.epochs and trainer.frozen and not augments(t.augment) and t.max_batches_per_epoch is None:
        # Without augmentation a frozen backbone sees the same images every epoch: compute once.
        all_train = batch_loader(data.source(train_rows), t.batch_size * 2, False, 0, 0, pin)
        feature_cache = trainer.cached_features(all_train)
        if recorder is not None:
            log(f"[{cell.name}] frozen backbone, no augmentation: training the head on cached features")
    for epoch in range(start_epoch, t.epochs + 1):
        started = time.perf_counter()
        # Every rank draws the same order from this seed and takes its own shard of each batch.
        order = torch.Generator().manual_seed(cell.seed * 100_003 + epoch)
        with tqdm(total=len(train_rows), desc=f"{cell.name} epoch {epoch}/{t.epochs}", unit="img",
                  disable=recorder is None or not _is_tty(), leave=False) as bar:
            if feature_cache is not None:
                train_loss, train_acc = trainer.train_head_epoch(*feature_cache, order, bar)
            else:
                permutation = torch.randperm(len(train_rows), generator=order).tolist()
                shards = distributed.shard_batches(permutation, t.batch_size, trainer.world)
                loader = shard_loader(data.source(train_rows), shards, workers, pin)
                train_loss, train_acc = trainer.train_epoch(loader, bar)
        if recorder is not None:
            recorder.record(epoch, train_loss, train_acc, started)


def _finish_cell(trainer: Trainer, data: TrainingData, params: Params, cell: Cell, run_dir: Path, work: WorkDir,
                 tracker: tracking.RunTracker, recorder: EpochRecorder, run_info: dict) -> dict:
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
    all_loader = batch_loader(data.source(), t.batch_size * 2, False, 0, 0, trainer.device.type == "cuda")
    probs, labels = trainer.predict(all_loader)
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
        "class_names": data.class_names, "image_size": run_info["image_size"], "checkpoint": t.checkpoint,
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


