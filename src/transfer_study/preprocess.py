"""Stage `preprocess`: crop every raw image to its garment and store it as a square RGB PNG.

Croppers (params.preprocess.cropper):
- `none`: the whole image.
- `foreground`: pixels far from the background colour (median of the border), bounding box of
  the main blobs. Fast; right for product shots on plain backgrounds.
- `cam`: class-activation map of ImageNet EfficientNet-Lite0 for its garment classes, bounding
  box of its largest hot region. Slower; meant for cluttered backgrounds.

A cropper that finds nothing keeps the whole image; the summary counts and lists those files.
Boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive, as PIL's `Image.crop` takes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from .config import ConfigError, PreprocessParams, UserError

Box = tuple[int, int, int, int]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CROP_RECORD = "preprocess.json"  # beside the class folders: how the crops were made
# Boxes are searched on a copy at most this large: much faster on photos. The box can grow by one
# pixel of the copy per side (blended edge pixels), a few full-size pixels, which the margin dwarfs.
ANALYSIS_MAX_SIDE = 512
# Below this colour distance (0..441 in RGB) from the background, the image is considered plain.
MIN_FOREGROUND_CONTRAST = 16.0
# Blobs smaller than this fraction of the largest one are specks, not parts of the garment.
MIN_BLOB_FRACTION = 0.1
BATCH = 64  # images loaded, cropped and written per round
CAM_MICRO_BATCH = 8  # on CPU, Lite0 is fastest on small batches (cache-bound): 8 x 224 px ~12 ms/image
# zlib level 3: 2x faster than the default 6 for ~10% larger files; PNG stays lossless either way.
PNG_COMPRESS_LEVEL = 3
WORKERS = max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def expand_box(box: Box, margin: float, width: int, height: int) -> Box:
    """Grow `box` by `margin` × its width (height) on the left and right (top and bottom), clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return (
        max(0, int(np.floor(x0 - dx))),
        max(0, int(np.floor(y0 - dy))),
        min(width, int(np.ceil(x1 + dx))),
        min(height, int(np.ceil(y1 + dy))),
    )


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when disjoint)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def whole_image_box(width: int, height: int) -> Box:
    return (0, 0, width, height)


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Median RGB colour (float, shape (3,)) of a frame 2% of the shorter side wide (at least 1 px) around the image."""
    h, w = rgb.shape[:2]
    band = max(1, round(0.02 * min(h, w)))
    border = np.concatenate(
        [
            rgb[:band].reshape(-1, 3),
            rgb[-band:].reshape(-1, 3),
            rgb[:, :band].reshape(-1, 3),
            rgb[:, -band:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0).astype(np.float32)


def _downscaled(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The image with its longer side at most ANALYSIS_MAX_SIDE, and the factor from full to small size."""
    h, w = rgb.shape[:2]
    scale = min(1.0, ANALYSIS_MAX_SIDE / max(h, w))
    if scale == 1.0:
        return rgb, 1.0
    small = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BOX)
    return np.asarray(small), scale


