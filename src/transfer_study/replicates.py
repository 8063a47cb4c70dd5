"""Stage `data replicates`: independent replicate datasets and the external test set, drawn from
Fashion-MNIST as released (the pool).

Fashion-MNIST holds 6,000 training images per class. Replicate 0 is the default dataset, paths.raw
(`data fetch`: data.per_class seeded images per class, versioned by data.dvc). Replicates 1, 2, ...
take data.per_class more images per class each from the rest: one seeded permutation of each
class's remaining images, cut into consecutive blocks, so replicates are disjoint from replicate 0
and from each other, stratified, and replicate r holds the same images whatever data.replicates
asks for. The external test set is a seeded, stratified choice of data.external_per_class of the
1,000 official test images per class, nested in the same way; no training image is in it.

The stage writes the pool (paths.pool: the four idx files, decompressed, checked against their
SHA-256), replicate r as paths.replicates/rep<r>/<class>/fmnist-<index>.png and the external set
as paths.external/<class>/fmnist-test-<index>.png, with the PNG bytes of `data fetch`, so the same
params give the same bytes on every machine. Validation and cropping are the data stages' own
(config.profile_datasets lists these folders beside paths.raw).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import ConfigError, DataParams, Params, PathParams, UserError, replicate_name
from .data import (DEFAULT_CACHE_DIR, FMNIST_PARTS, check_classes, choose_indices, default_dataset_files,
                   encode_png, list_images, load_fmnist, read_verified, resolve_source, write_dataset_files)

NOTHING_DRAWN = "NOTHING_DRAWN"  # the one file of an out that this profile's params leave empty


# --------------------------------------------------------------------------------------------
# Pure: which images each replicate and the external set hold
# --------------------------------------------------------------------------------------------


def replicate_indices(labels: np.ndarray, labels_of: dict[str, int], per_class: int, seed: int,
                      replicate: int) -> dict[str, list[int]]:
    """Training-set indices of replicate `replicate`, per class (sorted; classes in labels_of's order).

    Replicate 0 is choose_indices' choice (the default dataset); replicate r >= 1 is block r - 1 of
    a seeded permutation of each class's other images. Raises ConfigError when the class has too
    few images left."""
    first = choose_indices(labels, labels_of, per_class, seed)
    if replicate == 0:
        return first
    rng = np.random.default_rng([seed, 1])  # its own stream: replicate 0's draw is left as it was
    chosen = {}
    for name, label in labels_of.items():
        taken = set(first[name])
        rest = np.array([i for i in np.flatnonzero(labels == label) if i not in taken])
        order = rng.permutation(rest)
        block = order[(replicate - 1) * per_class: replicate * per_class]
        if len(block) < per_class:
            raise ConfigError(f"data.replicates: class '{name}' has {len(rest) + per_class} training images, too few "
                              f"for replicate {replicate} of {per_class} images; ask for fewer replicates")
        chosen[name] = sorted(int(i) for i in block)
    return chosen


def external_indices(labels: np.ndarray, labels_of: dict[str, int], per_class: int, seed: int) -> dict[str, list[int]]:
    """Test-set indices of the external test set: the first `per_class` of a seeded permutation of
    each class's test images (sorted), so a larger set holds every image of a smaller one."""
    rng = np.random.default_rng([seed, 2])
    chosen = {}
    for name, label in labels_of.items():
        order = rng.permutation(np.flatnonzero(labels == label))
        chosen[name] = sorted(int(i) for i in order[:per_class])
    return chosen


def replicate_files(images: np.ndarray, chosen: dict[str, list[int]], prefix: str = "fmnist") -> dict[Path, bytes]:
    """`<class>/<prefix>-<index>.png` -> PNG bytes (data fetch's encoding) of the chosen images."""
    return {Path(name) / f"{prefix}-{index:05d}.png": encode_png(images[index])
            for name, indices in chosen.items() for index in indices}


def draws_anything(data: DataParams) -> bool:
    """Whether the params ask for replicates beyond paths.raw or for an external test set."""
    return data.replicates > 1 or data.external_per_class > 0


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def write_pool(dest: Path, source: Path | None, cache_dir: Path | None = None) -> Path:
    """Copy Fashion-MNIST's four idx files, decompressed and verified, into dest; returns dest.

    The source is `source`, else Debian's package, else a download (data.resolve_source)."""
    folder = resolve_source(source, cache_dir or DEFAULT_CACHE_DIR, parts=tuple(FMNIST_PARTS))
    dest.mkdir(parents=True, exist_ok=True)
    for name in (name for pair in FMNIST_PARTS.values() for name in pair):
        target = dest / name
        content = read_verified(folder, name)
        if not (target.is_file() and target.read_bytes() == content):
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, target)
    return dest


