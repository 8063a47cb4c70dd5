"""Typed parameters, read once from params.yaml, and the project's paths.

This is the only module that reads params.yaml or environment variables. Every
other module takes the dataclasses below as arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHITECTURES = ("resnet18", "vgg19", "inception_v3", "efficientnet_lite0", "small_cnn")
# Architectures with no ImageNet weights: they train from scratch only.
SCRATCH_ONLY = ("small_cnn",)
CONDITIONS = ("scratch", "frozen", "finetune")
SCHEDULES = ("constant", "cosine", "onecycle")
CROPPERS = ("none", "foreground", "cam", "proposals")
# preprocess.targets: what `proposals` (and `cam`) look for. Named groups of ImageNet classes, any
# ImageNet class by its name (preprocess.py checks the names), or OBJECTNESS alone: any object.
TARGET_GROUPS = ("garments",)
OBJECTNESS = "objectness"
INCEPTION_MIN_SIZE = 75
# The version DVC records in data.dvc for the default dataset (`transfer-study data fetch` with the
# default data params writes the same bytes everywhere). Only runs on this version are compared
# with the study's Table 1; any other data is "your data".
DEFAULT_DATASET_MD5 = "6298280f42a1a76b2c1995959781ba9d.dir"
MIN_IMAGE_SIZE = 32
SMALL_CNN_MIN_SIZE = 16  # built for small images, e.g. Fashion-MNIST's own 28 px
# Fashion-MNIST holds 6,000 training and 1,000 test images per class: replicates of data.per_class
# images each, disjoint, fit 6000 // per_class times (20 at the study's 300); the external test set
# takes at most the 1,000 test images of each class.
FMNIST_TRAIN_PER_CLASS = 6000
FMNIST_TEST_PER_CLASS = 1000


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
    # Independent replicate datasets the runs train on: replicate 0 is paths.raw, the others are drawn
    # from the pool (Fashion-MNIST's training images), disjoint from it and from each other.
    replicates: int = 1
    # Official Fashion-MNIST test images per class that every run also predicts and is scored on
    # (split "external"; never trained on or chosen by); 0: none.
    external_per_class: int = 0


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
    # What `proposals` looks for: ImageNet classes (a group such as garments, or class names such as
    # daisy, church), or [objectness]: the region most like any ImageNet object, whatever its class.
    targets: tuple[str, ...] = ("garments",)


@dataclass(frozen=True)
class SplitParams:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    repeats: int = 1  # stratified splits; repeat 0 is the one split `seed` has always given
    train_fractions: tuple[float, ...] = (1.0,)  # nested subsets of each repeat's train split (learning curve)


@dataclass(frozen=True)
class AugmentParams:
    rotation: float = 15.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.1  # fraction of the side, uniform in [-translate, translate]
    hflip: bool = True


@dataclass(frozen=True)
class EarlyStoppingParams:
    """The training rule of the replicated profiles (stopping.py), in optimiser steps, so that a
    smaller training set gets as many steps as a larger one: when the validation loss has not
    improved for `patience_steps`, cut the learning rate by `lr_factor` (at most `lr_reductions`
    times, the patience starting again after each), else stop; at least `min_steps` and at most
    `max_steps`; keep the best epoch's weights. Checked at the end of each epoch."""

    patience_steps: int = 200
    min_steps: int = 0
    max_steps: int = 2000
    lr_reductions: int = 0
    lr_factor: float = 0.1


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
        default_factory=lambda: {"resnet18": 224, "vgg19": 224, "inception_v3": 299, "efficientnet_lite0": 224,
                                 "small_cnn": 28}  # small_cnn: the default dataset's own size
    )
    aux_logits: bool = True
    aux_weight: float = 0.4
    augment: AugmentParams = AugmentParams()
    checkpoint: str = "best"  # which checkpoint evaluation and the registry use: best (on val) or last
    weights_dir: str | None = None  # local folder of ImageNet weights under torchvision's file names
    num_workers: int = 2
    max_batches_per_epoch: int | None = None  # tests and smoke runs only
    cuda_graphs: bool = True  # on one CUDA GPU, capture the training step once and replay it
    schedule: str = "constant"  # learning rate over training: constant (the study's), cosine or onecycle
    label_smoothing: float = 0.0  # the study's plain cross-entropy; e.g. 0.1 for tuned profiles
    save_every_s: float = 60.0  # resume state (and MLflow's epoch metrics) at most this often; 0: every epoch but the last
    # null: `epochs` epochs, the best checkpoint by validation accuracy (the study's protocol);
    # otherwise early stopping on the validation loss (EarlyStoppingParams), and `epochs` is unused.
    early_stopping: EarlyStoppingParams | None = None


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = "transfer-study"
    registered_model: str = "clothing-classifier"


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorParams:
    """Where `transfer-study train` runs a profile's runs: `local`, one after another in this
    process, or `ray`, each run one task on a Ray cluster (fanout.py). Nothing here changes a result."""

    kind: str = "local"  # local | ray
    ray_address: str | None = None  # the Ray head, host:port, or auto (a cluster this machine is part of); null: RAY_ADDRESS
    num_gpus: float = 1.0  # per run; a fraction packs several runs onto one GPU, 0 trains on CPUs
    num_cpus: float | None = None  # per run; null: 0 when runs take a GPU (the GPUs bound how many run at once), else 1
    max_retries: int = 3  # per run, when its node or process dies

    @property
    def cpus_per_run(self) -> float:
        if self.num_cpus is not None:
            return self.num_cpus
        return 0.0 if self.num_gpus > 0 else 1.0