def _box_of_mask(mask: np.ndarray) -> Box | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _main_blobs(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """The mask's 8-connected blobs at least `min_fraction` of the largest one (0: largest blob only)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]
    keep = sizes >= sizes.max() * min_fraction if min_fraction > 0 else sizes == sizes.max()
    return np.isin(labels, np.flatnonzero(keep) + 1)


def _scale_box(box: Box, factor_x: float, factor_y: float, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    return (
        max(0, int(np.floor(x0 * factor_x))),
        max(0, int(np.floor(y0 * factor_y))),
        min(width, int(np.ceil(x1 * factor_x))),
        min(height, int(np.ceil(y1 * factor_y))),
    )


def crop_box_foreground(rgb: np.ndarray, threshold: float, margin: float) -> Box | None:
    """Box of the garment in an (H, W, 3) uint8 image on a plain background, or None if it is plain.

    Foreground = pixels whose RGB distance from the background colour (border median) exceeds
    `threshold` × the largest distance. A fixed fraction of the peak rather than Otsu: Otsu assumes
    two balanced modes and splits even a near-plain image or the shading inside a garment, while a
    fraction of the peak keeps faint garment edges and is one param to tune. Blobs under
    MIN_BLOB_FRACTION of the largest are dropped (specks), the rest kept (a garment can fall apart
    into pieces, e.g. two trouser legs). The box grows by `margin`.
    """
    h, w = rgb.shape[:2]
    small, scale = _downscaled(rgb)
    distance = np.linalg.norm(small.astype(np.float32) - background_colour(small), axis=2)
    peak = float(distance.max())
    if peak < MIN_FOREGROUND_CONTRAST:
        return None
    box = _box_of_mask(_main_blobs(distance > threshold * peak, MIN_BLOB_FRACTION))
    if box is None:
        return None
    box = _scale_box(box, w / small.shape[1], h / small.shape[0], w, h) if scale != 1.0 else box
    return expand_box(box, margin, w, h)


def crop_box_cam(cam: np.ndarray, width: int, height: int, threshold: float, margin: float) -> Box | None:
    """Box of a class-activation map's largest region at or above `threshold` × its max, in image pixels.

    `cam` is a 2-D map covering the whole (width × height) image at any resolution (it is
    rescaled); None when the map has no positive activation.
    """
    peak = float(cam.max())
    if not np.isfinite(peak) or peak <= 0:
        return None
    box = _box_of_mask(_main_blobs(cam >= threshold * peak, 0))
    if box is None:
        return None
    box = _scale_box(box, width / cam.shape[1], height / cam.shape[0], width, height)
    return expand_box(box, margin, width, height)


# --------------------------------------------------------------------------------------------
# Croppers: a batch of images in, one box (or None: nothing found) per image out
# --------------------------------------------------------------------------------------------


class Cropper(Protocol):
    name: str

    def boxes(self, images: list[np.ndarray]) -> list[Box | None]: ...


class WholeImageCropper:
    """Cropper `none`: the whole image."""

    name = "none"

    def boxes(self, images: list[np.ndarray]) -> list[Box | None]:
        return [whole_image_box(img.shape[1], img.shape[0]) for img in images]


@dataclass
class ForegroundCropper:
    """Cropper `foreground`: see crop_box_foreground."""

    threshold: float
    margin: float
    name: str = "foreground"

    def boxes(self, images: list[np.ndarray]) -> list[Box | None]:
        return [crop_box_foreground(img, self.threshold, self.margin) for img in images]


class CamCropper:
    """Cropper `cam`: class-activation map of ImageNet EfficientNet-Lite0 over its garment classes.

    The map is the sum of the garment classes' CAMs (fc rows × the feature map before pooling),
    weighted by their softmax among garment classes, so it follows whichever garment the
    network sees. Images are resized to input_size square and run in batches.
    """

    name = "cam"

    def __init__(self, threshold: float, margin: float, input_size: int = 224):
        import torch

        from .models import IMAGENET_GARMENT_CLASSES, imagenet_lite0

        self.threshold, self.margin, self.input_size = threshold, margin, input_size
        # BatchNorm folded into the convolutions and channels_last: each ~1.5x faster on CPU
        self.net = imagenet_lite0(fuse_batchnorm=True).to(memory_format=torch.channels_last)
        classes = torch.tensor(sorted(IMAGENET_GARMENT_CLASSES))
        self.class_weights = self.net._fc.weight.detach()[classes]  # (G, 1280)
        self.class_bias = self.net._fc.bias.detach()[classes]

    def _to_batch(self, images: list[np.ndarray]):
        import torch

        from .models import IMAGENET_MEAN, IMAGENET_STD

        size = (self.input_size, self.input_size)
        arrays = [np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR)) for img in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (batch - mean) / std

    def garment_cams(self, images: list[np.ndarray]) -> np.ndarray:
        """(B, input_size, input_size) garment CAMs (ReLU'd) of a batch of (H, W, 3) uint8 images."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            batch = self._to_batch(images).contiguous(memory_format=torch.channels_last)
            features = torch.cat(
                [self.net.feature_map(part) for part in batch.split(CAM_MICRO_BATCH)]
            )  # (B, 1280, h, w)
            class_maps = torch.einsum("gc,bchw->bghw", self.class_weights, features)  # (B, G, h, w)
            logits = class_maps.mean(dim=(2, 3)) + self.class_bias  # = the fc's logits for these classes
            weights = logits.softmax(dim=1)
            cam = torch.einsum("bg,bghw->bhw", weights, class_maps).clamp_min(0)
            cam = F.interpolate(cam[:, None], size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        return cam[:, 0].numpy()

    def boxes(self, images: list[np.ndarray]) -> list[Box | None]:
        if not images:
            return []
        cams = self.garment_cams(images)
        return [
            crop_box_cam(cam, img.shape[1], img.shape[0], self.threshold, self.margin)
            for cam, img in zip(cams, images)
        ]


def make_cropper(params: PreprocessParams) -> Cropper:
    """The cropper params.cropper names; `cam` loads EfficientNet-Lite0's ImageNet weights."""
    if params.cropper == "none":
        return WholeImageCropper()
    if params.cropper == "foreground":
        return ForegroundCropper(params.foreground_threshold, params.margin)
    if params.cropper == "cam":
        return CamCropper(params.cam_threshold, params.margin, params.cam_input_size)
    raise ConfigError(f"preprocess.cropper = {params.cropper!r}; choose from none, foreground, cam")


# --------------------------------------------------------------------------------------------
# Square output
# --------------------------------------------------------------------------------------------


def fit_square(img: Image.Image, size: int, fit: str) -> Image.Image:
    """A size × size RGB copy of `img`.

    letterbox: scaled so the whole image fits, centred, padded with the image's border colour
    (median of its edge pixels), so the padding continues the background instead of adding a
    hard-edged frame. center: scaled so the shorter side fits, the middle cut out (edges lost).
    """
    w, h = img.size
    if fit == "letterbox":
        scale = size / max(w, h)
    elif fit == "center":
        scale = size / min(w, h)
    else:
        raise ConfigError(f"preprocess.fit = {fit!r}; use 'letterbox' or 'center'")
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    if fit == "center":
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return resized.crop((left, top, left + size, top + size))
    fill = tuple(int(round(v)) for v in background_colour(np.asarray(img.convert("RGB"))))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def crop_and_fit(img: Image.Image, params: PreprocessParams, cropper: Cropper) -> Image.Image:
    """One RGB image cropped to its garment (whole image if none found) and fitted to params.size px."""
    rgb = np.asarray(img.convert("RGB"))
    box = cropper.boxes([rgb])[0] or whole_image_box(img.width, img.height)
    return fit_square(img.crop(box), params.size, params.fit)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    source: Path
    target: Path
    image: Image.Image | None = None
    error: str | None = None


def _plan_jobs(raw: Path, out: Path) -> tuple[list[_Job], list[dict[str, str]]]:
    """One job per image in raw/<class>/, and the files left out with the reason."""
    classes = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"'{raw}' has no class folders; put images under {raw}/<class>/ or run `transfer-study data fetch`")
    jobs, excluded = [], []
    for folder in classes:
        targets_seen: dict[Path, Path] = {}
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                excluded.append({"path": str(path), "reason": "not a JPEG, PNG or WebP file"})
                continue
            target = out / folder.name / f"{path.stem}.png"
            if target in targets_seen:
                excluded.append({"path": str(path), "reason": f"same name as '{targets_seen[target]}'; rename one"})
                continue
            targets_seen[target] = path
            jobs.append(_Job(path, target))
    return jobs, excluded


def _load(job: _Job) -> _Job:
    from .data import open_rgb

    try:
        job.image = open_rgb(job.source)
    except UserError as exc:
        job.error = str(exc)
    except OSError as exc:  # permissions, a file removed meanwhile: the file's problem, not the run's
        job.error = f"cannot read '{job.source}' ({exc})"
    return job


def _write(job: _Job, box: Box, params: PreprocessParams) -> None:
    """Crop, fit and save one image; written to a hidden temp name first so a crash leaves no half PNG."""
    fitted = fit_square(job.image.crop(box), params.size, params.fit)
    job.target.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.target.with_name(f".{job.target.name}.tmp")
    fitted.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    os.replace(tmp, job.target)
    job.image = None  # free memory


def _crop_chunk(
    jobs: list[_Job],
    cropper: Cropper,
    params: PreprocessParams,
    pool: ThreadPoolExecutor,
    excluded: list[dict[str, str]],
    fallbacks: list[str],
) -> list[_Job]:
    """Load, crop and write a few images (loading and writing in the pool, boxes in one batch).

    Appends unreadable files to `excluded` and whole-image fallbacks to `fallbacks`; returns the jobs written.
    """
    loaded = list(pool.map(_load, jobs))
    excluded += [{"path": str(j.source), "reason": j.error} for j in loaded if j.error]
    readable = [j for j in loaded if j.image is not None]
    boxes = cropper.boxes([np.asarray(j.image) for j in readable])
    fallbacks += [str(j.source) for j, box in zip(readable, boxes) if box is None]
    full_or_box = [box or whole_image_box(*j.image.size) for j, box in zip(readable, boxes)]
    list(pool.map(_write, readable, full_or_box, [params] * len(readable)))
    return readable


def preprocess_dataset(raw: Path, out: Path, params: PreprocessParams) -> dict:
    """Crop raw/<class>/* (JPEG/PNG/WebP) and write out/<class>/<stem>.png, RGB, params.size px square.

    Unreadable files are listed, not fatal; images where the cropper found nothing keep the whole
    image and are counted. Returns the summary (also printed): cropper, counts per class, files
    excluded with reasons, whole-image fallbacks, seconds. Raises UserError if raw is missing or
    no image could be written.
    """
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise UserError(f"raw images folder '{raw}' not found; run `transfer-study data fetch` or set paths.raw")
    start = time.perf_counter()
    jobs, excluded = _plan_jobs(raw, out)
    cropper = make_cropper(params)
    out.mkdir(parents=True, exist_ok=True)  # DVC removes its outs before the stage; nothing to clear here
    written: dict[str, int] = {}
    fallbacks: list[str] = []
    with ThreadPoolExecutor(WORKERS) as pool:
        for first in range(0, len(jobs), BATCH):
            done = _crop_chunk(jobs[first : first + BATCH], cropper, params, pool, excluded, fallbacks)
            for job in done:
                written[job.target.parent.name] = written.get(job.target.parent.name, 0) + 1
    summary = {
        "cropper": cropper.name,
        "fit": params.fit,
        "size": params.size,
        "written": sum(written.values()),
        "per_class": dict(sorted(written.items())),
        "excluded": excluded,
        "whole_image_fallbacks": len(fallbacks),
        "fallback_files": fallbacks,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(describe_summary(summary, out))
    if summary["written"] == 0:
        raise UserError(f"no image in '{raw}' could be preprocessed; see the excluded files above")
    write_crop_record(out, params, summary)
    return summary


def write_crop_record(out: Path, params: PreprocessParams, summary: dict) -> None:
    """`<out>/preprocess.json`: the settings the crops were made with (the one source of truth that
    training, the logged params and the served model take their preprocessing from) and the summary."""
    record = {"preprocess": dataclasses.asdict(params), "summary": summary}
    tmp = out / f".{CROP_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / CROP_RECORD)


def read_crop_record(cropped: Path) -> PreprocessParams:
    """The settings the crops in `cropped` were made with; UserError when there is no readable record."""
    path = Path(cropped) / CROP_RECORD
    try:
        return PreprocessParams(**json.loads(path.read_text())["preprocess"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"'{path}' does not say how the crops in '{cropped}' were made ({exc.__class__.__name__}); "
                        "rebuild them with `dvc repro preprocess`") from None


def check_crops_match(cropped: Path, wanted: PreprocessParams) -> PreprocessParams:
    """The crops' recorded settings, if they are the ones `wanted` (a profile's preprocess section);
    else UserError naming each difference and what to rerun, so no model trains, and no served
    model crops, differently from what it was trained on."""
    made = read_crop_record(cropped)
    differences = [f"{f.name}: crops {getattr(made, f.name)!r}, profile {getattr(wanted, f.name)!r}"
                   for f in dataclasses.fields(PreprocessParams) if getattr(made, f.name) != getattr(wanted, f.name)]
    if differences:
        raise UserError(f"the crops in '{cropped}' were made with other preprocess settings than this profile's "
                        f"({'; '.join(differences)}); make the profile's preprocess section match the one the "
                        "crops were built with, or rebuild the crops with this profile's settings "
                        "(`dvc repro preprocess split` after editing params.yaml's preprocess section)")
    return made


def describe_summary(summary: dict, out: Path) -> str:
    """The summary as a few human-readable lines."""
    lines = [
        f"preprocess: wrote {summary['written']} images to '{out}' (cropper {summary['cropper']}, "
        f"{summary['fit']} {summary['size']} px) in {summary['seconds']} s; per class: "
        + (", ".join(f"{k} {v}" for k, v in summary["per_class"].items()) or "none")
    ]
    if summary["whole_image_fallbacks"]:
        shown = ", ".join(summary["fallback_files"][:10])
        more = " ..." if summary["whole_image_fallbacks"] > 10 else ""
        lines.append(
            f"  no garment found, whole image kept: {summary['whole_image_fallbacks']} images ({shown}{more})"
        )
    if summary["excluded"]:
        lines.append(f"  excluded (not written) {len(summary['excluded'])} file(s):")
        # open_rgb's messages already name the file
        lines += [f"    {e['reason'] if e['path'] in e['reason'] else e['path'] + ': ' + e['reason']}"
                  for e in summary["excluded"]]
    return "\n".join(lines)
