"""Stage `preprocess`: crop every raw image to its object and store it as a square RGB PNG.

Croppers (params.preprocess.cropper):
- `none`: the whole image (where the whole photo is the object: portraits, buildings, flowers).
- `foreground`: pixels far from the background colour (median of the border), bounding box of
  the main blobs. Fast; right for product shots on plain backgrounds.
- `cam`: class-activation map of ImageNet EfficientNet-Lite0 for its target classes, bounding
  box of its largest hot region. Coarse (a 7x7 map).
- `proposals`: for photos with clutter. Region proposals (selective search over felzenszwalb
  segments), ranked by how object-like they are, the best few classified by Lite0; the region
  with the best combined score is the object. Plain-background images take `foreground`'s box.
The target of `cam` and `proposals` is preprocess.targets: ImageNet classes (by default the
garments), or `objectness`: whichever region Lite0 is surest is some ImageNet object.

A cropper that finds nothing, or is unsure, keeps the whole image; the summary counts and lists
those files, and warns, with the fix, when that is a large share (the cropper looks for something
the photos do not show). The stage also draws a preview grid of sample crops with their boxes.
Boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive, as PIL's `Image.crop` takes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .config import CROPPERS, ConfigError, PreprocessParams, UserError
from .regions import Regions, region_proposals

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
# An image whose border pixels are this close (RGB distance) to their median colour, at least this
# share of them, has a plain background: `proposals` then takes `foreground`'s box.
PLAIN_BORDER_TOLERANCE = 24.0
PLAIN_BORDER_SHARE = 0.9
# `proposals`: segmentation size, which regions are candidates, how many the network classifies
PROPOSAL_SIDE = 192  # px, longer side of the copy that is segmented
PROPOSAL_MIN_AREA, PROPOSAL_MAX_AREA = 0.01, 0.8  # region area / image area
PROPOSALS_CLASSIFIED = 6  # per image; on the tuning photos 96% have a region at IoU >= 0.5 among them (8: no better)
DUPLICATE_IOU = 0.7  # a region whose box overlaps a better-ranked one's this much is not classified
PROPOSAL_CROP_SIZE = 224  # px, Lite0's input per crop, cut from the full image (192: 0.01 lower IoU, 1.36x less compute)
# Weights of the ranking (see proposal_prior), the network's log-probability weighing 1
PRIOR_FILL, PRIOR_EDGE, PRIOR_COLOUR_STD, PRIOR_CONTRAST, PRIOR_GRADIENT = 2.0, 7.0, 3.0, 2.0, 2.0
# Unsure below this P(target classes) of the chosen crop; those images keep the whole image and are
# counted. Set where the low-probability tail was mostly wrong boxes: on the tuning photos (garment
# targets) it flags ~2-3%, and all of those boxes had IoU < 0.5.
MIN_TARGET_PROBABILITY = 0.01
# In objectness mode: unsure below this top-class probability of the chosen crop (no ImageNet
# object stands out in any proposal).
MIN_OBJECTNESS = 0.05
# The preprocess summary warns when at least this share of the images kept the whole image (and at
# least FEW_FOUND_MIN_IMAGES of them): the cropper looks for something these photos do not show.
FEW_FOUND_SHARE = 0.2
FEW_FOUND_MIN_IMAGES = 3
# zlib level 3: 2x faster than the default 6 for ~10% larger files; PNG stays lossless either way.
PNG_COMPRESS_LEVEL = 3
WORKERS = max(1, min(4, os.cpu_count() or 1))
PREVIEW_COUNT, PREVIEW_COLUMNS, PREVIEW_TILE = 16, 4, 160  # images in the crop preview, grid columns, px per tile


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


def _border_pixels(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) pixels of a frame 2% of the shorter side wide (at least 1 px) around the image."""
    h, w = rgb.shape[:2]
    band = max(1, round(0.02 * min(h, w)))
    return np.concatenate(
        [
            rgb[:band].reshape(-1, 3),
            rgb[-band:].reshape(-1, 3),
            rgb[:, :band].reshape(-1, 3),
            rgb[:, -band:].reshape(-1, 3),
        ]
    )


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Median RGB colour (float, shape (3,)) of the image's border frame (_border_pixels)."""
    return np.median(_border_pixels(rgb), axis=0).astype(np.float32)


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


