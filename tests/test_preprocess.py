"""preprocess.py: crop boxes, square fitting, the stage, and each cropper's accuracy on pasted garments."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from transfer_study import preprocess as pp
from transfer_study.config import PreprocessParams, UserError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
BACKGROUNDS = ("dark", "light", "noise", "shapes")
SCENES_PER_BACKGROUND = 30


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
    with pytest.raises(UserError, match="letterbox"):
        pp.fit_square(corner_marked_image(10, 10), 8, "stretch")


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
    with pytest.raises(UserError, match="data fetch"):
        pp.preprocess_dataset(tmp_path / "absent", tmp_path / "out", PreprocessParams())


def test_preprocess_dataset_with_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "raw" / "coat").mkdir(parents=True)
    (tmp_path / "raw" / "coat" / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no image"):
        pp.preprocess_dataset(tmp_path / "raw", tmp_path / "out", PreprocessParams(cropper="none"))


def write_fashion_mnist_raw(garments: np.ndarray, raw: Path, count: int) -> None:
    """`count` grayscale 28x28 PNGs in six class folders, like `data fetch` writes."""
    for i in range(count):
        folder = raw / f"class{i % 6}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(garments[i]).save(folder / f"{i:05d}.png")


@pytest.mark.parametrize("cropper", ["none", "foreground", "cam"])
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
# Measuring the croppers: garments pasted at known boxes
# --------------------------------------------------------------------------------------------


def background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float canvas: dark or light plain colour, smooth colour noise, or random shapes."""
    if kind == "dark":
        return np.full((height, width, 3), rng.integers(0, 40, 3), np.float32)
    if kind == "light":
        return np.full((height, width, 3), rng.integers(215, 256, 3), np.float32)
    if kind == "noise":
        coarse = rng.normal(128, 40, (height // 4 + 1, width // 4 + 1, 3)).clip(0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.asarray(img, np.float32)


def paste_garment(garment: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, pp.Box]:
    """A scene with the garment, upscaled 2-8x, at a random place; and the garment's true box.

    On plain backgrounds the garment's intensity is its opacity (bright on dark, inverted on
    light); on cluttered ones it is opaque. The true box is the 28x28 image's nonzero pixels, scaled.
    """
    height, width = int(rng.integers(160, 320)), int(rng.integers(160, 320))
    side = int(28 * rng.uniform(2.0, 0.8 * min(height, width) / 28))
    pixels = np.asarray(Image.fromarray(garment).resize((side, side), Image.BICUBIC), np.float32)
    tint = rng.uniform(0.6, 1.0, 3)
    if kind == "light":
        colour, alpha = (255 - pixels)[..., None] * tint, pixels[..., None] / 255
    elif kind == "dark":
        colour, alpha = pixels[..., None] * tint, pixels[..., None] / 255
    else:
        colour, alpha = (64 + 0.75 * pixels[..., None]) * tint, (pixels > 20)[..., None].astype(np.float32)
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    canvas = background(kind, height, width, rng)
    region = canvas[y : y + side, x : x + side]
    canvas[y : y + side, x : x + side] = region * (1 - alpha) + colour * alpha
    ys, xs = np.nonzero(garment)
    scale = side / 28
    box = (x + int(xs.min() * scale), y + int(ys.min() * scale),
           x + int(np.ceil((xs.max() + 1) * scale)), y + int(np.ceil((ys.max() + 1) * scale)))
    return canvas.clip(0, 255).astype(np.uint8), box


def mean_iou(cropper: pp.Cropper, scenes: list[tuple[np.ndarray, pp.Box]]) -> float:
    boxes = cropper.boxes([rgb for rgb, _ in scenes])
    whole = [pp.whole_image_box(rgb.shape[1], rgb.shape[0]) for rgb, _ in scenes]
    return float(np.mean([pp.box_iou(b or w, truth) for b, w, (_, truth) in zip(boxes, whole, scenes)]))


def test_cropper_iou_on_pasted_fashion_mnist_garments(garments):
    """Mean IoU of each cropper's box (margin 0) with the true garment box, per background."""
    rng = np.random.default_rng(0)
    picks = rng.choice(len(garments), SCENES_PER_BACKGROUND, replace=False)
    scenes = {kind: [paste_garment(garments[i], kind, rng) for i in picks] for kind in BACKGROUNDS}
    croppers = {
        "none": pp.WholeImageCropper(),
        "foreground": pp.ForegroundCropper(threshold=PreprocessParams().foreground_threshold, margin=0.0),
        "cam": pp.CamCropper(threshold=PreprocessParams().cam_threshold, margin=0.0),
    }
    table = {name: {kind: mean_iou(c, scenes[kind]) for kind in BACKGROUNDS} for name, c in croppers.items()}
    lines = [f"{'cropper':<12}" + "".join(f"{k:>9}" for k in BACKGROUNDS)]
    lines += [f"{name:<12}" + "".join(f"{row[k]:>9.3f}" for k in BACKGROUNDS) for name, row in table.items()]
    print(f"\nCROPPER IoU ({SCENES_PER_BACKGROUND} Fashion-MNIST garments per background, margin 0)\n"
          + "\n".join(lines))
    assert table["foreground"]["dark"] >= 0.8 and table["foreground"]["light"] >= 0.8
    assert table["none"]["dark"] < 0.5  # the scenes really need cropping
    for kind in BACKGROUNDS:
        assert table["cam"][kind] > table["none"][kind]  # the CAM points at the garment, however coarsely


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