@dataclass(frozen=True)
class PathParams:
    raw: str = "data/raw"
    cropped: str = "data/cropped"
    validation: str = "data/validation.json"
    manifest: str = "data/split/manifest.csv"
    outputs: str = "."  # models/, evaluation/ and reports/ go under this folder
    pool: str = "data/pool"  # Fashion-MNIST as released: what replicates and the external set are drawn from
    replicates: str = "data/replicates"  # replicates 1, 2, ... as raw folders (rep01/<class>/...)
    external: str = "data/external"  # the external test set as a raw folder (<class>/...)


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
    executor: ExecutorParams = ExecutorParams()


# A param's expected type in words: (one value, several values in a list).
_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"),
               bool: ("true or false", "true/false values"), str: ("text", "text values")}
# PyYAML reads YAML 1.1, where 1e-4 (no dot) and 1.0e4 (no sign) are strings; YAML 1.2 and every
# user read numbers. Exactly that form is accepted where a number is expected; other strings are errors.
_EXPONENT_WITHOUT_DOT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_text(value: Any) -> str:
    """A value as it would be written in params.yaml (1.0e-05, [0, 1], {a: 1}, null)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else _yaml_text(value)


def _what_it_is(value: Any) -> str:
    """How YAML read a value, in words."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean (true/false)"
    for kind, words in ((int, "an integer"), (float, "a number with a decimal point"), (str, "a string"),
                        (list, "a list"), (dict, "a mapping")):
        if isinstance(value, kind):
            return words
    return f"a {type(value).__name__}"


def _expected(hint: Any) -> str:
    """A type annotation in words: 'an integer', 'a list of integers', 'text or null' ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    if origin is tuple:
        return f"a list of {_TYPE_WORDS[args[0]][1]}"
    if origin is dict:
        return f"a mapping of names to {_TYPE_WORDS[args[1]][1]}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return _TYPE_WORDS[hint][0]


# Examples for a value whose default is null or an empty list, where the default shows nothing.
_FALLBACK_EXAMPLES = {int: 10, float: 0.5}


def _example(hint: Any, default: Any) -> str | None:
    """The example a message gives: the default as YAML, else a typical value; None if there is none."""
    if default is not None and default != ():
        return _yaml_text(default)
    inner = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    fallback = _FALLBACK_EXAMPLES.get(inner)
    if typing.get_origin(hint) is tuple:
        return "[]" if fallback is None else f"[{fallback}]"
    parts = (["null"] if type(None) in typing.get_args(hint) else []) + ([] if fallback is None else [str(fallback)])
    return " or ".join(parts) or None


def _scalar_types(hint: Any) -> tuple:
    """The scalar types a hint accepts: (int,) for int, (str, NoneType) for str | None; () for lists and mappings."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return typing.get_args(hint)
    return (hint,) if hint in _TYPE_WORDS else ()


def _reads_as(text: str, kind: type) -> bool:
    """Whether quoted text is a finite number of that kind (nan and inf are text in YAML too)."""
    try:
        return math.isfinite(kind(text))
    except ValueError:
        return False


