"""preprocess.py: crop boxes, square fitting, the stage, and each cropper's accuracy on pasted garments."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from transfer_study import preprocess as pp
from transfer_study.config import ConfigError, PreprocessParams, UserError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import crop_quality  # noqa: E402  (builds the pasted-garment evaluation set)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def garments() -> np.ndarray:
    """(N, 28, 28) uint8 Fashion-MNIST training images (white garment on black)."""
    if not FASHION_MNIST.is_file():
        pytest.skip(f"{FASHION_MNIST} not installed (apt-get install dataset-fashion-mnist)")
    raw = gzip.decompress(FASHION_MNIST.read_bytes())
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_expand_box_grows_by_margin_and_clips():
    assert pp.expand_box((10, 20, 30, 60), 0.1, 100, 100) == (8, 16, 32, 64)
    assert pp.expand_box((0, 0, 50, 50), 0.5, 60, 60) == (0, 0, 60, 60)
    assert pp.expand_box((10, 10, 20, 20), 0.0, 100, 100) == (10, 10, 20, 20)


def test_box_iou():
    assert pp.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert pp.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert pp.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def corner_marked_image(width: int, height: int) -> Image.Image:
    """A blue image with red 5x5 squares in its four corners."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:] = (0, 0, 255)
    for ys in (slice(0, 5), slice(height - 5, height)):
        for xs in (slice(0, 5), slice(width - 5, width)):
            rgb[ys, xs] = (255, 0, 0)
    return Image.fromarray(rgb)


def is_red(pixel) -> bool:
    return pixel[0] > 150 and pixel[2] < 100


def test_letterbox_keeps_the_whole_box_and_pads_with_the_border_colour():
    out = pp.fit_square(corner_marked_image(100, 50), 64, "letterbox")
    assert out.size == (64, 64) and out.mode == "RGB"
    px = np.asarray(out)
    # the 100x50 image becomes 64x32, rows 16..47: all four red corners survive
    for y, x in [(17, 1), (17, 62), (46, 1), (46, 62)]:
        assert is_red(px[y, x]), (y, x, px[y, x])
    # padding above and below takes the border's median colour (blue), not black
    assert (px[:15] == (0, 0, 255)).all() and (px[49:] == (0, 0, 255)).all()


def test_center_fit_fills_the_square_and_cuts_the_long_side():
    out = pp.fit_square(corner_marked_image(100, 50), 64, "center")
    assert out.size == (64, 64)
    px = np.asarray(out)
    assert not any(is_red(px[y, x]) for y, x in [(1, 1), (1, 62), (62, 1), (62, 62)])  # corners cut away
    assert px[32, 32].tolist() == [0, 0, 255]


def test_fit_square_rejects_unknown_fit():
    with pytest.raises(UserError) as error:
        pp.fit_square(corner_marked_image(10, 10), 8, "stretch")
    assert str(error.value) == "preprocess.fit = 'stretch'; use 'letterbox' or 'center'"


def test_cropper_none_keeps_the_whole_image():
    rgb = np.zeros((40, 70, 3), np.uint8)
    assert pp.make_cropper(PreprocessParams(cropper="none")).boxes([rgb]) == [(0, 0, 70, 40)]


def test_foreground_box_of_a_rectangle_on_a_plain_background():
    rgb = np.full((100, 150, 3), 240, np.uint8)
    rgb[20:60, 30:90] = (200, 30, 30)
    assert pp.crop_box_foreground(rgb, 0.1, 0.0) == (30, 20, 90, 60)
    assert pp.crop_box_foreground(rgb, 0.1, 0.1) == (24, 16, 96, 64)


def test_foreground_drops_specks_but_keeps_two_trouser_legs():
    rgb = np.zeros((100, 100, 3), np.uint8)
    rgb[20:90, 20:35] = 200  # left leg
    rgb[20:90, 45:60] = 200  # right leg
    rgb[5, 95] = 255  # a speck
    assert pp.crop_box_foreground(rgb, 0.1, 0.0) == (20, 20, 60, 90)


def test_foreground_on_a_large_photo_scales_the_box_back():
    rgb = np.full((1200, 1600, 3), 250, np.uint8)
    rgb[300:900, 400:1000] = (20, 20, 120)
    box = pp.crop_box_foreground(rgb, 0.1, 0.0)
    assert pp.box_iou(box, (400, 300, 1000, 900)) > 0.97  # analysed at 512 px: a few px of slack


