"""Region proposals for the `proposals` cropper: selective search over felzenszwalb segments.

Selective search (Uijlings et al., 2013): over-segment the image (Felzenszwalb-Huttenlocher),
then merge the two most similar neighbouring regions (colour histograms, size, how well they fill
their joint box) until one is left. Every region on the way is a proposal: some region of the
hierarchy nearly always outlines the garment (on the pasted-garment photos of bench/crop_quality.py
the best one has mean IoU 0.86 with the true box). Which one is the cropper's job.

Pure functions on (H, W, 3) uint8 arrays; boxes are (x0, y0, x1, y1), x1/y1 exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SEGMENT_SCALE = 100  # felzenszwalb's scale: larger gives fewer, larger starting segments
SEGMENT_SIGMA = 0.8  # its pre-smoothing, the paper's value
SEGMENT_MIN_SIZE = 20  # pixels
COLOUR_BINS = 16  # per channel, for the colour similarity


@dataclass(frozen=True)
class Regions:
    """Every region of the hierarchy, starting segments first, then one per merge; arrays of length R."""

    boxes: np.ndarray  # (R, 4) int: bounding boxes
    area: np.ndarray  # pixels in the region
    border_share: np.ndarray  # share of the region's outline that lies on the image's edge
    colour_std: np.ndarray  # mean over R, G, B of the standard deviation inside the region
    contrast: np.ndarray  # mean RGB distance across the region's outline (the image's edge left out)
    gradient: np.ndarray  # mean RGB gradient magnitude inside the region

    @property
    def fill(self) -> np.ndarray:
        """Share of its box the region covers."""
        b = self.boxes
        return self.area / ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))


@dataclass
class _Segments:
    """Additive statistics of the regions (grown as regions merge), and their shared outlines."""

    area: list[float]
    hist: list[np.ndarray]  # normalised colour histogram, 3 * COLOUR_BINS
    moments: list[np.ndarray]  # sum of R, G, B, of their squares and of the gradient magnitude
    box: list[tuple[int, int, int, int]]
    edge_pixels: list[float]  # outline pixels on the image's edge
    outline: list[np.ndarray]  # [length (edge pixels included), summed RGB distance across it] when the region was made
    shared: dict[tuple[int, int], np.ndarray]  # (a, b), a < b: [length, summed RGB distance] of their common outline


def _starting_segments(rgb: np.ndarray, labels: np.ndarray) -> _Segments:
    n = int(labels.max()) + 1
    flat = labels.ravel()
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    area = np.bincount(flat, minlength=n).astype(np.float64)
    bins = (rgb.reshape(-1, 3) // (256 // COLOUR_BINS)).astype(np.int64)
    hist = np.concatenate(
        [np.bincount(flat * COLOUR_BINS + bins[:, c], minlength=n * COLOUR_BINS).reshape(n, COLOUR_BINS)
         for c in range(3)], axis=1) / area[:, None] / 3
    gy, gx = np.gradient(rgb.astype(np.float64), axis=(0, 1))
    gradient = np.sqrt((gx**2 + gy**2).sum(axis=2)).ravel()
    moments = np.stack([np.bincount(flat, v, minlength=n) for v in (*pixels.T, *(pixels**2).T, gradient)], axis=1)
    boxes = [(o[1].start, o[0].start, o[1].stop, o[0].stop) for o in ndimage.find_objects(labels + 1)]
    edge = sum(np.bincount(side, minlength=n) for side in (labels[0], labels[-1], labels[:, 0], labels[:, -1]))
    shared: dict[tuple[int, int], np.ndarray] = {}
    image = rgb.astype(np.float64)
    for a, b, step in ((labels[:, :-1], labels[:, 1:], np.diff(image, axis=1)), (labels[:-1], labels[1:], np.diff(image, axis=0))):
        differ = a != b
        pairs = np.minimum(a[differ], b[differ]).astype(np.int64) * n + np.maximum(a[differ], b[differ])
        keys, inverse = np.unique(pairs, return_inverse=True)
        counts = np.bincount(inverse)
        distance = np.bincount(inverse, np.linalg.norm(step[differ], axis=1))
        for key, count, dist in zip(keys.tolist(), counts, distance):
            pair = (key // n, key % n)
            shared[pair] = shared.get(pair, 0.0) + np.array([count, dist])
    outline = np.stack([edge.astype(np.float64), np.zeros(n)], axis=1)
    for (a, b), stats in shared.items():
        outline[a] += stats
        outline[b] += stats
    return _Segments(area.tolist(), list(hist), list(moments), boxes, edge.tolist(), list(outline), shared)


def _union_box(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _similarity(s: _Segments, a: int, b: int, image_area: float) -> float:
    """Selective search's colour + size + fill similarity, each in 0..1."""
    x0, y0, x1, y1 = _union_box(s.box[a], s.box[b])
    joint = s.area[a] + s.area[b]
    colour = float(np.minimum(s.hist[a], s.hist[b]).sum())
    return colour + (1 - joint / image_area) + (1 - ((x1 - x0) * (y1 - y0) - joint) / image_area)