def _type_error(key: str, value: Any, hint: Any, example: str | None) -> ConfigError:
    accepted, fix = _scalar_types(hint), ""
    if str in accepted and isinstance(value, (int, float)):
        fix = f" (quote it: '{value}')"
    elif isinstance(value, str) and any(k in accepted and _reads_as(value, k) for k in (int, float)):
        fix = " (write it without quotes)"
    example_text = f", e.g. {example}" if example else ""
    return ConfigError(f"{key} = {_shown(value)} is {_what_it_is(value)}; expected {_expected(hint)}"
                       f"{example_text}{fix}")


def _typed(hint: Any, value: Any, key: str, default: Any) -> Any:
    """`value` from YAML as type `hint` (the dataclass annotation), or a ConfigError naming key,
    value, expected type and an example (from the default). Ints pass as floats; bools never as ints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # only `X | None` is used
        try:
            return _typed(inner, value, key, default)
        except ConfigError:
            raise _type_error(key, value, hint, _example(hint, default)) from None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is tuple:
        return _typed_list(args[0], value, key, default)
    if origin is dict:
        return _typed_mapping(args[1], value, key, default)
    if hint not in _TYPE_WORDS:  # a programming error, caught by the committed profiles' test
        raise TypeError(f"config.py cannot check {key}'s annotation {hint!r}; teach _typed about it")
    if hint is float and isinstance(value, str) and _EXPONENT_WITHOUT_DOT.fullmatch(value.strip()):
        return float(value)
    if hint is float and type(value) is int:
        return float(value)
    if type(value) is not hint:  # `type is`: bool is a subclass of int, but true is not an integer
        raise _type_error(key, value, hint, _example(hint, default))
    return value


def _typed_list(item: type, value: Any, key: str, default: tuple) -> tuple:
    """A YAML list as a tuple of `item`; a lone value is an error that suggests the list form."""
    if not isinstance(value, list):
        try:  # a lone valid item: suggest it in brackets, e.g. seeds: 1 -> [1]
            example = _yaml_text([_typed(item, value, key, None)])
        except ConfigError:
            example = _example(tuple[item, ...], default)
        raise _type_error(key, value, tuple[item, ...], example)
    first = default[0] if default else None
    return tuple(_typed(item, v, f"{key}[{i}]", first) for i, v in enumerate(value))


def _typed_mapping(item: type, value: Any, key: str, default: dict) -> dict:
    """A YAML mapping of names to `item`, each value checked under `key.name`."""
    if not isinstance(value, dict):
        raise _type_error(key, value, dict[str, item], _yaml_text(default))
    first = next(iter(default.values()), None)
    typed = {}
    for name, v in value.items():
        if not isinstance(name, str):
            raise ConfigError(f"{key}: the name {_shown(name)} is {_what_it_is(name)}; write names as text, "
                              f"e.g. {_yaml_text(default)}")
        typed[name] = _typed(item, v, f"{key}.{name}", first)
    return typed


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a YAML mapping, each value checked against its annotation.

    `where` is the dotted key of the mapping ('' at the top, 'train', 'train.augment').
    Raises ConfigError naming the param at fault."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        what = f"{where} = {_shown(raw)} is" if where else "the file holds"
        raise ConfigError(f"{what} {_what_it_is(raw)}; expected a mapping of param names to values")
    prefix = f"{where}." if where else ""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        named = []
        for name in map(str, unknown):
            close = difflib.get_close_matches(name, known, n=1)
            named.append(prefix + name + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown param(s) {', '.join(named)}; {where or 'the top level'} knows "
                          f"{', '.join(sorted(known))}")
    hints, defaults = typing.get_type_hints(cls), cls()
    return cls(**{name: _typed(hints[name], value, prefix + name, getattr(defaults, name))
                  for name, value in raw.items()})


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
    _check_scratch_only(t)
    for arch, size in t.image_size.items():
        minimum = SMALL_CNN_MIN_SIZE if arch == "small_cnn" else MIN_IMAGE_SIZE
        if size < minimum:
            raise ConfigError(f"train.image_size.{arch} = {size}; use an integer of at least {minimum}")
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
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule = {t.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing = {t.label_smoothing}; use a value in [0, 1), e.g. 0.1")
    if t.checkpoint not in ("best", "last"):
        raise ConfigError(f"train.checkpoint = {t.checkpoint!r}; use 'best' or 'last'")
    for name in ("epochs", "batch_size"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} = {getattr(t, name)}; use an integer of at least 1")
    if t.lr <= 0:
        raise ConfigError(f"train.lr = {t.lr}; use a positive number, e.g. 1.0e-4")
    for name, example in (("architectures", "[resnet18]"), ("conditions", "[scratch, frozen]"), ("seeds", "[0]")):
        if not getattr(t, name):
            raise ConfigError(f"train.{name} is empty; give at least one, e.g. {example}")
    s = params.split
    if min(s.train, s.val, s.test) <= 0 or abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError(
            f"split ratios train={s.train}, val={s.val}, test={s.test} must be positive and sum to 1"
        )
    _check_split_repeats(s)
    _check_replicates(params.data)
    _check_early_stopping(t.early_stopping)
    _check_executor(params.executor)
    p = params.preprocess
    if p.cropper not in CROPPERS:
        raise ConfigError(f"preprocess.cropper = {p.cropper!r}; choose from {', '.join(CROPPERS)}")
    if p.fit not in ("letterbox", "center"):
        raise ConfigError(f"preprocess.fit = {p.fit!r}; use 'letterbox' or 'center'")
    _check_targets(p)
    needed = model_input_size(t)
    if p.size < needed:
        raise ConfigError(
            f"preprocess.size = {p.size} is smaller than the largest train.image_size ({needed}); "
            f"store crops at least that large"
        )


def _check_targets(p: PreprocessParams) -> None:
    """preprocess.targets: at least one; objectness alone, and only for `proposals` (a CAM needs classes).
    The ImageNet class names are checked where the classes are known (preprocess.target_classes)."""
    if not p.targets:
        raise ConfigError("preprocess.targets is empty; give ImageNet classes or a group, e.g. [garments], "
                          f"or [{OBJECTNESS}]")
    if OBJECTNESS in p.targets and len(p.targets) > 1:
        raise ConfigError(f"preprocess.targets = {list(p.targets)}: {OBJECTNESS} looks for any object, so it "
                          f"stands alone; use [{OBJECTNESS}] or a list of classes")
    if OBJECTNESS in p.targets and p.cropper == "cam":
        raise ConfigError(f"preprocess.targets = [{OBJECTNESS}] needs cropper proposals (a class-activation map "
                          f"needs classes); set preprocess.cropper: proposals or name the classes")


def _check_split_repeats(s: SplitParams) -> None:
    """The seed, repeats and learning-curve fractions of the split section."""
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or s.seed < 0:
        raise ConfigError(f"split.seed = {s.seed!r}; use a non-negative integer")
    if isinstance(s.repeats, bool) or not isinstance(s.repeats, int) or s.repeats < 1:
        raise ConfigError(f"split.repeats = {s.repeats!r}; use an integer of at least 1 (1: the study's single split)")
    fractions = s.train_fractions
    if not isinstance(fractions, tuple) or not fractions:
        raise ConfigError(f"split.train_fractions = {fractions!r}; give a list such as [0.25, 0.5, 1.0]")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"split.train_fractions: {f!r} is not a fraction of the train split; use numbers in (0, 1]")
    if len(set(fractions)) < len(fractions):
        raise ConfigError(f"split.train_fractions = {list(fractions)} lists a fraction twice; list each once")


def _check_replicates(d: DataParams) -> None:
    """How many replicates and external test images Fashion-MNIST can give at data.per_class."""
    most = max(FMNIST_TRAIN_PER_CLASS // max(d.per_class, 1), 1)
    if not 1 <= d.replicates <= most:
        raise ConfigError(f"data.replicates = {d.replicates}; Fashion-MNIST's {FMNIST_TRAIN_PER_CLASS} training images "
                          f"per class hold 1 to {most} disjoint replicates of data.per_class = {d.per_class}")
    if not 0 <= d.external_per_class <= FMNIST_TEST_PER_CLASS:
        raise ConfigError(f"data.external_per_class = {d.external_per_class}; use 0 (no external test set) to "
                          f"{FMNIST_TEST_PER_CLASS} (every Fashion-MNIST test image of each class)")


def _check_early_stopping(rule: EarlyStoppingParams | None) -> None:
    if rule is None:
        return
    for name in ("patience_steps", "max_steps"):
        if getattr(rule, name) < 1:
            raise ConfigError(f"train.early_stopping.{name} = {getattr(rule, name)}; use an integer of at least 1")
    if not 0 <= rule.min_steps <= rule.max_steps:
        raise ConfigError(f"train.early_stopping.min_steps = {rule.min_steps}; use 0 to max_steps "
                          f"({rule.max_steps})")
    if rule.lr_reductions < 0:
        raise ConfigError(f"train.early_stopping.lr_reductions = {rule.lr_reductions}; use 0 (stop when the "
                          f"patience runs out) or more")
    if not 0 < rule.lr_factor < 1:
        raise ConfigError(f"train.early_stopping.lr_factor = {rule.lr_factor}; use a number between 0 and 1, e.g. 0.1")
def _check_executor(e: ExecutorParams) -> None:
    """Values Ray would refuse, or that would start every run at once, caught while the params load."""
    if e.kind not in EXECUTORS:
        raise ConfigError(f"executor.kind = {e.kind!r}; choose from {', '.join(EXECUTORS)}")
    if e.num_gpus < 0 or (e.num_gpus > 1 and not float(e.num_gpus).is_integer()):
        raise ConfigError(f"executor.num_gpus = {e.num_gpus}; use 0, a fraction of one GPU (e.g. 0.5) or a whole number")
    if e.num_cpus is not None and e.num_cpus < 0:
        raise ConfigError(f"executor.num_cpus = {e.num_cpus}; use a number of at least 0, or null")
    if e.num_gpus == 0 and e.cpus_per_run == 0:
        raise ConfigError("executor.num_gpus and executor.num_cpus are both 0: nothing would limit how many runs "
                          "a node starts at once; give CPU runs executor.num_cpus (e.g. 4)")
    if e.max_retries < 0:
        raise ConfigError(f"executor.max_retries = {e.max_retries}; use an integer of at least 0")


def _check_scratch_only(t: TrainParams) -> None:
    """A pretrained cell of an architecture without weights must be listed in train.exclude, not skipped silently."""
    for arch in (a for a in t.architectures if a in SCRATCH_ONLY):
        pretrained = [c for c in t.conditions if c != "scratch"]
        missing = [f"{arch}-{c}" for c in pretrained if f"{arch}-{c}" not in t.exclude]
        if missing:
            raise ConfigError(
                f"train.conditions includes {', '.join(pretrained)}, but {arch} has no pretrained weights; "
                f"add {', '.join(missing)} to train.exclude or remove {arch} from train.architectures"
            )


def _read_yaml(path: Path) -> Any:
    """A params file's YAML content ({} when empty); ConfigError when missing or not YAML."""
    if not path.is_file():
        raise ConfigError(f"params file '{path}' not found; run from the project root or pass --params")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file '{path}' is not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check a params file; raise ConfigError naming the file and param at fault."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        params = _build(Params, raw, "")
        _check(params)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return params