def test_foreground_finds_nothing_on_a_plain_image():
    assert pp.crop_box_foreground(np.full((50, 50, 3), 128, np.uint8), 0.1, 0.08) is None


def test_crop_box_cam_takes_the_largest_hot_region():
    cam = np.zeros((10, 10), np.float32)
    cam[2:6, 2:6] = 1.0  # 16 cells
    cam[8, 8] = 0.9  # one cell, above threshold but smaller
    assert pp.crop_box_cam(cam, 100, 50, 0.5, 0.0) == (20, 10, 60, 30)
    assert pp.crop_box_cam(np.zeros((7, 7)), 100, 50, 0.5, 0.0) is None


def test_cam_cropper_uses_real_lite0_weights_and_its_box_follows_the_object():
    cropper = pp.make_cropper(PreprocessParams(cropper="cam"))
    classes = sorted(pp_models().IMAGENET_GARMENT_CLASSES)
    real = pp_models().load_state_dict(pp_models().resolve_weights("efficientnet_lite0", None), "efficientnet_lite0")
    assert np.array_equal(cropper.class_weights.numpy(), real["_fc.weight"][classes].numpy())
    # A dark object top left, then bottom right, on a light 240x180 image. The CAM is coarse (7x7),
    # so its box is loose; but it must hold the object's centre, overlap the object clearly more than
    # the whole image does, and move with it.
    objects = [(10, 20, 90, 100), (150, 90, 230, 170)]
    boxes = []
    for x0, y0, x1, y1 in objects:
        rgb = np.full((180, 240, 3), 235, np.uint8)
        rgb[y0:y1, x0:x1] = (40, 40, 90)
        (box,) = cropper.boxes([rgb])
        boxes.append(box)
        assert box[0] <= (x0 + x1) / 2 <= box[2] and box[1] <= (y0 + y1) / 2 <= box[3], box
        assert pp.box_iou(box, (x0, y0, x1, y1)) > 1.5 * pp.box_iou((0, 0, 240, 180), (x0, y0, x1, y1)), box

    def centre(box):
        return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])

    for own, other in ((0, 1), (1, 0)):
        distance = np.linalg.norm(centre(boxes[own]) - centre(objects[own]))
        assert distance < np.linalg.norm(centre(boxes[own]) - centre(objects[other])), boxes


def pp_models():
    from transfer_study import models

    return models


def test_crop_and_fit_for_serving():
    img = Image.fromarray(np.full((60, 90, 3), 250, np.uint8))
    ImageDraw.Draw(img).rectangle((30, 10, 59, 49), fill=(10, 10, 10))
    params = PreprocessParams(cropper="foreground", size=32, margin=0.0)
    out = pp.crop_and_fit(img, params, pp.make_cropper(params))
    assert out.size == (32, 32)
    # the 30x40 dark box fills the height: the middle column is dark top to bottom
    assert np.asarray(out)[1:31, 16].max() < 60


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def small_raw_folder(root: Path) -> Path:
    raw = root / "raw"
    for cls, colour in (("coat", (200, 40, 40)), ("dress", (40, 40, 200))):
        for i in range(3):
            rgb = np.full((40, 60, 3), 245, np.uint8)
            rgb[5 + i : 30, 10:40] = colour
            write_png(raw / cls / f"img{i}.png", rgb)
    (raw / "coat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    (raw / "dress" / "notes.txt").write_text("not an image")
    write_png(raw / "dress" / "blank.png", np.full((30, 30, 3), 200, np.uint8))
    return raw


def test_preprocess_dataset_end_to_end(tmp_path, capsys):
    raw = small_raw_folder(tmp_path)
    out = tmp_path / "cropped"
    summary = pp.preprocess_dataset(raw, out, PreprocessParams(cropper="foreground", size=48))
    printed = capsys.readouterr().out
    assert summary["written"] == 7 and summary["per_class"] == {"coat": 3, "dress": 4}
    excluded = {Path(e["path"]).name: e["reason"] for e in summary["excluded"]}
    assert set(excluded) == {"broken.jpg", "notes.txt"}
    assert "broken.jpg" in printed and "notes.txt" in printed
    # the blank image has no garment: kept whole, counted and listed
    assert summary["whole_image_fallbacks"] == 1 and summary["fallback_files"][0].endswith("blank.png")
    assert "whole image kept: 1" in printed
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted([f"coat/img{i}.png" for i in range(3)] + [f"dress/img{i}.png" for i in range(3)]
                             + ["dress/blank.png"])
    with Image.open(out / "coat" / "img0.png") as img:
        assert img.size == (48, 48) and img.mode == "RGB"
        # cropped to the red box: the centre is red, not the light background
        assert np.asarray(img)[24, 24].tolist()[0] > 150
    assert not list(out.rglob(".*.tmp"))


def test_preprocess_dataset_reports_a_missing_raw_folder(tmp_path):
    with pytest.raises(UserError) as error:
        pp.preprocess_dataset(tmp_path / "absent", tmp_path / "out", PreprocessParams())
    assert str(error.value) == (f"raw images folder '{tmp_path / 'absent'}' not found; run `transfer-study data fetch` "
                                "or set paths.raw")


def test_preprocess_dataset_with_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "raw" / "coat").mkdir(parents=True)
    (tmp_path / "raw" / "coat" / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserError) as error:
        pp.preprocess_dataset(tmp_path / "raw", tmp_path / "out", PreprocessParams(cropper="none"))
    assert str(error.value) == f"no image in '{tmp_path / 'raw'}' could be preprocessed; see the excluded files above"


