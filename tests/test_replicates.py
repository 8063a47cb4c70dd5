"""Tests for replicates.py: independent replicate datasets and the external test set, drawn from the pool."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from transfer_study import data, replicates
from transfer_study.config import ConfigError, DataParams, Params, UserError, load_params, profile_datasets
from transfer_study.data import DEBIAN_DIR, FMNIST_LABELS, check_classes, fetch_dataset, load_fmnist

requires_debian = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)",
)
LABELS_OF = dict(FMNIST_LABELS)


@pytest.fixture(scope="module")
def fmnist():
    """Fashion-MNIST's (train images, train labels, test images, test labels), from Debian's files."""
    if not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return (*load_fmnist(DEBIAN_DIR, "train"), *load_fmnist(DEBIAN_DIR, "test"))


def pixel_hashes(images: np.ndarray, indices) -> set[str]:
    return {hashlib.sha256(images[i].tobytes()).hexdigest() for i in indices}


# --------------------------------------------------------------------------------------------
# Which images (pure)
# --------------------------------------------------------------------------------------------


def test_twenty_replicates_are_disjoint_stratified_and_replicate_zero_is_data_fetchs(fmnist):
    images, labels, test_images, _ = fmnist
    drawn = [replicates.replicate_indices(labels, LABELS_OF, 300, 0, r) for r in range(20)]
    assert drawn[0] == data.choose_indices(labels, LABELS_OF, 300, 0)  # what `data fetch` wrote to data/raw
    for chosen in drawn:
        assert list(chosen) == list(LABELS_OF) and all(len(v) == 300 for v in chosen.values())
        assert all(labels[i] == LABELS_OF[name] for name, v in chosen.items() for i in v)
    hashes = [pixel_hashes(images, [i for v in chosen.values() for i in v]) for chosen in drawn]
    assert sum(len(h) for h in hashes) == len(set().union(*hashes)) == 20 * 1800, "an image in two replicates"
    with pytest.raises(ConfigError, match="replicate 20"):
        replicates.replicate_indices(labels, LABELS_OF, 300, 0, 20)  # 21 x 300 > 6,000 per class


def test_a_replicate_is_the_same_whatever_else_is_drawn(fmnist):
    _, labels, _, _ = fmnist
    assert replicates.replicate_indices(labels, LABELS_OF, 300, 0, 3) == replicates.replicate_indices(
        labels, LABELS_OF, 300, 0, 3)
    assert replicates.replicate_indices(labels, LABELS_OF, 300, 1, 3) != replicates.replicate_indices(
        labels, LABELS_OF, 300, 0, 3), "the seed must change the draw"


def test_the_external_set_is_stratified_nested_and_shares_no_image_with_any_replicate(fmnist):
    images, labels, test_images, test_labels = fmnist
    full = replicates.external_indices(test_labels, LABELS_OF, 1000, 0)
    half, small = (replicates.external_indices(test_labels, LABELS_OF, n, 0) for n in (500, 200))
    assert all(len(v) == 1000 for v in full.values()) and all(len(v) == 200 for v in small.values())
    assert all(set(small[name]) < set(half[name]) for name in LABELS_OF), "a larger external set holds a smaller"
    assert all(test_labels[i] == LABELS_OF[name] for name, v in small.items() for i in v)
    external = pixel_hashes(test_images, [i for v in full.values() for i in v])
    trained = pixel_hashes(images, np.flatnonzero(np.isin(labels, list(LABELS_OF.values()))))
    assert len(external) == 6000 and not external & trained


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def small_params(**data_overrides) -> Params:
    d = dataclasses.replace(DataParams(), per_class=10, **data_overrides)
    return dataclasses.replace(Params(), data=d)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@requires_debian
def test_the_stage_rebuilds_the_pool_and_replicates_byte_for_byte(tmp_path):
    params = small_params(replicates=3, external_per_class=4)
    for root in (tmp_path / "a", tmp_path / "b"):
        fetch_dataset(root / params.paths.raw, params.data)
        summary = replicates.draw_replicates(root, params, "params.yaml")
    assert summary == {"replicates": {"rep01": 60, "rep02": 60}, "external": 24, "written": 144}
    for folder in ("data/pool", "data/replicates", "data/external"):
        assert tree(tmp_path / "a" / folder) == tree(tmp_path / "b" / folder), folder
    assert sorted(tree(tmp_path / "a/data/pool")) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                                     "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    files = {name: set(tree(tmp_path / "a" / d.raw).values()) for name, d in
             ((d.name, d) for d in profile_datasets(params))}
    assert set(files) == {"rep00", "rep01", "rep02", "external"}
    assert all(len(contents) == (24 if name == "external" else 60) for name, contents in files.items())
    assert sum(map(len, files.values())) == len(set().union(*files.values())), "an image in two datasets"
    # Drawing again into the same folders writes nothing new.
    assert replicates.draw_replicates(tmp_path / "a", params, "params.yaml")["written"] == 0


@requires_debian
def test_own_data_has_no_pool_and_the_stage_says_which_params_to_set(tmp_path):
    params = small_params(replicates=2)
    fetch_dataset(tmp_path / params.paths.raw, params.data)
    (tmp_path / params.paths.raw / "coat" / "fmnist-00019.png").unlink(missing_ok=True)
    next((tmp_path / params.paths.raw / "coat").iterdir()).write_bytes(b"not the default dataset")
    with pytest.raises(UserError, match=r"data.replicates: 1 and data.external_per_class: 0 in params.quick.yaml"):
        replicates.draw_replicates(tmp_path, params, "params.quick.yaml")


def test_with_nothing_to_draw_no_fashion_mnist_is_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    summary = replicates.draw_replicates(tmp_path, small_params(), "params.yaml")
    assert summary["written"] == 0
    for folder in ("data/pool", "data/replicates", "data/external"):
        assert [p.name for p in (tmp_path / folder).iterdir()] == [replicates.NOTHING_DRAWN]


@requires_debian
def test_a_corrupt_pool_source_is_refused(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (source / f"{name}.gz").write_bytes((DEBIAN_DIR / f"{name}.gz").read_bytes())
    (source / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + bytes(100))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.*sha256 mismatch"):
        replicates.write_pool(tmp_path / "pool", source)


def test_the_profiles_datasets_and_their_limits():
    quick = load_params(Path(__file__).resolve().parent.parent / "params.quick.yaml")
    names = [d.name for d in profile_datasets(quick)]
    assert names == ["rep00", "rep01", "rep02", "rep03", "rep04", "rep05", "external"]
    assert profile_datasets(quick)[0].raw == quick.paths.raw and profile_datasets(quick)[1].raw == "data/replicates/rep01"
    study = Params()
    assert [(d.raw, d.cropped) for d in profile_datasets(study)] == [("data/raw", "data/cropped")]
    assert check_classes(quick.data) == LABELS_OF