def check_is_replicate_zero(raw: Path, images: np.ndarray, labels: np.ndarray, params: Params,
                            params_path: str) -> None:
    """UserError unless `raw` holds exactly the default dataset (`data fetch`'s files, byte for
    byte): the replicates are drawn around it, and your own photos have no pool to draw from."""
    planned = default_dataset_files(images, labels, params.data)
    present = {path.relative_to(raw): path for paths in list_images(raw).values() for path in paths}
    same = set(present) == set(planned) and all(present[p].read_bytes() == planned[p] for p in planned)
    if not same:
        raise UserError(
            f"'{raw}' (paths.raw) is not the default dataset, so there is no pool to draw replicates or an external "
            f"test set from; for your own images set data.replicates: 1 and data.external_per_class: 0 in "
            f"{params_path} (repeated splits, split.repeats, are then the units), or restore the default dataset "
            f"(`rm -rf {raw} && transfer-study data fetch`)")


def _mark_nothing_drawn(folder: Path, why: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NOTHING_DRAWN).write_text(why + "\n")


def draw_replicates(root: Path, params: Params, params_path: str, source: Path | None = None,
                    cache_dir: Path | None = None) -> dict:
    """Stage `data replicates`: write the pool, replicates 1 .. data.replicates - 1 and the external
    test set under root (paths.pool, paths.replicates, paths.external).

    With nothing to draw (one replicate, no external set: your own data) each folder gets only a
    NOTHING_DRAWN note, and Fashion-MNIST is not needed. Raises UserError when paths.raw is not the
    default dataset. Returns {"replicates": {name: images}, "external": images, "written": files}."""
    data, paths = params.data, params.paths
    folders = [root / paths.pool, root / paths.replicates, root / paths.external]
    if not draws_anything(data):
        for folder in folders:
            _mark_nothing_drawn(folder, "data.replicates is 1 and data.external_per_class is 0: nothing is drawn")
        return {"replicates": {}, "external": 0, "written": 0}
    labels_of = check_classes(data)
    for folder in folders:  # left by params that drew nothing
        (folder / NOTHING_DRAWN).unlink(missing_ok=True)
    pool = write_pool(root / paths.pool, source if source is not None else data.source, cache_dir)
    images, labels = load_fmnist(pool, "train")
    check_is_replicate_zero(root / paths.raw, images, labels, params, params_path)
    summary = {"replicates": {}, "external": 0, "written": 0}
    for replicate in range(1, data.replicates):
        chosen = replicate_indices(labels, labels_of, data.per_class, data.seed, replicate)
        name = replicate_name(replicate)
        summary["written"] += write_dataset_files(root / paths.replicates / name, replicate_files(images, chosen))
        summary["replicates"][name] = sum(len(v) for v in chosen.values())
    if data.replicates == 1:
        _mark_nothing_drawn(root / paths.replicates, "data.replicates is 1: replicate 0 is paths.raw alone")
    if data.external_per_class:
        test_images, test_labels = load_fmnist(pool, "test")
        chosen = external_indices(test_labels, labels_of, data.external_per_class, data.seed)
        summary["written"] += write_dataset_files(root / paths.external,
                                                  replicate_files(test_images, chosen, prefix="fmnist-test"))
        summary["external"] = sum(len(v) for v in chosen.values())
    else:
        _mark_nothing_drawn(root / paths.external, "data.external_per_class is 0: no external test set")
    return summary


def describe(summary: dict, paths: PathParams) -> str:
    """The stage's summary in one line."""
    if not summary["replicates"] and not summary["external"]:
        return "nothing drawn: data.replicates is 1 and data.external_per_class is 0"
    replicates = ", ".join(f"{name} {n}" for name, n in summary["replicates"].items()) or "none"
    return (f"replicates beside {paths.raw} (images): {replicates} under {paths.replicates}; external test set: "
            f"{summary['external']} images under {paths.external}; {summary['written']} file(s) written; "
            f"pool: {paths.pool}")