def write_fashion_mnist_raw(garments: np.ndarray, raw: Path, count: int) -> None:
    """`count` grayscale 28x28 PNGs in six class folders, like `data fetch` writes."""
    for i in range(count):
        folder = raw / f"class{i % 6}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(garments[i]).save(folder / f"{i:05d}.png")


@pytest.mark.parametrize("cropper", ["none", "foreground", "cam", "proposals"])
def test_preprocess_writes_every_fashion_mnist_image_as_rgb(garments, tmp_path, cropper):
    """Each cropper turns real 28x28 grayscale garments into stored RGB squares (timing: bench/)."""
    write_fashion_mnist_raw(garments, tmp_path / "raw", 36)
    summary = pp.preprocess_dataset(tmp_path / "raw", tmp_path / "out", PreprocessParams(cropper=cropper))
    assert summary["written"] == 36
    written = sorted((tmp_path / "out").glob("*/*.png"))
    assert len(written) == 36
    with Image.open(written[0]) as img:
        assert img.mode == "RGB" and img.size == (299, 299)


# --------------------------------------------------------------------------------------------
# Measuring the croppers: real garments pasted at known boxes on real photos and plain backgrounds
# --------------------------------------------------------------------------------------------

# Issue 16's targets, less a margin for a set of 45 photo scenes (standard error of the mean IoU ~0.04)
PHOTO_MEAN_IOU, PHOTO_SHARE_AT_HALF, PLAIN_MEAN_IOU = 0.7 - 0.05, 0.85 - 0.07, 0.85