def imagenet_categories() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names, in index order, as torchvision lists them (no download)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def target_classes(targets: tuple[str, ...]) -> tuple[int, ...] | None:
    """The ImageNet class indices that preprocess.targets names (groups expanded), sorted; None for
    [objectness]. ConfigError with the closest names for a name that is neither a group nor an
    ImageNet class (torchvision's names, which are unique)."""
    import difflib

    from .config import OBJECTNESS, TARGET_GROUPS
    from .models import IMAGENET_GARMENT_CLASSES

    if tuple(targets) == (OBJECTNESS,):
        return None
    groups = dict(zip(TARGET_GROUPS, (tuple(IMAGENET_GARMENT_CLASSES),)))
    names = imagenet_categories()
    chosen: set[int] = set()
    for target in targets:
        if target in groups:
            chosen.update(groups[target])
            continue
        if target not in names:
            close = difflib.get_close_matches(target, [*groups, OBJECTNESS, *names], n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ConfigError(f"preprocess.targets: {target!r} is not an ImageNet class or a group; {hint}"
                              f"use {', '.join(TARGET_GROUPS)}, [{OBJECTNESS}], or ImageNet class names "
                              "(`transfer-study imagenet-classes WORD` lists those with WORD in them)")
        chosen.add(names.index(target))
    return tuple(sorted(chosen))


def describe_targets(targets: tuple[str, ...]) -> str:
    """preprocess.targets in words: 'garments', 'daisy, church', 'any object (objectness)'."""
    from .config import OBJECTNESS

    return "any object (objectness)" if tuple(targets) == (OBJECTNESS,) else ", ".join(targets)


def _target_lite0(targets: tuple[str, ...]):
    """ImageNet EfficientNet-Lite0 for inference, and the index tensor of the target classes (None: objectness)."""
    import torch

    from .models import imagenet_lite0

    classes = target_classes(targets)  # a misspelt class fails before the network loads
    # BatchNorm folded into the convolutions and channels_last: each ~1.5x faster on CPU
    net = imagenet_lite0(fuse_batchnorm=True).to(memory_format=torch.channels_last)
    return net, None if classes is None else torch.tensor(classes)


def _lite0_batch(images: list[np.ndarray], size: int):
    """(B, 3, size, size) normalised channels_last tensor of (H, W, 3) uint8 images, each resized to a square."""
    import torch

    from .models import IMAGENET_MEAN, IMAGENET_STD

    arrays = [np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


class CamCropper:
    """Cropper `cam`: class-activation map of ImageNet EfficientNet-Lite0 over its target classes
    (by default the garments).

    The map is the sum of the target classes' CAMs (fc rows × the feature map before pooling),
    weighted by their softmax among those classes, so it follows whichever target the
    network sees. Images are resized to input_size square and run in batches.
    """

    name = "cam"

    def __init__(self, threshold: float, margin: float, input_size: int = 224, targets: tuple[str, ...] = ("garments",)):
        self.threshold, self.margin, self.input_size = threshold, margin, input_size
        self.net, classes = _target_lite0(targets)
        if classes is None:
            raise ConfigError("preprocess.targets = [objectness] needs cropper proposals; name the classes for cam")
        self.class_weights = self.net._fc.weight.detach()[classes]  # (G, 1280)
        self.class_bias = self.net._fc.bias.detach()[classes]

    def garment_cams(self, images: list[np.ndarray]) -> np.ndarray:
        """(B, input_size, input_size) garment CAMs (ReLU'd) of a batch of (H, W, 3) uint8 images."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            batch = _lite0_batch(images, self.input_size)
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


def has_plain_background(rgb: np.ndarray) -> bool:
    """True when nearly all the border (PLAIN_BORDER_SHARE of its pixels) is within PLAIN_BORDER_TOLERANCE of its median colour."""
    border = _border_pixels(_downscaled(rgb)[0]).astype(np.float32)
    distance = np.linalg.norm(border - np.median(border, axis=0), axis=1)
    return float((distance <= PLAIN_BORDER_TOLERANCE).mean()) >= PLAIN_BORDER_SHARE


def _resized_longer_side(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BOX if scale < 1 else Image.BILINEAR))


def proposal_prior(regions: Regions) -> np.ndarray:
    """How object-like each region is, before the network looks (higher: more likely the garment).

    Favours larger regions that fill their box, stay off the image's edge, are of one colour and
    smooth inside, and stand out from their surroundings. The weights were chosen on pasted-garment
    photos (bench/crop_quality.py with seeds 1-3: a logistic regression, then a coarse grid) and
    rounded; colour, gradient and RGB distances are in units of 50 (0..255 scale).
    """
    image_area = regions.area[-1]  # the hierarchy's last region is the whole image
    return (
        np.log(regions.area / image_area)
        + PRIOR_FILL * regions.fill
        - PRIOR_EDGE * regions.border_share
        - PRIOR_COLOUR_STD * regions.colour_std / 50
        + PRIOR_CONTRAST * regions.contrast / 50
        - PRIOR_GRADIENT * regions.gradient / 50
    )


def distinct_best(boxes: np.ndarray, score: np.ndarray, count: int, max_iou: float) -> np.ndarray:
    """Indices of up to `count` boxes with finite score, best first, skipping any whose IoU with
    one already taken exceeds max_iou (nested regions of the hierarchy often share one box)."""
    taken: list[int] = []
    for i in np.argsort(-score):
        if len(taken) == count or not np.isfinite(score[i]):
            break
        if all(box_iou(tuple(boxes[i]), tuple(boxes[j])) <= max_iou for j in taken):
            taken.append(int(i))
    return np.array(taken, dtype=np.int64)


class ProposalCropper:
    """Cropper `proposals`: the region proposal that best combines object-likeness and Lite0's
    score for the targets (preprocess.targets).

    Per image: plain background -> `foreground`'s box. Otherwise, on a copy PROPOSAL_SIDE px long,
    the selective-search regions (regions.py) of 1-80% of the image are ranked by proposal_prior;
    the best PROPOSALS_CLASSIFIED with distinct boxes are cropped from the full image and
    classified by ImageNet EfficientNet-Lite0, and the region maximising
    prior + log P(target classes | crop) wins; in objectness mode, prior + log of the crop's top
    class probability (whatever the class).
    Unsure (that probability below MIN_TARGET_PROBABILITY, or MIN_OBJECTNESS): None, the whole
    image is kept.
    """

    name = "proposals"

    def __init__(self, foreground_threshold: float, margin: float, targets: tuple[str, ...] = ("garments",)):
        self.foreground_threshold, self.margin = foreground_threshold, margin
        self.net, self.target_classes = _target_lite0(targets)
        self.min_probability = MIN_OBJECTNESS if self.target_classes is None else MIN_TARGET_PROBABILITY

    def target_probability(self, crops: list[np.ndarray]) -> np.ndarray:
        """P(any target class) of each (H, W, 3) uint8 crop, classified at PROPOSAL_CROP_SIZE px; in
        objectness mode, the top class's probability."""
        import torch

        with torch.inference_mode():
            batch = _lite0_batch(crops, PROPOSAL_CROP_SIZE)
            probs = torch.cat([self.net(part) for part in batch.split(CAM_MICRO_BATCH)]).softmax(dim=1)
            if self.target_classes is None:
                return probs.max(dim=1).values.numpy()
            return probs[:, self.target_classes].sum(dim=1).numpy()

    def _candidates(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The analysis copy, and the boxes and priors of its best-ranked proposals (best first)."""
        small = _resized_longer_side(rgb, PROPOSAL_SIDE)
        regions = region_proposals(small)
        share = regions.area / float(small.shape[0] * small.shape[1])
        prior = np.where((share >= PROPOSAL_MIN_AREA) & (share <= PROPOSAL_MAX_AREA), proposal_prior(regions), -np.inf)
        best = distinct_best(regions.boxes, prior, PROPOSALS_CLASSIFIED, DUPLICATE_IOU)
        return small, regions.boxes[best], prior[best]

    def boxes(self, images: list[np.ndarray]) -> list[Box | None]:
        found: list[Box | None] = [None] * len(images)
        pending = []  # (image index, analysis copy, boxes, priors)
        for i, rgb in enumerate(images):
            if has_plain_background(rgb):
                found[i] = crop_box_foreground(rgb, self.foreground_threshold, self.margin)
            else:
                small, boxes, prior = self._candidates(rgb)
                if len(boxes):
                    pending.append((i, small, boxes, prior))
        # crops from the full image: the network sees the object sharper than in the small copy
        crops = [images[i][y0:y1, x0:x1] for i, small, boxes, _ in pending
                 for x0, y0, x1, y1 in self._full_size(boxes, small, images[i])]
        probability = self.target_probability(crops) if crops else np.zeros(0)
        first = 0
        for i, small, boxes, prior in pending:
            p = probability[first : first + len(boxes)]
            first += len(boxes)
            best = int(np.argmax(prior + np.log(p + 1e-6)))
            if p[best] < self.min_probability:
                continue  # unsure: the whole image is kept, and counted
            h, w = images[i].shape[:2]
            found[i] = expand_box(self._full_size(boxes[best : best + 1], small, images[i])[0], self.margin, w, h)
        return found

    @staticmethod
    def _full_size(boxes: np.ndarray, small: np.ndarray, rgb: np.ndarray) -> list[Box]:
        h, w = rgb.shape[:2]
        return [_scale_box(tuple(b), w / small.shape[1], h / small.shape[0], w, h) for b in boxes]


def make_cropper(params: PreprocessParams) -> Cropper:
    """The cropper params.cropper names; `cam` and `proposals` load EfficientNet-Lite0's ImageNet weights."""
    if params.cropper == "none":
        return WholeImageCropper()
    if params.cropper == "foreground":
        return ForegroundCropper(params.foreground_threshold, params.margin)
    if params.cropper == "cam":
        return CamCropper(params.cam_threshold, params.margin, params.cam_input_size, params.targets)
    if params.cropper == "proposals":
        return ProposalCropper(params.foreground_threshold, params.margin, params.targets)
    raise ConfigError(f"preprocess.cropper = {params.cropper!r}; choose from {', '.join(CROPPERS)}")


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
    """One RGB image cropped to its object (whole image if none found) and fitted to params.size px."""
    rgb = np.asarray(img.convert("RGB"))
    box = cropper.boxes([rgb])[0] or whole_image_box(img.width, img.height)
    return fit_square(img.crop(box), params.size, params.fit)


# --------------------------------------------------------------------------------------------
# Preview: sample images with their crop boxes drawn
# --------------------------------------------------------------------------------------------


def preview_picks(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(count) (all of them if fewer)."""
    if count <= wanted:
        return list(range(count))
    return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)] if wanted > 1 else [0]


def preview_tile(img: Image.Image, box: Box | None) -> Image.Image:
    """A PREVIEW_TILE px square thumbnail of `img` with its crop box drawn (green), or, when the
    cropper kept the whole image, a red frame and the word 'whole'."""
    rgb = img.convert("RGB")
    scale = PREVIEW_TILE / max(rgb.size)
    thumb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    tile = Image.new("RGB", (PREVIEW_TILE, PREVIEW_TILE), (40, 40, 40))
    left, top = (PREVIEW_TILE - thumb.width) // 2, (PREVIEW_TILE - thumb.height) // 2
    tile.paste(thumb, (left, top))
    draw = ImageDraw.Draw(tile)
    if box is None:
        draw.rectangle((0, 0, PREVIEW_TILE - 1, PREVIEW_TILE - 1), outline=(230, 40, 40), width=3)
        draw.text((6, 4), "whole", fill=(230, 40, 40))
    else:
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        draw.rectangle((left + x0, top + y0, left + x1 - 1, top + y1 - 1), outline=(40, 230, 40), width=2)
    return tile


def write_preview(tiles: list[Image.Image], path: Path) -> None:
    """The tiles in a grid of PREVIEW_COLUMNS columns, as a PNG at `path`."""
    columns = min(PREVIEW_COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * PREVIEW_TILE, rows * PREVIEW_TILE), (0, 0, 0))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * PREVIEW_TILE, (i // columns) * PREVIEW_TILE))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")


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


@dataclass
class _Tally:
    """What the stage collects while it runs: files left out, whole-image fallbacks, preview tiles."""

    excluded: list[dict[str, str]]
    fallbacks: list[str] = field(default_factory=list)
    preview_sources: set[Path] = field(default_factory=set)  # the images drawn in the preview
    tiles: list[Image.Image] = field(default_factory=list)
    preview_owed: int = 0  # picked images that could not be read: the next readable ones stand in

    def take_for_preview(self, loaded: list[_Job]) -> list[bool]:
        """Which of a chunk's jobs the preview draws: the picked ones, an unreadable pick passing its
        place to the next readable image, so the preview has PREVIEW_COUNT tiles whenever the data does."""
        taken = []
        for job in loaded:
            picked = job.source in self.preview_sources
            if job.image is None:
                self.preview_owed += picked
                taken.append(False)
            elif not picked and self.preview_owed:
                self.preview_owed -= 1
                taken.append(True)
            else:
                taken.append(picked)
        return taken


def _crop_chunk(
    jobs: list[_Job], cropper: Cropper, params: PreprocessParams, pool: ThreadPoolExecutor, tally: _Tally
) -> list[_Job]:
    """Load, crop and write a few images (loading and writing in the pool, boxes in one batch).

    Adds unreadable files, whole-image fallbacks and preview tiles to `tally`; returns the jobs written.
    """
    loaded = list(pool.map(_load, jobs))
    tally.excluded += [{"path": str(j.source), "reason": j.error} for j in loaded if j.error]
    in_preview = {j.source for j, taken in zip(loaded, tally.take_for_preview(loaded)) if taken}
    readable = [j for j in loaded if j.image is not None]
    boxes = cropper.boxes([np.asarray(j.image) for j in readable])
    tally.fallbacks += [str(j.source) for j, box in zip(readable, boxes) if box is None]
    tally.tiles += [preview_tile(j.image, box) for j, box in zip(readable, boxes) if j.source in in_preview]
    full_or_box = [box or whole_image_box(*j.image.size) for j, box in zip(readable, boxes)]
    list(pool.map(_write, readable, full_or_box, [params] * len(readable)))
    return readable


def preprocess_dataset(raw: Path, out: Path, params: PreprocessParams, preview: Path | None = None) -> dict:
    """Crop raw/<class>/* (JPEG/PNG/WebP) and write out/<class>/<stem>.png, RGB, params.size px square.

    Unreadable files are listed, not fatal; images where the cropper found nothing (or was unsure)
    keep the whole image and are counted. Also writes `preview` (default: crop_preview.png beside
    `out`), a grid of PREVIEW_COUNT sample images with their crop boxes. Returns the summary (also
    printed): cropper, counts per class, files excluded with reasons, whole-image fallbacks, the
    preview's path, seconds. Raises UserError if raw is missing or no image could be written.
    """
    raw, out = Path(raw), Path(out)
    preview = Path(preview) if preview else out.parent / "crop_preview.png"
    if not raw.is_dir():
        raise UserError(f"raw images folder '{raw}' not found; run `transfer-study data fetch` or set paths.raw")
    start = time.perf_counter()
    jobs, excluded = _plan_jobs(raw, out)
    cropper = make_cropper(params)
    out.mkdir(parents=True, exist_ok=True)  # DVC removes its outs before the stage; nothing to clear here
    written: dict[str, int] = {}
    tally = _Tally(excluded, preview_sources={jobs[i].source for i in preview_picks(len(jobs), PREVIEW_COUNT)})
    with ThreadPoolExecutor(WORKERS) as pool:
        for first in range(0, len(jobs), BATCH):
            for job in _crop_chunk(jobs[first : first + BATCH], cropper, params, pool, tally):
                written[job.target.parent.name] = written.get(job.target.parent.name, 0) + 1
    if tally.tiles:
        write_preview(tally.tiles, preview)
    summary = {
        "cropper": cropper.name,
        "fit": params.fit,
        "size": params.size,
        "written": sum(written.values()),
        "per_class": dict(sorted(written.items())),
        "excluded": tally.excluded,
        "whole_image_fallbacks": len(tally.fallbacks),
        "fallback_files": tally.fallbacks,
        "preview": str(preview) if tally.tiles else None,
        "seconds": round(time.perf_counter() - start, 2),
    }
    summary["warnings"] = few_found_warnings(summary, params)
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


def few_found_warnings(summary: dict, params: PreprocessParams) -> list[str]:
    """A warning, with the fix, when the cropper kept the whole image of a large share of the photos
    (FEW_FOUND_SHARE): it looks for something these photos do not show; [] otherwise."""
    kept, total = summary["whole_image_fallbacks"], summary["written"]
    if params.cropper == "none" or kept < FEW_FOUND_MIN_IMAGES or kept < FEW_FOUND_SHARE * total:
        return []
    if params.cropper == "foreground":
        looks_for = "an object on a plain background"
        fix = "for photos with clutter use `proposals`"
    else:
        looks_for = describe_targets(params.targets) + " (preprocess.targets)"
        fix = ("for other objects set preprocess.targets (ImageNet class names, or [objectness] for any "
               "object)")
    return [f"{kept} of {total} images kept whole: cropper {params.cropper} looks for {looks_for} and did not "
            f"find it there; where the whole photo is the object use preprocess.cropper: none, {fix}; set the "
            f"same preprocess section in params.yaml and params.quick.yaml; look at {summary.get('preview') or 'the crop preview'}"]


def read_crop_record(cropped: Path) -> PreprocessParams:
    """The settings the crops in `cropped` were made with; UserError when there is no readable record."""
    from .config import preprocess_params

    path = Path(cropped) / CROP_RECORD
    try:
        return preprocess_params(json.loads(path.read_text())["preprocess"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
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
            f"  target not found or cropper unsure, whole image kept: {summary['whole_image_fallbacks']} images "
            f"({shown}{more})"
        )
    lines += [f"WARNING: {warning}" for warning in summary.get("warnings", [])]
    if summary.get("preview"):
        lines.append(f"  preview of the crops: {summary['preview']}")
    if summary["excluded"]:
        lines.append(f"  excluded (not written) {len(summary['excluded'])} file(s):")
        # open_rgb's messages already name the file
        lines += [f"    {e['reason'] if e['path'] in e['reason'] else e['path'] + ': ' + e['reason']}"
                  for e in summary["excluded"]]
    return "\n".join(lines)
