"""Train one (architecture, condition, seed) cell and record it as one MLflow run.

Layout of a run folder, `<outputs>/models/<arch>-<condition>/s<seed>/`, is described in
DEVELOPERS.md. The resumable state lives outside DVC's outs (DVC deletes outs before
a stage runs), under `checkpoints/<cell>-<fingerprint>/`, keyed by the run name and a hash
of the params that affect the result, so a rerun after Ctrl-C, a crash or SIGKILL resumes
the same MLflow run from the last finished epoch. The run folder is written when the cell
is done.

Every checkpoint has a `.sha256` file beside it, and is checked against it before it is
loaded: a corrupt file is reported, never used. Under torchrun (see distributed.py) only
rank 0 writes files and talks to MLflow.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed, imagestore, models, tracking
from .checksums import file_sha256
from .config import ConfigError, Params, UserError, flatten_params
from .distributed import SINGLE_PROCESS, World

CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class Cell:
    architecture: str
    condition: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.condition}-s{self.seed}"

    @property
    def pretrained(self) -> bool:
        return self.condition != "scratch"


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


def result_fingerprint(params: Params, cell: Cell, manifest: pd.DataFrame) -> str:
    """Hash of everything that changes the result of a cell: a resume is only
    trusted when this matches."""
    relevant = {
        "train": dataclasses.asdict(params.train),
        "preprocess": dataclasses.asdict(params.preprocess),
        "cell": dataclasses.asdict(cell),
        "data": sorted(zip(manifest["sha256"], manifest["split"], manifest["label"])),
    }
    relevant["train"].pop("architectures")
    relevant["train"].pop("conditions")
    relevant["train"].pop("seeds")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_manifest(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"split manifest '{path}' not found; run `dvc repro split` first")
    manifest = pd.read_csv(path)
    missing = {"path", "label", "split", "sha256"} - set(manifest.columns)
    if missing:
        raise UserError(f"manifest '{path}' lacks columns {sorted(missing)}; rerun `dvc repro split`")
    for split in ("train", "val"):
        if not (manifest["split"] == split).any():
            raise UserError(f"manifest '{path}' has no '{split}' rows; check the split ratios in params.yaml")
    return manifest


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_hash(root: Path) -> str:
    """The md5 DVC recorded for data/raw (data.dvc), so a run names its dataset version."""
    import yaml

    dvc_file = root / "data.dvc"
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        return str(outs[0].get("md5", "unknown"))
    return "unknown"


# --------------------------------------------------------------------------------------------
# Checkpoints: written atomically with a checksum, verified before they are loaded
# --------------------------------------------------------------------------------------------


class _HashingWriter:
    """A binary file wrapper that hashes what passes through it and keeps the first write error
    (torch.save reports a failed write as a bare RuntimeError; the OSError says why)."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.digest, self.error = handle, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            written = self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.digest.update(data)
        return written

    def flush(self) -> None:
        self.handle.flush()


def checksum_path(path: Path) -> Path:
    """Where the SHA-256 of `path` is kept: `<name>.sha256`, in `sha256sum` format."""
    return path.with_name(path.name + ".sha256")