@pytest.fixture(scope="module")
def pasted_scenes():
    """45 photo scenes and 15 each on dark and light plain backgrounds (seed 0; the weights were tuned on seeds 1-3)."""
    if not crop_quality.FASHION_MNIST.joinpath("train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    garments = crop_quality.fashion_mnist_garments(3000)
    return (crop_quality.build_scenes(garments, 45, seed=0, kinds=("photo",))
            + crop_quality.build_scenes(garments, 15, seed=0, kinds=("dark", "light")))


def test_the_scenes_put_garments_of_every_size_on_real_photos(pasted_scenes):
    photos = [s for s in pasted_scenes if s.kind == "photo"]
    assert {s.size_bin for s in photos} == set(crop_quality.SIZE_BINS)
    for s in pasted_scenes:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= s.rgb.shape[1] and 0 <= y0 < y1 <= s.rgb.shape[0]
    # a photo window is no plain background: its border varies (the plain ones do not)
    assert not any(pp.has_plain_background(s.rgb) for s in photos)
    assert all(pp.has_plain_background(s.rgb) for s in pasted_scenes if s.kind != "photo")


@pytest.mark.slow
def test_cropper_iou_on_pasted_garments(pasted_scenes):
    """Every cropper's boxes (margin 0) against the true garment boxes; `proposals` meets issue 16's targets."""
    croppers = crop_quality.croppers_at_margin_0(["none", "foreground", "cam", "proposals"])
    table = {name: crop_quality.measure(c, pasted_scenes) for name, c in croppers.items()}
    print("\nCROPPER IoU (45 photo, 15 dark, 15 light scenes; margin 0)")
    for name, row in table.items():
        print(f"{name:<11}" + "".join(f" {k} {q.mean_iou:.3f} ({q.share_at_half:.0%} >= 0.5)" for k, q in row.items()))
    photo = table["proposals"]["photo"]
    assert photo.mean_iou >= PHOTO_MEAN_IOU and photo.share_at_half >= PHOTO_SHARE_AT_HALF
    assert photo.kept_whole <= 0.15  # unsure on a few photos, not a way out of cropping
    for kind in ("dark", "light"):
        assert table["proposals"][kind].mean_iou >= PLAIN_MEAN_IOU
        assert table["foreground"][kind].mean_iou >= PLAIN_MEAN_IOU
        assert table["none"][kind].mean_iou < 0.5  # the scenes really need cropping
    # the other croppers are what issue 16 measured: far from the target on photos
    assert max(table[name]["photo"].mean_iou for name in ("none", "foreground", "cam")) < 0.5
    assert table["cam"]["photo"].mean_iou > table["none"]["photo"].mean_iou  # coarse, but it points at the garment


# --------------------------------------------------------------------------------------------
# The `proposals` cropper's decisions
# --------------------------------------------------------------------------------------------


def test_plain_background_test():
    plain = np.full((60, 80, 3), 240, np.uint8)
    plain[20:40, 30:50] = 10  # a garment off the border does not matter
    assert pp.has_plain_background(plain)
    noisy = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    assert not pp.has_plain_background(noisy)


def test_distinct_best_skips_near_duplicate_boxes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [0, 0, 5, 5], [40, 40, 50, 50]])
    score = np.array([5.0, 4.0, 3.0, 2.0, -np.inf])
    # box 1 nearly repeats box 0; box 3 overlaps box 0 by IoU 0.25 only; box 4 is no candidate
    assert pp.distinct_best(boxes, score, 3, 0.7).tolist() == [0, 2, 3]
    assert pp.distinct_best(boxes, score, 2, 0.7).tolist() == [0, 2]
    assert pp.distinct_best(boxes, score, 9, 0.95).tolist() == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def proposal_cropper():
    return pp.make_cropper(PreprocessParams(cropper="proposals", margin=0.0))


def cluttered_scene() -> tuple[np.ndarray, pp.Box]:
    """A flat grey rectangle (the 'garment') on a background of random 8 px colour squares."""
    rng = np.random.default_rng(1)
    rgb = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    rgb[30:100, 50:110] = (150, 150, 160)
    return rgb, (50, 30, 110, 100)


def test_proposals_on_a_plain_background_takes_the_foreground_box(proposal_cropper):
    rgb = np.full((100, 150, 3), 240, np.uint8)
    rgb[20:60, 30:90] = (200, 30, 30)
    assert proposal_cropper.boxes([rgb]) == [pp.crop_box_foreground(rgb, PreprocessParams().foreground_threshold, 0.0)]


def test_proposals_keeps_the_whole_image_when_the_network_sees_no_garment(proposal_cropper, monkeypatch):
    rgb, truth = cluttered_scene()
    monkeypatch.setattr(proposal_cropper, "target_probability", lambda crops: np.full(len(crops), 0.5))
    (sure,) = proposal_cropper.boxes([rgb])
    assert pp.box_iou(sure, truth) > 0.8  # the flat, compact region off the edge wins
    monkeypatch.setattr(proposal_cropper, "target_probability",
                        lambda crops: np.full(len(crops), pp.MIN_TARGET_PROBABILITY / 2))
    assert proposal_cropper.boxes([rgb]) == [None]  # unsure: counted by the stage, whole image kept


def test_proposals_lets_the_network_choose_among_the_regions(proposal_cropper, monkeypatch):
    """With equal priors out of reach, the crop the network calls a garment wins."""
    rgb, truth = cluttered_scene()
    small = pp._resized_longer_side(rgb, pp.PROPOSAL_SIDE)

    def likes_wide_crops(crops):  # a stand-in network that prefers the widest crop
        widths = np.array([c.shape[1] for c in crops], float)
        return np.where(widths == widths.max(), 0.99, 0.02)

    monkeypatch.setattr(proposal_cropper, "target_probability", likes_wide_crops)
    _, boxes, _ = proposal_cropper._candidates(rgb)
    (box,) = proposal_cropper.boxes([rgb])
    widest = max(boxes, key=lambda b: b[2] - b[0])
    scale = rgb.shape[1] / small.shape[1]
    assert box[2] - box[0] == pytest.approx((widest[2] - widest[0]) * scale, abs=2)


