"""regions.py: the selective-search hierarchy and the statistics the `proposals` cropper ranks by."""

from __future__ import annotations

import numpy as np

from transfer_study.regions import region_proposals


def rectangle_scene() -> np.ndarray:
    """A flat red 30x40 rectangle at (50, 20) on a background of two flat halves, blue and green."""
    rgb = np.zeros((80, 120, 3), np.uint8)
    rgb[:, :60] = (30, 60, 200)
    rgb[:, 60:] = (40, 180, 60)
    rgb[20:50, 50:90] = (220, 40, 40)
    return rgb


def test_some_region_is_exactly_the_rectangle_and_its_statistics_say_so():
    regions = region_proposals(rectangle_scene())
    # felzenszwalb's smoothing cuts thin strips along the edges: the rectangle is assembled by merges
    (i,) = [i for i, b in enumerate(regions.boxes.tolist()) if b == [50, 20, 90, 50] and regions.area[i] == 30 * 40]
    assert regions.fill[i] == 1.0
    assert regions.border_share[i] == 0.0  # off the image's edge
    assert regions.colour_std[i] < 1 and regions.gradient[i] < 20  # flat inside
    # across its outline: red against blue or green, RGB distances of ~210-250
    assert 200 < regions.contrast[i] < 260
    # the strips it was assembled from are not flat inside, or contrast less with what surrounds them
    strips = [j for j, b in enumerate(regions.boxes.tolist()) if regions.area[j] < 200]
    assert all(regions.gradient[j] > 20 or regions.contrast[j] < 200 for j in strips)


def test_the_hierarchy_ends_with_the_whole_image():
    regions = region_proposals(rectangle_scene())
    n = len(regions.area)
    assert tuple(regions.boxes[-1]) == (0, 0, 120, 80) and regions.area[-1] == 80 * 120
    assert regions.border_share[-1] == 1.0  # its whole outline is the image's edge
    # each merge adds one region: starting segments s give 2s - 1 regions
    assert n % 2 == 1 and (n + 1) // 2 >= 3
    assert (regions.area[(n + 1) // 2 :] >= regions.area[: (n + 1) // 2].min()).all()


def test_only_regions_that_reach_the_edge_have_outline_on_it():
    regions = region_proposals(rectangle_scene())
    x0, y0, x1, y1 = regions.boxes.T
    reaches_edge = (x0 == 0) | (y0 == 0) | (x1 == 120) | (y1 == 80)
    assert ((regions.border_share > 0) == reaches_edge).all()
    assert (regions.border_share <= 1).all()
