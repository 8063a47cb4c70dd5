"""Typed parameters, read once from params.yaml, and the project's paths.

This is the only module that reads params.yaml or environment variables. Every
other module takes the dataclasses below as arguments.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHITECTURES = ("resnet18", "vgg19", "inception_v3", "efficientnet_lite0")
CONDITIONS = ("scratch", "frozen", "finetune")
CROPPERS = ("none", "foreground", "cam")
INCEPTION_MIN_SIZE = 75


class UserError(Exception):
    """Bad input from the user (a file, a param, a request). The CLI prints it without a traceback."""


class ConfigError(UserError):
    """A param is missing or has a value the pipeline cannot use."""


@dataclass(frozen=True)
class DataParams:
    """Where the default dataset comes from and how it is sampled."""

    classes: tuple[str, ...] = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "shirt")
    per_class: int = 300
    seed: int = 0
    source: str | None = None  # a folder of Fashion-MNIST idx(.gz) files; None: Debian, then upstream


@dataclass(frozen=True)
class ValidateParams:
    min_side: int = 16  # images smaller than this on either side are reported as tiny
    max_imbalance: float = 3.0  # largest class / smallest class above this is reported
    min_per_class: int = 3  # fewer images than this cannot be split three ways
    strict: bool = False


@dataclass(frozen=True)
class PreprocessParams:
    cropper: str = "foreground"
    size: int = 299  # stored size: large enough for every model (Inception V3 wants 299)
    margin: float = 0.08  # fraction of the box side added around the detected garment
    fit: str = "letterbox"  # letterbox keeps the whole garment; the alternative is "center"
    foreground_threshold: float = 0.1  # fraction of the max distance from the background colour
    cam_threshold: float = 0.5  # fraction of the CAM's maximum
    cam_input_size: int = 224


@dataclass(frozen=True)
class SplitParams:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class AugmentParams:
    rotation: float = 15.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.1  # fraction of the side, uniform in [-translate, translate]
    hflip: bool = True


@dataclass(frozen=True)
class TrainParams:
    architectures: tuple[str, ...] = ("resnet18", "vgg19", "inception_v3")
    conditions: tuple[str, ...] = ("scratch", "frozen")
    seeds: tuple[int, ...] = (0,)
    exclude: tuple[str, ...] = ()  # cells ("arch-condition") of the cross product not to run
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    image_size: dict[str, int] = field(
        default_factory=lambda: {"resnet18": 224, "vgg19": 224, "inception_v3": 299, "efficientnet_lite0": 224}
    )
    aux_logits: bool = True
    aux_weight: float = 0.4
    augment: AugmentParams = AugmentParams()
    checkpoint: str = "best"  # which checkpoint evaluation and the registry use: best (on val) or last
    weights_dir: str | None = None  # local folder of ImageNet weights under torchvision's file names
    num_workers: int = 2
    max_batches_per_epoch: int | None = None  # tests and smoke runs only


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = "transfer-study"
    registered_model: str = "clothing-classifier"


@dataclass(frozen=True)
class PathParams:
    raw: str = "data/raw"
    cropped: str = "data/cropped"
    validation: str = "data/validation.json"
    manifest: str = "data/split/manifest.csv"
    outputs: str = "."  # models/, evaluation/ and reports/ go under this folder


@dataclass(frozen=True)
class Params:
    data: DataParams = DataParams()
    validate: ValidateParams = ValidateParams()
    preprocess: PreprocessParams = PreprocessParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    paths: PathParams = PathParams()


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, naming the param at fault on error."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"param '{where}' must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown param(s) {', '.join(where + '.' + u for u in unknown)}; known: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def _check(params: Params) -> None:
    """Reject values that would fail later, deep inside a stage."""
    t = params.train
    for arch in t.architectures:
        if arch not in ARCHITECTURES:
            raise ConfigError(f"train.architectures: unknown architecture '{arch}'; choose from {', '.join(ARCHITECTURES)}")
        if arch not in t.image_size:
            raise ConfigError(f"train.image_size has no entry for '{arch}'; add e.g. '{arch}: 224'")
    for cond in t.conditions:
        if cond not in CONDITIONS:
            raise ConfigError(f"train.conditions: unknown condition '{cond}'; choose from {', '.join(CONDITIONS)}")
    for arch, size in t.image_size.items():
        if not isinstance(size, int) or size < 32:
            raise ConfigError(f"train.image_size.{arch} = {size!r}; use an integer of at least 32")
    if t.image_size.get("inception_v3", INCEPTION_MIN_SIZE) < INCEPTION_MIN_SIZE:
        raise ConfigError(
            f"train.image_size.inception_v3 = {t.image_size['inception_v3']}: Inception V3 needs at least "
            f"{INCEPTION_MIN_SIZE} px (299 is its native size); raise it in params.yaml"
        )
    trains_aux = t.aux_logits and any(c != "frozen" for c in t.conditions)
    if "inception_v3" in t.architectures and trains_aux and t.image_size["inception_v3"] < 299:
        raise ConfigError(
            f"train.image_size.inception_v3 = {t.image_size['inception_v3']}: Inception V3's auxiliary "
            "classifier needs 299 px; raise the size or set train.aux_logits: false"
        )
    if t.checkpoint not in ("best", "last"):
        raise ConfigError(f"train.checkpoint = {t.checkpoint!r}; use 'best' or 'last'")
    if t.epochs < 1 or t.batch_size < 1 or t.lr <= 0:
        raise ConfigError("train.epochs and train.batch_size must be >= 1 and train.lr > 0")
    if not t.seeds:
        raise ConfigError("train.seeds is empty; give at least one seed, e.g. [0]")
    s = params.split
    if min(s.train, s.val, s.test) <= 0 or abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError(
            f"split ratios train={s.train}, val={s.val}, test={s.test} must be positive and sum to 1"
        )
    p = params.preprocess
    if p.cropper not in CROPPERS:
        raise ConfigError(f"preprocess.cropper = {p.cropper!r}; choose from {', '.join(CROPPERS)}")
    if p.fit not in ("letterbox", "center"):
        raise ConfigError(f"preprocess.fit = {p.fit!r}; use 'letterbox' or 'center'")
    needed = max(t.image_size[a] for a in t.architectures)
    if p.size < needed:
        raise ConfigError(
            f"preprocess.size = {p.size} is smaller than the largest train.image_size ({needed}); "
            f"store crops at least that large"
        )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check a params file; raise ConfigError naming the file and param at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file '{path}' not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file '{path}' is not valid YAML: {exc}") from None
    try:
        params = _build(Params, raw, "params")
        _check(params)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return params


def flatten_params(params: Params) -> dict[str, str]:
    """Flatten params into dotted keys for MLflow (`train.augment.rotation` ...)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    walk("", params)
    return flat


