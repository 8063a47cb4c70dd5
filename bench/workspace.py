"""What every section shares: the project's split data, the device, the profile's sizes, a
temporary folder, and ImageNet weights files for the pretrained conditions.

Stores built here go to a temporary folder, never to the project's `checkpoints/stores`, so a
cached store from an earlier training run cannot make the fast path look cheaper than it is.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transfer_study import distributed, models
from transfer_study.config import SCRATCH_ONLY, Params, UserError, load_params, profile_datasets
from transfer_study.distributed import SINGLE_PROCESS
from transfer_study.imagestore import DeviceImages, TrainingData
from transfer_study.split import read_manifest

BATCH_SIZE = 32  # the study's batch size, used by both paths


@dataclass(frozen=True)
class BatchPlan:
    """How many batches a throughput measurement runs: untimed warm-up, then timed windows
    whose median is reported (the machine may be shared, so one window can be unlucky)."""

    warmup: int
    batches: int
    windows: int


class Workspace:
    def __init__(self, root: Path, device: torch.device, profile: str, archs: list[str], conditions: list[str],
                 plan: BatchPlan, tmp: Path, weights_dir: Path | None = None, params_file: Path | None = None):
        """`profile` quick or study picks params.quick.yaml or params.yaml in `root`; `params_file`,
        when given, is read instead (gpu_study.py's own)."""
        self.root, self.device, self.plan, self.tmp = root, device, plan, tmp
        self.profile = profile
        self.params: Params = load_params(params_file or root / profile_params_file(profile))
        self.archs, self.conditions = archs, conditions
        # A profile of several datasets (the quick profile's replicates and external set) is measured
        # on replicate 0, data/raw's crops: one dataset of class folders, as the standard recipe reads it.
        first = profile_datasets(self.params)[0]
        manifest = read_manifest(root / self.params.paths.manifest)
        if "replicate" in manifest.columns:
            manifest = manifest[manifest["replicate"] == first.replicate].drop(columns="replicate")
        self.manifest = manifest.reset_index(drop=True)
        self.cropped = root / first.cropped
        self.raw = root / self.params.paths.raw
        self.class_names = sorted(self.manifest["label"].unique())
        self._data: dict[int, TrainingData] = {}
        self.store_seconds: dict[int, float] = {}
        self.weights_dir, self.placeholder_weights = self._prepare_weights(weights_dir)

    # -- sizes and params ------------------------------------------------------------------
    def size_of(self, arch: str) -> int:
        return self.params.train.image_size[arch]

    def train_params(self, arch: str) -> Params:
        """The profile's params for one architecture at batch 32, with the bench's weights folder.

        Inception's aux classifier needs 299 px in training, so it is off below that (the quick
        profile's 75 px would otherwise be refused by models.check_input_size).
        """
        t = self.params.train
        aux = t.aux_logits and (arch != "inception_v3" or self.size_of(arch) >= models.INCEPTION_AUX_MIN_SIZE)
        train = dataclasses.replace(t, batch_size=BATCH_SIZE, weights_dir=str(self.weights_dir),
                                    aux_logits=aux, max_batches_per_epoch=None)
        return dataclasses.replace(self.params, train=train)

    @property
    def train_rows(self):
        return self.manifest.index[self.manifest["split"] == "train"].to_numpy()

    # -- the fast path's store ------------------------------------------------------------
    def training_data(self, size: int) -> TrainingData:
        """The uint8 store of every manifest image at `size` px, built once per invocation (timed)."""
        if size not in self._data:
            started = time.perf_counter()
            self._data[size] = TrainingData(self.manifest, self.root, size, self.tmp / "stores")
            self.store_seconds[size] = time.perf_counter() - started
        return self._data[size]

    # -- weights --------------------------------------------------------------------------
    def _prepare_weights(self, user_dir: Path | None) -> tuple[Path, set[str]]:
        """A folder with a weights file for every architecture benchmarked.

        Real ImageNet weights are linked in when they are on this machine. Where they are not (no
        network here), a randomly initialised state_dict of the same shapes stands in: throughput
        does not depend on the values, and the row says so. Never used for accuracy.
        """
        folder = self.tmp / "weights"
        folder.mkdir(parents=True, exist_ok=True)
        placeholders = set()
        pretrained_needed = any(c != "scratch" for c in self.conditions)
        for arch in [a for a in self.archs if a not in SCRATCH_ONLY] if pretrained_needed else []:
            target = folder / models.weights_file(arch)
            try:
                target.symlink_to(models.resolve_weights(arch, user_dir, download=False))
            except models.WeightsMissing:
                torch.save(_random_imagenet_state(arch), target)
                placeholders.add(arch)
        return folder, placeholders


def profile_params_file(profile: str) -> str:
    """The params file of a profile: quick or study."""
    return "params.quick.yaml" if profile == "quick" else "params.yaml"


def epoch_batches(images: DeviceImages, rows: np.ndarray, seed: int):
    """One epoch's batches, as train._train_epochs makes them: a seeded permutation of the train
    rows cut into batches of 32, gathered where the store lies (on a GPU, in device memory)."""
    permutation = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).numpy()
    return images.batches(distributed.shard_batches(rows[permutation].tolist(), BATCH_SIZE, SINGLE_PROCESS))


def _random_imagenet_state(arch: str) -> dict:
    """The state_dict of `arch`'s 1000-class ImageNet network, randomly initialised."""
    import torchvision

    if arch == "efficientnet_lite0":
        return models.EfficientNetLite0().state_dict()
    if arch == "inception_v3":
        # init_weights=False: its truncated-normal init is slow and the values do not matter here.
        net = torchvision.models.get_model(arch, weights=None, aux_logits=True, init_weights=False)
        return net.state_dict()
    return torchvision.models.get_model(arch, weights=None).state_dict()


def require_split_data(root: Path, params_file: str = "params.yaml") -> None:
    """Raise UserError unless the crops and the split manifest exist (`dvc repro split`)."""
    params = load_params(root / params_file)
    manifest = root / params.paths.manifest
    if not manifest.is_file() or not (root / params.paths.cropped).is_dir():
        stage = "split" if params_file == "params.yaml" else "profiles/quick/dvc.yaml:split"
        raise UserError(f"'{manifest}' or '{params.paths.cropped}' is missing; run `dvc repro {stage}` "
                        f"(or `python bench/prepare_data.py` where dvc is not installed) first")