def _merge(s: _Segments, a: int, b: int, neighbours: dict[int, set[int]]) -> int:
    """Append the union of regions a and b, move their neighbours to it; returns its index."""
    c = len(s.area)
    s.area.append(s.area[a] + s.area[b])
    s.hist.append((s.hist[a] * s.area[a] + s.hist[b] * s.area[b]) / s.area[c])
    s.moments.append(s.moments[a] + s.moments[b])
    s.box.append(_union_box(s.box[a], s.box[b]))
    s.edge_pixels.append(s.edge_pixels[a] + s.edge_pixels[b])
    neighbours[c] = set()
    s.shared.pop((min(a, b), max(a, b)), None)
    for old in (a, b):
        for m in neighbours.pop(old):
            if m in (a, b):
                continue
            stats = s.shared.pop((min(old, m), max(old, m)))
            s.shared[(m, c)] = s.shared.get((m, c), 0.0) + stats
            neighbours[m].discard(old)
            neighbours[m].add(c)
            neighbours[c].add(m)
    s.outline.append(np.array([s.edge_pixels[c], 0.0]) + sum((s.shared[(m, c)] for m in neighbours[c]), np.zeros(2)))
    return c


def region_proposals(rgb: np.ndarray) -> Regions:
    """Every region of the selective-search hierarchy of an (H, W, 3) uint8 image (segment it small: ~200 px)."""
    from skimage.segmentation import felzenszwalb

    labels = felzenszwalb(rgb, scale=SEGMENT_SCALE, sigma=SEGMENT_SIGMA, min_size=SEGMENT_MIN_SIZE)
    s = _starting_segments(rgb, labels)
    image_area = float(labels.size)
    neighbours: dict[int, set[int]] = {i: set() for i in range(len(s.area))}
    for a, b in s.shared:
        neighbours[a].add(b)
        neighbours[b].add(a)
    similarity = {pair: _similarity(s, *pair, image_area) for pair in s.shared}
    while similarity:
        a, b = max(similarity, key=similarity.get)
        for pair in [p for p in similarity if a in p or b in p]:
            del similarity[pair]
        c = _merge(s, a, b, neighbours)
        for m in neighbours[c]:
            similarity[(m, c)] = _similarity(s, m, c, image_area)
    area = np.array(s.area)
    moments = np.array(s.moments) / area[:, None]
    colour_std = np.sqrt(np.maximum(moments[:, 3:6] - moments[:, :3] ** 2, 0)).mean(axis=1)
    outline = np.array(s.outline)
    edge = np.array(s.edge_pixels)
    contrast = outline[:, 1] / np.maximum(outline[:, 0] - edge, 1)
    return Regions(np.array(s.box, dtype=np.int64), area, edge / np.maximum(outline[:, 0], 1), colour_std,
                   contrast, moments[:, 6])
