"""How well does each cropper find the garment? Mean IoU, share at IoU >= 0.5, images/s.

The evaluation set: real Fashion-MNIST garments (Debian's dataset-fashion-mnist) pasted at known
boxes, at several sizes and positions, onto
- `photo`: windows of real photographs (scikit-image's and scikit-learn's sample photos, none of
  them showing a garment), the clutter of a user's own photos;
- `dark` / `light`: plain backgrounds, like the default dataset's product shots.
Boxes are compared at margin 0 against the garment's true (tight) box.

    PYTHONPATH=src python bench/crop_quality.py          # every cropper, 120 photo + 2 x 60 plain scenes
    PYTHONPATH=src python bench/crop_quality.py --per-kind 200 --croppers foreground,proposals

Timing: images/s is wall clock and depends on what else runs on the machine (the header and
footer give the load average); CPU ms/image counts this process's threads only. On a shared
machine set OMP_WAIT_POLICY=PASSIVE (see bench/README.md).

tests/test_preprocess.py builds its (smaller) set with the same functions.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST labels of garments worn on the body (the default dataset's six classes); not the
# sandals, sneakers, bags and boots
GARMENT_LABELS = (0, 1, 2, 3, 4, 6)
# scikit-image's colour photographs with no garment in them (astronaut and camera show clothed people)
SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "stereo_motorcycle", "grass", "gravel")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
KINDS = ("photo", "dark", "light")
# Garment side as a fraction of the scene's shorter side: small, medium, large
SIZE_BINS = {"small": (0.3, 0.45), "medium": (0.45, 0.65), "large": (0.65, 0.9)}

Box = tuple[int, int, int, int]


def fashion_mnist_garments(count: int = 10_000) -> np.ndarray:
    """(N, 28, 28) uint8 garments (white on black) among the first `count` Fashion-MNIST training images."""
    images_gz, labels_gz = FASHION_MNIST / "train-images-idx3-ubyte.gz", FASHION_MNIST / "train-labels-idx1-ubyte.gz"
    if not images_gz.is_file():
        raise FileNotFoundError(f"{images_gz} not found; apt-get install dataset-fashion-mnist")
    with gzip.open(images_gz) as f:
        images = np.frombuffer(f.read(16 + count * 784), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_gz) as f:
        labels = np.frombuffer(f.read(8 + count), np.uint8, offset=8)
    return images[np.isin(labels, GARMENT_LABELS)]


def sample_photos() -> list[np.ndarray]:
    """The real photographs used as backgrounds, (H, W, 3) uint8 each."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    photos = [p[0] if isinstance(p, tuple) else p for p in photos]  # stereo_motorcycle: (left, right, disparity)
    photos += [load_sample_image(name) for name in SKLEARN_PHOTOS]
    return [np.stack([p] * 3, axis=2) if p.ndim == 2 else p[..., :3] for p in photos]