@dataclass(frozen=True)
class Dataset:
    """One dataset of a profile: a raw folder of class folders, and where the data stages put its crops."""

    name: str  # rep00, rep01, ... or external
    replicate: int | None  # None: the external test set
    raw: str
    cropped: str


EXTERNAL = "external"


def replicate_name(replicate: int) -> str:
    """`rep00`, `rep01`, ...: a replicate's folder name."""
    return f"rep{replicate:02d}"


def profile_datasets(params: Params) -> list[Dataset]:
    """The datasets a profile validates, crops and splits, replicate 0 first.

    With one replicate and no external test set (the study, your own data) the crops keep their
    one layout, paths.cropped/<class>/. Otherwise each dataset has a folder under paths.cropped:
    rep00 (from paths.raw), rep01, ... (from paths.replicates/rep01, ...) and external (from
    paths.external)."""
    p, d = params.paths, params.data
    if d.replicates == 1 and not d.external_per_class:
        return [Dataset(replicate_name(0), 0, p.raw, p.cropped)]
    datasets = [Dataset(replicate_name(r), r, p.raw if r == 0 else f"{p.replicates}/{replicate_name(r)}",
                        f"{p.cropped}/{replicate_name(r)}") for r in range(d.replicates)]
    if d.external_per_class:
        datasets.append(Dataset(EXTERNAL, None, p.external, f"{p.cropped}/{EXTERNAL}"))
    return datasets