def project_root() -> Path:
    """The folder holding params.yaml: the current directory (dvc and MLproject run from there)."""
    return Path.cwd().resolve()


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a `torchrun` launch; one process (rank 0 of 1) when not launched by it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_env() -> LaunchEnv:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; defaults for a plain run."""
    names = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}
    values = {}
    for field_name, env_name in names.items():
        raw = os.environ.get(env_name, "")
        if not raw:
            continue
        if not raw.isdigit():
            raise ConfigError(f"environment variable {env_name}={raw!r} must be a non-negative integer (torchrun sets it)")
        values[field_name] = int(raw)
    env = LaunchEnv(**values)
    if env.world_size < 1 or env.rank >= env.world_size:
        raise ConfigError(f"RANK={env.rank} and WORLD_SIZE={env.world_size} do not fit; launch with torchrun")
    return env


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else SQLite in the project root through an absolute path.

    `dvc exp run --temp/--queue` runs each experiment in a temporary copy of the repository
    (.dvc/tmp/exps/tmp…) that is deleted afterwards; DVC_ROOT, which dvc sets for every stage,
    names the repository it was started from, so those runs record to that repository's store.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if root is None:
        root = Path(os.environ["DVC_ROOT"]).resolve() if os.environ.get("DVC_ROOT") else project_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def environment() -> dict[str, str]:
    """A copy of this process's environment, for the tools `make ui`/`make serve` start."""
    return dict(os.environ)


def python_bin_dir() -> Path:
    """The folder of this Python and of its environment's tools (mlflow, uvicorn): `.venv/bin`."""
    return Path(sys.executable).parent


def torch_home() -> Path:
    """Where torchvision caches downloaded weights (TORCH_HOME, else ~/.cache/torch)."""
    return Path(os.environ.get("TORCH_HOME") or Path.home() / ".cache" / "torch")
