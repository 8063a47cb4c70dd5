"""Train one (architecture, condition, seed) cell and record it as one MLflow run.

Layout of a run folder, `<outputs>/models/<arch>-<condition>/s<seed>/`, is described in
DEVELOPERS.md. The resumable state lives outside DVC's outs (DVC deletes outs before
a stage runs), under `checkpoints/`, keyed by the run name and a hash of the params
that affect the result, so a rerun after Ctrl-C or a crash resumes the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import imagestore, models
from .config import ConfigError, Params, UserError, flatten_params

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


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temp file, fsync, then rename: a crash or a full disk never
    leaves a truncated checkpoint under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write checkpoint '{path}': {exc.strerror or exc}; free disk space and rerun") from None


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
    """One cell's model, optimiser and per-epoch loops on one device."""

    def __init__(self, params: Params, cell: Cell, num_classes: int, device: torch.device):
        self.params, self.cell, self.device = params, cell, device
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
        self.channels_last = device.type == "cuda"
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.augment = imagestore.GpuAugment(t.augment).to(device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _no_autocast()

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.frozen:
            self.model.backbone.eval()  # BatchNorm statistics stay ImageNet's

    def _forward(self, images: torch.Tensor):
        if self.frozen:
            with torch.no_grad():
                features = self.model.forward_features(images)
            return self.model.forward_head(features)
        return self.model(images)

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
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            if progress is not None:
                progress.update(len(labels))
                progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        return total_loss / max(seen, 1), correct / max(seen, 1)

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
        """One epoch of the head alone on cached features (frozen condition without augmentation)."""
        self.model.head.train()
        total_loss, correct = 0.0, 0
        order = torch.randperm(len(labels), generator=generator).to(self.device)
        for batch in order.split(self.params.train.batch_size):
            logits = self.model.forward_head(features[batch])
            loss = F.cross_entropy(logits, labels[batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.item() * len(batch)
            correct += (logits.argmax(1) == labels[batch]).sum().item()
            if progress is not None:
                progress.update(len(batch))
        return total_loss / len(labels), correct / len(labels)

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


def train_cell(params: Params, cell: Cell, root: Path, tracking_uri: str) -> Path:
    """Train one cell, resuming an interrupted run when its fingerprint matches.

    Returns the run folder. Raises UserError for bad input (missing weights are
    detected before any training starts).
    """
    import mlflow

    from . import serve

    t = params.train
    size = t.image_size[cell.architecture]
    models.check_input_size(cell.architecture, size)
    # Resolve weights first: a missing file must fail before any data is decoded or trained.
    if cell.pretrained:
        models.resolve_weights(cell.architecture, Path(t.weights_dir) if t.weights_dir else None)

    manifest = read_manifest(root / params.paths.manifest)
    fingerprint = result_fingerprint(params, cell, manifest)
    run_dir = root / params.paths.outputs / "models" / f"{cell.architecture}-{cell.condition}" / f"s{cell.seed}"
    state_path = root / CHECKPOINT_DIR / f"{cell.name}-{fingerprint}" / "resume.pt"

    device = pick_device()
    seed_everything(cell.seed)
    data = TrainingData(manifest, root, size, root / CHECKPOINT_DIR / "stores")
    trainer = Trainer(params, cell, len(data.class_names), device)
    pin = device.type == "cuda"
    workers = t.num_workers if device.type == "cuda" else 0  # on a 2-core CPU workers steal compute
    train_rows, val_rows = data.rows("train"), data.rows("val")
    val_loader = imagestore.batch_loader(data.source(val_rows), t.batch_size * 2, False, 0, 0, pin)

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(params.tracking.experiment, root)

    start_epoch, best_val, history, run_id = 1, -1.0, [], None
    if state_path.is_file():
        state = load_checkpoint(state_path)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_val, history, run_id = state["epoch"] + 1, state["best_val"], state["history"], state["run_id"]
        log(f"[{cell.name}] resuming MLflow run {run_id} from epoch {start_epoch} (state: {state_path})")

    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    with mlflow.start_run(run_id=run_id, run_name=cell.name, experiment_id=experiment_id) as run:
        if run_id is None:
            mlflow.log_params(flatten_params(params) | {"cell.architecture": cell.architecture,
                                                         "cell.condition": cell.condition,
                                                         "cell.seed": str(cell.seed),
                                                         "cell.image_size": str(size),
                                                         "cell.fingerprint": fingerprint})
            mlflow.set_tags({
                "architecture": cell.architecture,
                "condition": cell.condition,
                "seed": str(cell.seed),
                "git_commit": git_commit(root),
                "dataset_md5": dataset_hash(root),
                "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
                "num_train_images": str(len(train_rows)),
            })
        feature_cache = None
        if trainer.frozen and not augments(t.augment) and t.max_batches_per_epoch is None:
            # Without augmentation a frozen backbone sees the same images every epoch: compute once.
            all_train = imagestore.batch_loader(data.source(train_rows), t.batch_size * 2, False, 0, 0, pin)
            feature_cache = trainer.cached_features(all_train)
            log(f"[{cell.name}] frozen backbone, no augmentation: training the head on cached features")
        try:
            for epoch in range(start_epoch, t.epochs + 1):
                started = time.perf_counter()
                with tqdm(total=len(train_rows), desc=f"{cell.name} epoch {epoch}/{t.epochs}",
                          unit="img", disable=not _is_tty(), leave=False) as bar:
                    if feature_cache is not None:
                        order = torch.Generator().manual_seed(cell.seed * 100_003 + epoch)
                        train_loss, train_acc = trainer.train_head_epoch(*feature_cache, order, bar)
                    else:
                        loader = imagestore.batch_loader(
                            data.source(train_rows), t.batch_size, True, cell.seed * 100_003 + epoch, workers, pin
                        )
                        train_loss, train_acc = trainer.train_epoch(loader, bar)
                val_probs, val_labels = trainer.predict(val_loader)
                val_loss, val_acc = _evaluate_loss(val_probs, val_labels)
                seconds = time.perf_counter() - started
                row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                           val_loss=val_loss, val_acc=val_acc, seconds=seconds)
                history.append(row)
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                log(f"[{cell.name}] epoch {epoch}/{t.epochs} train_loss={train_loss:.4f} train_acc={train_acc:.4f} "
                    f"val_loss={val_loss:.4f} val_acc={val_acc:.4f} ({seconds:.1f}s)")
                weights = {"model": trainer.model.state_dict(), "epoch": epoch, "val_acc": val_acc,
                           "class_names": data.class_names}
                atomic_save(weights, last_path)
                if val_acc > best_val:
                    best_val = val_acc
                    atomic_save(weights, best_path)
                atomic_save({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                             "torch_rng": torch.get_rng_state(), "epoch": epoch, "best_val": best_val,
                             "history": history, "run_id": run.info.run_id}, state_path)
        except KeyboardInterrupt:
            log(f"[{cell.name}] interrupted; rerun the same command to resume from the last finished epoch")
            mlflow.end_run(status="KILLED")
            raise

        if not best_path.is_file() or not last_path.is_file():
            raise UserError(f"run folder '{run_dir}' lacks best.pt/last.pt; delete '{state_path.parent}' and rerun")
        chosen = best_path if t.checkpoint == "best" else last_path
        trainer.model.load_state_dict(load_checkpoint(chosen)["model"])
        all_loader = imagestore.batch_loader(data.source(), t.batch_size * 2, False, 0, 0, pin)
        probs, labels = trainer.predict(all_loader)
        predictions = pd.DataFrame({"path": data.manifest["path"], "split": data.manifest["split"],
                                    "label": labels, "pred": probs.argmax(1)})
        for k in range(probs.shape[1]):
            predictions[f"prob_{k}"] = probs[:, k]
        run_dir.mkdir(parents=True, exist_ok=True)
        predictions.to_csv(run_dir / "predictions.csv", index=False)
        pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
        mlflow.log_artifact(str(run_dir / "history.csv"))
        model_info = serve.log_servable_model(
            trainer.model.cpu(), cell.architecture, data.class_names, size, params, chosen
        )
        summary = {
            "run_id": run.info.run_id, "experiment_id": experiment_id, "run_name": cell.name,
            "architecture": cell.architecture, "condition": cell.condition, "seed": cell.seed,
            "class_names": data.class_names, "image_size": size, "checkpoint": t.checkpoint,
            "model_uri": model_info.model_uri, "fingerprint": fingerprint,
        }
        (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
        final = history[-1]
        (run_dir / "metrics.json").write_text(json.dumps({
            "best_val_acc": best_val, "last_val_acc": final["val_acc"], "last_train_acc": final["train_acc"],
            "epochs": len(history), "seconds": sum(h["seconds"] for h in history)}, indent=2))
        mlflow.log_metric("best_val_acc", best_val)
    state_path.unlink(missing_ok=True)
    log(f"[{cell.name}] done: best val_acc={best_val:.4f}; run {summary['run_id']} → {run_dir}")
    return run_dir


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by atomic_save; a corrupt file is a clear error, never used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the file cannot be trusted
        raise UserError(f"checkpoint '{path}' is corrupt or unreadable ({type(exc).__name__}); "
                        f"delete it and rerun to train again") from None


def ensure_experiment(name: str, root: Path) -> str:
    """Get or create the experiment, with artifacts under the project root (absolute)."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    tracking = mlflow.get_tracking_uri()
    artifact_location = None
    if tracking.startswith("sqlite:"):
        # A local store: keep artifacts beside it, absolute so other working folders agree.
        artifact_location = (root / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


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