def photo_window(photo: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of `photo`, rescaled to height × width (float)."""
    ph, pw = photo.shape[:2]
    smallest = max(height / ph, width / pw)  # the whole photo's width or height fills the window
    scale = rng.uniform(smallest, max(smallest, 1.0))
    wh, ww = min(ph, round(height / scale)), min(pw, round(width / scale))
    y, x = int(rng.integers(0, ph - wh + 1)), int(rng.integers(0, pw - ww + 1))
    window = Image.fromarray(photo[y : y + wh, x : x + ww]).resize((width, height), Image.BILINEAR)
    return np.asarray(window, np.float32)


def paste_garment(
    garment: np.ndarray, kind: str, rng: np.random.Generator, photos: list[np.ndarray] | None = None,
    size_bin: str | None = None,
) -> tuple[np.ndarray, Box]:
    """A scene with the garment, upscaled, at a random place; and the garment's true box.

    On plain backgrounds the garment's intensity is its opacity (bright on dark, inverted on
    light), as in a product shot. On photos it is opaque and tinted, as a garment in a scene.
    The true box is the 28×28 image's nonzero pixels, scaled.
    """
    height, width = int(rng.integers(200, 400)), int(rng.integers(200, 400))
    low, high = SIZE_BINS[size_bin or str(rng.choice(list(SIZE_BINS)))]
    side = max(28, int(min(height, width) * rng.uniform(low, high)))
    pixels = np.asarray(Image.fromarray(garment).resize((side, side), Image.BICUBIC), np.float32)
    tint = rng.uniform(0.6, 1.0, 3)
    if kind == "light":
        colour, alpha = (255 - pixels)[..., None] * tint, pixels[..., None] / 255
        canvas = np.full((height, width, 3), rng.integers(215, 256, 3), np.float32)
    elif kind == "dark":
        colour, alpha = pixels[..., None] * tint, pixels[..., None] / 255
        canvas = np.full((height, width, 3), rng.integers(0, 40, 3), np.float32)
    elif kind == "photo":
        colour, alpha = (64 + 0.75 * pixels[..., None]) * tint, (pixels > 20)[..., None].astype(np.float32)
        canvas = photo_window(photos[int(rng.integers(len(photos)))], height, width, rng)
    else:
        raise ValueError(f"unknown background kind {kind!r}; choose from {', '.join(KINDS)}")
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    region = canvas[y : y + side, x : x + side]
    canvas[y : y + side, x : x + side] = region * (1 - alpha) + colour * alpha
    ys, xs = np.nonzero(garment)
    scale = side / 28
    box = (x + int(xs.min() * scale), y + int(ys.min() * scale),
           x + int(np.ceil((xs.max() + 1) * scale)), y + int(np.ceil((ys.max() + 1) * scale)))
    return canvas.clip(0, 255).astype(np.uint8), box


@dataclass(frozen=True)
class Scene:
    rgb: np.ndarray
    box: Box
    kind: str
    size_bin: str


def build_scenes(garments: np.ndarray, per_kind: int, seed: int = 0, kinds=KINDS) -> list[Scene]:
    """`per_kind` scenes per background kind, sizes cycling through SIZE_BINS, distinct garments."""
    rng = np.random.default_rng(seed)
    photos = sample_photos() if "photo" in kinds else None
    scenes = []
    for kind in kinds:
        picks = rng.choice(len(garments), per_kind, replace=False)
        for n, i in enumerate(picks):
            size_bin = list(SIZE_BINS)[n % len(SIZE_BINS)]
            rgb, box = paste_garment(garments[i], kind, rng, photos, size_bin)
            scenes.append(Scene(rgb, box, kind, size_bin))
    return scenes


@dataclass(frozen=True)
class Quality:
    mean_iou: float
    share_at_half: float  # share of scenes with IoU >= 0.5
    kept_whole: float  # share where the cropper was unsure and kept the whole image
    images_per_s: float  # wall clock: depends on what else runs on the machine
    cpu_ms_per_image: float  # this process's CPU time, all threads: less so


def measure(cropper, scenes: list[Scene], batch: int = 32) -> dict[str, Quality]:
    """Quality per background kind (and 'all') of a preprocess cropper (margin 0) on the scenes.

    Each kind is timed on its own (a cropper may take a fast path on plain backgrounds), in
    batches of `batch` images as the preprocess stage hands them over.
    """
    from transfer_study import preprocess as pp

    result, ious_all, whole_all, clocks_all = {}, [], [], np.zeros(2)
    for kind in sorted({s.kind for s in scenes}, key=KINDS.index):
        group = [s for s in scenes if s.kind == kind]
        boxes, clocks = [], np.zeros(2)  # wall, CPU seconds
        for first in range(0, len(group), batch):
            start = np.array([time.perf_counter(), time.process_time()])
            boxes += cropper.boxes([s.rgb for s in group[first : first + batch]])
            clocks += np.array([time.perf_counter(), time.process_time()]) - start
        ious = [pp.box_iou(b or pp.whole_image_box(s.rgb.shape[1], s.rgb.shape[0]), s.box) for b, s in zip(boxes, group)]
        whole = [b is None for b in boxes]
        result[kind] = _quality(ious, whole, clocks)
        ious_all += ious
        whole_all += whole
        clocks_all += clocks
    result["all"] = _quality(ious_all, whole_all, clocks_all)
    return result


def _quality(ious: list[float], whole: list[bool], clocks: np.ndarray) -> Quality:
    ious_array = np.array(ious)
    wall, cpu = np.maximum(clocks, 1e-9)
    return Quality(float(ious_array.mean()), float((ious_array >= 0.5).mean()), float(np.mean(whole)),
                   len(ious) / wall, 1000 * cpu / len(ious))


def croppers_at_margin_0(names: list[str]) -> dict:
    """The named croppers as `make_cropper` builds them from default params, margin 0."""
    from transfer_study.config import PreprocessParams
    from transfer_study.preprocess import make_cropper

    return {name: make_cropper(PreprocessParams(cropper=name, margin=0.0)) for name in names}


def main(argv: list[str] | None = None) -> None:
    from transfer_study.config import CROPPERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-kind", type=int, default=60, help="scenes per background kind (photo: twice)")
    parser.add_argument("--croppers", default=",".join(CROPPERS))
    parser.add_argument("--seed", type=int, default=10, help="scene seed (tuning used 1-3, the tests 0)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.croppers.split(",")) - set(CROPPERS))
    if unknown:
        parser.error(f"unknown cropper(s) {', '.join(unknown)}; choose from {', '.join(CROPPERS)}")
    load = os.getloadavg()[0]
    try:
        garments = fashion_mnist_garments()
    except FileNotFoundError as exc:
        parser.error(str(exc))
    scenes = build_scenes(garments, 2 * args.per_kind, args.seed, kinds=("photo",))
    scenes += build_scenes(garments, args.per_kind, args.seed + 1, kinds=("dark", "light"))
    import torch

    print(f"{len(scenes)} scenes; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at the start")
    print("| cropper | background | mean IoU | IoU ≥ 0.5 | whole image kept | images/s | CPU ms/image |")
    print("|---|---|---|---|---|---|---|")
    for name, cropper in croppers_at_margin_0(args.croppers.split(",")).items():
        cropper.boxes([scenes[0].rgb])  # warm-up: first-call allocations
        for kind, q in measure(cropper, scenes).items():
            print(f"| {name} | {kind} | {q.mean_iou:.3f} | {q.share_at_half:.0%} | {q.kept_whole:.0%} | "
                  f"{q.images_per_s:.1f} | {q.cpu_ms_per_image:.1f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    sys.exit(main())