def _write_failure(path: Path, exc: BaseException) -> str:
    """What to tell the user when writing `path` failed."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"could not write checkpoint '{path}': no space left on the device; free disk space and rerun "
                "the same command (training resumes from the last finished epoch)")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"could not write checkpoint '{path}': {reason}; check the folder is writable, free disk space and rerun"


def _atomic_write(path: Path, write: Callable[[_HashingWriter], None]) -> str:
    """write() into a temp file, fsync, then rename it and its checksum file into place.

    A crash or a full disk never leaves a truncated file under the real name, and the temp
    files are removed on failure. Returns the file's SHA-256; raises UserError on failure.
    """
    tmp = path.with_name(path.name + ".tmp")
    sidecar = checksum_path(path)
    sidecar_tmp = sidecar.with_name(sidecar.name + ".tmp")
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            writer = _HashingWriter(handle)
            write(writer)
            handle.flush()
            os.fsync(handle.fileno())
        digest = writer.digest.hexdigest()
        with open(sidecar_tmp, "w") as handle:
            handle.write(f"{digest}  {path.name}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        os.replace(sidecar_tmp, sidecar)
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError when a write fails
        tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)
        raise UserError(_write_failure(path, writer.error if writer and writer.error else exc)) from None
    return digest


def atomic_save(obj: object, path: Path) -> str:
    """torch.save `obj` to `path` atomically, with `path.sha256` beside it; returns the SHA-256."""
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def copy_checkpoint(source: Path, target: Path) -> str:
    """Copy a verified checkpoint (and its checksum) atomically; returns the SHA-256."""
    expected = verify_checksum(source)
    with open(source, "rb") as handle:
        digest = _atomic_write(target, lambda out: shutil.copyfileobj(handle, out, 1 << 20))
    if digest != expected:
        raise UserError(f"checkpoint '{source}' changed while it was copied to '{target}'; rerun")
    return digest


def verify_checksum(path: Path, expected: str | None = None) -> str:
    """Check `path` against `expected`, or else against its `.sha256` file; return the SHA-256.

    Raises UserError naming the file when it is missing, has no checksum or does not match it.
    """
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found; delete '{path.parent}' and rerun to train again")
    if expected is None:
        sidecar = checksum_path(path)
        if not sidecar.is_file():
            raise UserError(f"checkpoint '{path}' has no checksum file '{sidecar.name}', so it cannot be told "
                            "from a corrupt one; delete it and rerun to train again")
        expected = (sidecar.read_text().split() or [""])[0]
    actual = file_sha256(path)
    if actual != expected:
        raise UserError(f"checkpoint '{path}' is corrupt: checksum mismatch (SHA-256 {actual[:16]}…, "
                        f"expected {expected[:16]}…); delete it and rerun to train again")
    return actual


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> dict:
    """Load a checkpoint written by atomic_save after verifying its checksum; a corrupt file is
    a clear error, never used."""
    verify_checksum(path, expected_sha256)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the file cannot be trusted
        raise UserError(f"checkpoint '{path}' is corrupt or unreadable ({type(exc).__name__}); "
                        f"delete it and rerun to train again") from None


class WorkDir:
    """The resumable state of one cell, outside DVC's outs: `checkpoints/<cell>-<fingerprint>/`.

    - `resume.pt`: model, optimiser, RNG, history, best epoch (and its SHA-256) and MLflow run id,
      after the last finished epoch;
    - `best-e<k>.pt`: the best weights so far, of the epoch resume.pt names;
    - `run_id`: the MLflow run, written as soon as it exists, so a crash before the first
      checkpoint continues that run instead of starting another.
    """

    def __init__(self, path: Path):
        self.path = path

    @property
    def state_file(self) -> Path:
        return self.path / "resume.pt"

    def best_file(self, epoch: int) -> Path:
        return self.path / f"best-e{epoch}.pt"

    def load_state(self) -> dict | None:
        """The verified resume state, or None when the cell starts from scratch."""
        return load_checkpoint(self.state_file) if self.state_file.is_file() else None

    def check_best(self, state: dict) -> None:
        """Verify that the best checkpoint is the one the state names (rank 0, on resume)."""
        verify_checksum(self.best_file(state["best_epoch"]), state["best_sha256"])

    def save_epoch(self, state: dict, best_weights: dict | None) -> None:
        """Write the new best weights (when this epoch improved them), then the state naming them,
        then drop best files of other epochs. A crash in between leaves the previous state, and
        the files it names, intact."""
        if best_weights is not None:
            state["best_sha256"] = atomic_save(best_weights, self.best_file(state["best_epoch"]))
        atomic_save(state, self.state_file)
        keep = self.best_file(state["best_epoch"])
        for stale in self.path.glob("best-e*.pt"):
            if stale != keep:
                stale.unlink(missing_ok=True)
                checksum_path(stale).unlink(missing_ok=True)

    def read_run_id(self) -> str | None:
        path = self.path / "run_id"
        if not path.is_file():
            return None
        return path.read_text().strip() or None

    def write_run_id(self, run_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / "run_id.tmp"
        tmp.write_text(run_id + "\n")
        os.replace(tmp, self.path / "run_id")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class TrainingData:
    """Stores and labels of the train and val (and all) rows, at one image size."""

    def __init__(self, manifest: pd.DataFrame, root: Path, size: int, cache_dir: Path):
        self.class_names = sorted(manifest["label"].unique())
        index = {name: i for i, name in enumerate(self.class_names)}
        self.manifest = manifest.reset_index(drop=True)
        self.labels = self.manifest["label"].map(index).to_numpy()
        paths = [root / p for p in self.manifest["path"]]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(
                f"{len(missing)} image(s) in the manifest are missing, e.g. '{missing[0]}'; "
                "rerun `dvc repro preprocess split`"
            )
        self.store = imagestore.build_store(paths, list(self.manifest["sha256"]), size, cache_dir)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def source(self, rows: np.ndarray | None = None) -> imagestore.BatchSource:
        if rows is None:
            return imagestore.BatchSource(self.store, self.labels)
        return imagestore.BatchSource(_RowView(self.store, rows), self.labels[rows])


class _RowView:
    """A subset of the store's rows, indexable like the store."""

    def __init__(self, store: np.ndarray, rows: np.ndarray):
        self.store, self.rows = store, rows

    def __getitem__(self, idx):
        return self.store[self.rows[idx]]

    def __len__(self) -> int:
        return len(self.rows)