def _default_of(key: str) -> Any:
    """The default of a dotted param key ('train.epochs'), from the dataclasses; None when unknown."""
    value: Any = Params()
    for part in key.split("."):
        if dataclasses.is_dataclass(value) and part in {f.name for f in dataclasses.fields(value)}:
            value = getattr(value, part)
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def missing_keys(raw: Any, keys: list[str]) -> list[str]:
    """The dotted keys (`train.epochs`, `preprocess`) that the YAML mapping `raw` does not hold."""
    def present(key: str) -> bool:
        value = raw
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        return True

    return [key for key in keys if not present(key)]


def require_params(path: str | Path, keys: list[str], tracked_by: str) -> None:
    """ConfigError naming the first of `keys` that the params file lacks. DVC reads each param a
    stage lists (`tracked_by`: the pipeline) only when that stage runs, after it deleted the
    stage's outputs, so a missing one must be found before `dvc repro` starts any stage."""
    path = Path(path)
    missing = missing_keys(_read_yaml(path), keys)
    if missing:
        key = missing[0]
        default = _default_of(key)
        example = f", e.g. {key}: {_yaml_text(default)}" if default is not None else ""
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{path}: {key}{more} is missing, and {tracked_by} tracks it; add it back{example}")


def preprocess_params(record: dict) -> PreprocessParams:
    """The preprocess settings written in a record (the crops' preprocess.json, a served model's
    config.json) as typed params, checked as a params file's are (JSON lists become tuples)."""
    return _build(PreprocessParams, record, "preprocess")