def test_proposals_in_the_stage_counts_unsure_images(tmp_path, monkeypatch, proposal_cropper, capsys):
    rgb, _ = cluttered_scene()
    write_png(tmp_path / "raw" / "coat" / "photo.png", rgb)
    monkeypatch.setattr(proposal_cropper, "target_probability", lambda crops: np.zeros(len(crops)))
    monkeypatch.setattr(pp, "make_cropper", lambda params: proposal_cropper)
    summary = pp.preprocess_dataset(tmp_path / "raw", tmp_path / "out", PreprocessParams(cropper="proposals", size=32))
    assert summary["whole_image_fallbacks"] == 1
    assert "cropper unsure, whole image kept: 1" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The crop preview
# --------------------------------------------------------------------------------------------


def test_preview_picks_spread_over_all_images():
    assert pp.preview_picks(5, 16) == [0, 1, 2, 3, 4]
    assert pp.preview_picks(100, 4) == [0, 33, 66, 99]


def test_preview_tile_draws_the_box_or_marks_the_whole_image():
    img = Image.fromarray(np.full((100, 200, 3), 255, np.uint8))
    tile = np.asarray(pp.preview_tile(img, (50, 25, 150, 75)))
    assert tile.shape == (pp.PREVIEW_TILE, pp.PREVIEW_TILE, 3)
    # 200 px wide -> scale 0.8, centred vertically (top 40): the box's left edge is at x 40, y 60..99
    assert tile[80, 40].tolist() == [40, 230, 40] and tile[80, 80].tolist() == [255, 255, 255]
    whole = np.asarray(pp.preview_tile(img, None))
    assert whole[0, 80].tolist() == [230, 40, 40]


def test_preprocess_writes_the_preview_grid(tmp_path):
    raw = small_raw_folder(tmp_path)
    summary = pp.preprocess_dataset(raw, tmp_path / "cropped", PreprocessParams(cropper="foreground", size=48),
                                    preview=tmp_path / "reports" / "preview.png")
    assert summary["preview"] == str(tmp_path / "reports" / "preview.png")
    with Image.open(tmp_path / "reports" / "preview.png") as grid:
        # 7 readable images: 4 columns, 2 rows
        assert grid.size == (4 * pp.PREVIEW_TILE, 2 * pp.PREVIEW_TILE)
        tiles = np.asarray(grid.convert("RGB"))
    red_frames = [tiles[r * pp.PREVIEW_TILE + 1, c * pp.PREVIEW_TILE + 80].tolist() == [230, 40, 40]
                  for r in range(2) for c in range(4)]
    assert sum(red_frames) == 1  # the blank image: no garment, whole image kept


def test_the_crops_record_how_they_were_made(tmp_path):
    """preprocess.json beside the crops is what training and serving take their settings from."""
    raw = tmp_path / "raw" / "coat"
    raw.mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 10, 10)).save(raw / "a.png")
    params = PreprocessParams(cropper="none", size=32)
    pp.preprocess_dataset(tmp_path / "raw", tmp_path / "cropped", params)
    assert pp.read_crop_record(tmp_path / "cropped") == params
    assert pp.check_crops_match(tmp_path / "cropped", params) == params
    with pytest.raises(UserError, match="size: crops 32, profile 64"):
        pp.check_crops_match(tmp_path / "cropped", PreprocessParams(cropper="none", size=64))
    (tmp_path / "cropped" / pp.CROP_RECORD).unlink()
    with pytest.raises(UserError, match="does not say how the crops"):
        pp.read_crop_record(tmp_path / "cropped")


def test_an_unreadable_pick_passes_its_preview_place_to_the_next_image(tmp_path, monkeypatch):
    """The preview shows PREVIEW_COUNT images whenever the data has that many readable ones."""
    raw = tmp_path / "raw" / "coat"
    raw.mkdir(parents=True)
    for i in range(9):
        Image.new("RGB", (40, 30), (10 * i, 10, 10)).save(raw / f"img{i}.png")
    (raw / "img0.png").write_bytes(b"not a png")  # a picked image (the first) that cannot be read
    monkeypatch.setattr(pp, "PREVIEW_COUNT", 4)
    pp.preprocess_dataset(tmp_path / "raw", tmp_path / "cropped", PreprocessParams(cropper="none", size=32),
                          preview=tmp_path / "preview.png")
    with Image.open(tmp_path / "preview.png") as grid:
        assert grid.size == (4 * pp.PREVIEW_TILE, pp.PREVIEW_TILE)  # 4 tiles, not 3