def loss_of(outputs, labels: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the main output, plus aux_weight × the aux loss when Inception gives one."""
    if isinstance(outputs, tuple):
        logits, aux = outputs
        return F.cross_entropy(logits, labels) + aux_weight * F.cross_entropy(aux, labels), logits
    return F.cross_entropy(outputs, labels), outputs


class Trainer:
    """One cell's model, optimiser and per-epoch loops on one device (one rank under DDP)."""

    def __init__(self, params: Params, cell: Cell, num_classes: int, device: torch.device,
                 world: World = SINGLE_PROCESS):
        self.params, self.cell, self.device, self.world = params, cell, device, world
        t = params.train
        weights_dir = Path(t.weights_dir) if t.weights_dir else None
        self.model = models.build_model(
            cell.architecture,
            num_classes,
            pretrained=cell.pretrained,
            weights_dir=weights_dir,
            aux_logits=t.aux_logits and cell.condition != "frozen",
        )
        self.frozen = cell.condition == "frozen"
        if self.frozen:
            models.freeze_backbone(self.model)
        # channels_last speeds convolutions with cuDNN and with oneDNN on CPU (bench/: Lite0 1.66x at 64 px).
        self.channels_last = device.type in ("cuda", "cpu")
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)
        # What a training step runs: the trained part, under DDP wrapped so that its gradients
        # are averaged across ranks. Checkpoints, validation and prediction use self.model.
        self.trained = world.wrap(self.model.head if self.frozen else self.model, device)
        self.augment = imagestore.GpuAugment(t.augment).to(device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _no_autocast()

    def restore(self, state: dict) -> None:
        """Continue from a resume state: weights, optimiser and RNG."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.frozen:
            self.model.backbone.eval()  # BatchNorm statistics stay ImageNet's

    def _forward(self, images: torch.Tensor):
        if self.frozen:
            with torch.no_grad():
                features = self.model.forward_features(images)
            return self.trained(features)
        return self.trained(images)

    def _step(self, loss: torch.Tensor, batch_rows: int) -> None:
        """Backward and optimiser step; under DDP the loss is weighted so that the averaged
        gradient is that of the whole global batch, even when it does not split evenly."""
        if self.world.distributed:
            (global_rows,) = self.world.sum([batch_rows], self.device)
            loss = loss * distributed.loss_weight(batch_rows, int(global_rows), self.world)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _epoch_means(self, total_loss: float, correct: float, seen: float) -> tuple[float, float]:
        """Mean loss and accuracy of an epoch over every rank's images."""
        total_loss, correct, seen = self.world.sum([total_loss, correct, seen], self.device)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def train_epoch(self, loader, progress: tqdm | None) -> tuple[float, float]:
        self._set_train_mode()
        total_loss, correct, seen = 0.0, 0, 0
        limit = self.params.train.max_batches_per_epoch
        for step, (images_u8, labels) in enumerate(loader):
            if limit is not None and step >= limit:
                break
            images = imagestore.to_model_input(images_u8, self.device, self.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            with torch.no_grad():
                images = imagestore.normalize(self.augment(images))
            with self.autocast:
                loss, logits = loss_of(self._forward(images), labels, self.params.train.aux_weight)
            self._step(loss, len(labels))
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            if progress is not None:
                progress.update(len(labels))
                progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        return self._epoch_means(total_loss, correct, seen)

    @torch.no_grad()
    def cached_features(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen backbone features (N, D) and labels of every image in a loader, computed once."""
        self.model.backbone.eval()
        features, labels_out = [], []
        for images_u8, labels in loader:
            images = imagestore.normalize(imagestore.to_model_input(images_u8, self.device, self.channels_last))
            with self.autocast:
                features.append(self.model.forward_features(images).float())
            labels_out.append(labels.to(self.device))
        return torch.cat(features), torch.cat(labels_out)

    def train_head_epoch(self, features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                         progress: tqdm | None) -> tuple[float, float]:
        """One epoch of the head alone on cached features (frozen condition without augmentation).

        Under DDP every rank holds every feature and takes its shard of each global batch."""
        self.model.head.train()
        total_loss, correct, seen = 0.0, 0, 0
        order = torch.randperm(len(labels), generator=generator).tolist()
        for rows in distributed.shard_batches(order, self.params.train.batch_size, self.world):
            batch = torch.tensor(rows, device=self.device)
            logits = self.trained(features[batch])
            loss = F.cross_entropy(logits, labels[batch])
            self._step(loss, len(rows))
            total_loss += loss.item() * len(rows)
            correct += (logits.argmax(1) == labels[batch]).sum().item()
            seen += len(rows)
            if progress is not None:
                progress.update(len(rows))
        return self._epoch_means(total_loss, correct, seen)

    @torch.no_grad()
    def predict(self, loader) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, K) and labels (N,) over a loader, in its order."""
        self.model.eval()
        probs, labels_out = [], []
        for images_u8, labels in loader:
            images = imagestore.normalize(imagestore.to_model_input(images_u8, self.device, self.channels_last))
            with self.autocast:
                logits = self.model(images)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels_out.append(labels.numpy())
        return np.concatenate(probs), np.concatenate(labels_out)


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _evaluate_loss(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    eps = 1e-12
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + eps)))
    return loss, float(np.mean(probs.argmax(1) == labels))


def augments(augment) -> bool:
    """Whether the augmentation params change images at all."""
    return bool(augment.rotation or augment.translate or augment.hflip)


def _is_tty() -> bool:
    return sys.stderr.isatty()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def shard_loader(source: imagestore.BatchSource, shards: list[list[int]], num_workers: int,
                 pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader yielding one whole uint8 batch per shard (a list of rows), in order."""
    return torch.utils.data.DataLoader(source, sampler=shards, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory)


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

    manifest = read_manifest(root / params.paths.manifest)
    fingerprint = result_fingerprint(params, cell, manifest)
    run_dir = root / params.paths.outputs / "models" / f"{cell.architecture}-{cell.condition}" / f"s{cell.seed}"
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

    tracker, experiment_id = _start_tracking(params, cell, root, tracking_uri, work, state, fingerprint, size,
                                             device, len(data.rows("train")))
    try:
        val_loader = imagestore.batch_loader(data.source(data.rows("val")), t.batch_size * 2, False, 0, 0,
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


def _start_tracking(params: Params, cell: Cell, root: Path, tracking_uri: str, work: WorkDir, state: dict | None,
                    fingerprint: str, size: int, device: torch.device,
                    num_train: int) -> tuple[tracking.RunTracker, str]:
    """Start the cell's MLflow run, or continue the one an interrupted attempt began; returns
    the tracker and the experiment id. On resume, epochs the store missed are logged first."""
    from mlflow.exceptions import MlflowException

    experiment_id = tracking.ensure_experiment(tracking_uri, params.tracking.experiment,
                                               tracking.artifact_location_for(tracking_uri))
    run_id = state["run_id"] if state else work.read_run_id()
    try:
        tracker = tracking.RunTracker.start(tracking_uri, experiment_id, cell.name, run_id)
    except MlflowException as exc:  # the run was deleted, or this is another store
        if run_id is None:
            raise
        raise UserError(f"cannot continue MLflow run {run_id} of '{work.path}' in {tracking_uri} ({exc}); "
                        f"delete '{work.path}' to train the cell again") from None
    work.write_run_id(tracker.run_id)
    tracker.add_params_and_tags(
        flatten_params(params) | {"cell.architecture": cell.architecture, "cell.condition": cell.condition,
                                  "cell.seed": str(cell.seed), "cell.image_size": str(size),
                                  "cell.fingerprint": fingerprint},
        {"architecture": cell.architecture, "condition": cell.condition, "seed": str(cell.seed),
         "git_commit": git_commit(root), "dataset_md5": dataset_hash(root),
         "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
         "num_train_images": str(num_train)},
    )
    if state is not None:
        log(f"[{cell.name}] resuming MLflow run {tracker.run_id} from epoch {state['epoch'] + 1} "
            f"(state: {work.state_file})")
        work.check_best(state)
        _log_missing_epochs(tracker, state["history"], cell)
    return tracker, experiment_id


def _epoch_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "epoch"}


def _log_missing_epochs(tracker: tracking.RunTracker, history: list[dict], cell: Cell) -> None:
    """Log the finished epochs the store lacks (the process died between saving and logging)."""
    logged = set(tracker.logged_steps("val_acc"))
    for row in history:
        if row["epoch"] not in logged:
            log(f"[{cell.name}] logging epoch {row['epoch']}'s metrics, which the tracking store lacks")
            tracker.log_metrics(_epoch_metrics(row), step=row["epoch"])


class EpochRecorder:
    """Rank 0's part of each epoch: validate, save the resume state, then log to MLflow.

    In that order, so no epoch is logged twice or lost: a crash before the save redoes the
    epoch, one after it resumes after the epoch and logs it then (_log_missing_epochs).
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
        val_loss, val_acc = _evaluate_loss(val_probs, val_labels)
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
        self.tracker.log_metrics(_epoch_metrics(row), step=epoch)
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
        all_train = imagestore.batch_loader(data.source(train_rows), t.batch_size * 2, False, 0, 0, pin)
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
    from . import serve

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
    all_loader = imagestore.batch_loader(data.source(), t.batch_size * 2, False, 0, 0, trainer.device.type == "cuda")
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
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "metrics.json").write_text(json.dumps({
        "best_val_acc": recorder.best_val, "last_val_acc": final["val_acc"], "last_train_acc": final["train_acc"],
        "epochs": len(recorder.history), "seconds": sum(h["seconds"] for h in recorder.history)}, indent=2))
    tracker.log_metrics({"best_val_acc": recorder.best_val})
    tracker.finish()
    work.remove()
    return summary


def cells_for(params: Params, architecture: str | None = None, condition: str | None = None) -> list[Cell]:
    """The cells params ask for, optionally narrowed to one architecture/condition."""
    t = params.train
    chosen = [
        Cell(a, c, s)
        for a in t.architectures
        for c in t.conditions
        for s in t.seeds
        if f"{a}-{c}" not in t.exclude
    ]
    if architecture is not None:
        if architecture not in t.architectures:
            raise ConfigError(f"--arch {architecture} is not in train.architectures {list(t.architectures)}")
        chosen = [c for c in chosen if c.architecture == architecture]
    if condition is not None:
        if condition not in t.conditions:
            raise ConfigError(f"--condition {condition} is not in train.conditions {list(t.conditions)}")
        chosen = [c for c in chosen if c.condition == condition]
    return chosen