def model_input_size(train: TrainParams) -> int:
    """The largest input size (px) of the profile's architectures: what every image is resized to at most."""
    return max(train.image_size[a] for a in train.architectures)


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


def recorded_dataset_md5(root: Path) -> str:
    """The md5 DVC recorded for data/raw in root/data.dvc (the dataset's version); 'unknown' without one."""
    dvc_file = Path(root) / "data.dvc"
    if not dvc_file.is_file():
        return "unknown"
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        return str(outs[0].get("md5", "unknown"))
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"'{dvc_file}' is not a DVC file ({exc}); restore it with `git checkout data.dvc`") from None


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


def ray_address(executor: ExecutorParams) -> str:
    """The Ray cluster to run on: executor.ray_address, else RAY_ADDRESS. Never a cluster started
    on the fly: a forgotten address must not quietly train everything on this machine."""
    address = executor.ray_address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ConfigError("executor.kind is ray but no cluster is named: set RAY_ADDRESS=<head host>:6379 (or "
                          "executor.ray_address), or RAY_ADDRESS=auto on a machine that joined the cluster with "
                          "`ray start`")
    return address


# What a run on another machine needs to reach the tracking server: its URI and credentials.
TRACKING_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                      "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                      "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def tracking_environment(uri: str) -> dict[str, str]:
    """MLFLOW_TRACKING_URI = `uri`, with this process's tracking credentials, for runs started elsewhere."""
    return {"MLFLOW_TRACKING_URI": uri} | {k: os.environ[k] for k in TRACKING_VARIABLES if k in os.environ}


def environment() -> dict[str, str]:
    """A copy of this process's environment, for the tools `make ui`/`make serve` start."""
    return dict(os.environ)


def python_bin_dir() -> Path:
    """The folder of this Python and of its environment's tools (mlflow, uvicorn): `.venv/bin`."""
    return Path(sys.executable).parent


RETRY_DELAY_SCALE_VARIABLE = "TRANSFER_STUDY_RETRY_DELAY_SCALE"


def retry_delay_scale() -> float:
    """A factor on the waits between retries of tracking calls (tracking.py): 1 unless the tests'
    TRANSFER_STUDY_RETRY_DELAY_SCALE shortens them, so a test of a store that comes back waits less."""
    raw = os.environ.get(RETRY_DELAY_SCALE_VARIABLE, "")
    if not raw:
        return 1.0
    try:
        scale = float(raw)
    except ValueError:
        scale = math.nan
    if not 0 < scale <= 1:
        raise ConfigError(f"environment variable {RETRY_DELAY_SCALE_VARIABLE}={raw!r} must be a number in (0, 1]; "
                          "unset it for the normal waits")
    return scale


def torch_home() -> Path:
    """Where torchvision caches downloaded weights (TORCH_HOME, else ~/.cache/torch)."""
    return Path(os.environ.get("TORCH_HOME") or Path.home() / ".cache" / "torch")