# --------------------------------------------------------------------------------------------
# What `cam` and `proposals` look for (preprocess.targets), on real photographs
# --------------------------------------------------------------------------------------------


def test_targets_name_imagenet_classes_or_a_group_or_objectness():
    from transfer_study.models import IMAGENET_GARMENT_CLASSES

    assert pp.target_classes(("garments",)) == tuple(sorted(IMAGENET_GARMENT_CLASSES))
    assert pp.target_classes(("daisy", "church")) == (497, 985)
    assert pp.target_classes(("objectness",)) is None
    with pytest.raises(ConfigError, match="'dasiy' is not an ImageNet class.*did you mean 'daisy'"):
        pp.target_classes(("dasiy",))


def real_photos() -> dict[str, np.ndarray]:
    """Photographs whose subject is the whole photo (a temple, a flower, a portrait) and a few of
    other things, none of them a garment: scikit-learn's and scikit-image's samples (offline)."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    return {"temple": load_sample_image("china.jpg"), "flower": load_sample_image("flower.jpg"),
            "portrait": data.astronaut(), "coffee": data.coffee(), "cat": data.chelsea(), "rocket": data.rocket()}


def test_a_cropper_that_finds_its_target_in_few_photos_warns_with_the_fix(tmp_path, monkeypatch, proposal_cropper,
                                                                          capsys):
    """The issue's case: garment-seeking `proposals` on photos of other things keeps most of them
    whole; the stage says so and how to fix it. The README's advice for photos that are the object,
    `none`, previews every photo whole, with no warning."""
    for name, rgb in real_photos().items():
        write_png(tmp_path / "raw" / "things" / f"{name}.png", rgb)
    monkeypatch.setattr(pp, "make_cropper", lambda params: proposal_cropper if params.cropper == "proposals"
                        else pp.WholeImageCropper())
    garments = pp.preprocess_dataset(tmp_path / "raw", tmp_path / "garments", PreprocessParams(cropper="proposals",
                                     size=32))
    printed = capsys.readouterr().out
    assert garments["whole_image_fallbacks"] >= 4, garments["fallback_files"]
    (warning,) = garments["warnings"]
    assert f"{garments['whole_image_fallbacks']} of 6 images kept whole" in warning
    assert "looks for garments" in warning and "preprocess.cropper: none" in warning and "preprocess.targets" in warning
    assert f"WARNING: {warning}" in printed
    assert json.loads((tmp_path / "garments" / pp.CROP_RECORD).read_text())["summary"]["warnings"] == [warning]

    whole = pp.preprocess_dataset(tmp_path / "raw", tmp_path / "whole", PreprocessParams(cropper="none", size=32),
                                  preview=tmp_path / "whole.png")
    assert whole["warnings"] == [] and whole["whole_image_fallbacks"] == 0
    with Image.open(tmp_path / "whole.png") as grid:
        tiles = np.asarray(grid.convert("RGB"))
    for k, (_, rgb) in enumerate(sorted(real_photos().items())):  # in file order: each box is the whole frame, green
        scale = pp.PREVIEW_TILE / max(rgb.shape[:2])
        top = (pp.PREVIEW_TILE - round(rgb.shape[0] * scale)) // 2
        row, column = divmod(k, pp.PREVIEW_COLUMNS)
        assert tiles[row * pp.PREVIEW_TILE + top, column * pp.PREVIEW_TILE + 80].tolist() == [40, 230, 40]


def test_objectness_crops_to_the_object_whatever_its_class():
    """Class-agnostic `proposals` finds the flower and the cup, which no garment class describes."""
    cropper = pp.make_cropper(PreprocessParams(cropper="proposals", margin=0.0, targets=("objectness",)))
    photos = real_photos()
    flower, coffee = cropper.boxes([photos["flower"], photos["coffee"]])
    centre_inside = lambda box, x, y: box[0] < x < box[2] and box[1] < y < box[3]  # noqa: E731
    assert flower is not None and centre_inside(flower, 305, 215)  # the dahlia's centre
    assert (flower[2] - flower[0]) * (flower[3] - flower[1]) < 0.6 * 640 * 427
    assert coffee is not None and centre_inside(coffee, 330, 110)  # the cup
