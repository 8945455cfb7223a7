"""A layout's boxes in generation plans: the :class:`Box` tuple, a real frame's boxes, their overlaps (IoU and
containment) and counts.

Boxes are det_20's inclusive pixel boxes in the layout's pixel space (the real frames' size), coordinates kept to
1/1000 px (:func:`round_coord`) so that a plan's bytes do not depend on float noise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from vocab import bdd
from vocab.box_layout import mirrored_span

#: Road users: what placement and the "free road" spans are about (lights and signs are not on the road).
ROAD_USERS: tuple[str, ...] = bdd.DET_CLASSES[:8]
#: det_20's traffic light colour codes.
LIGHT_CODES = {"red": "R", "green": "G", "yellow": "Y"}


def round_coord(value: float) -> float:
    """A coordinate kept to 1/1000 px, so the plan's bytes do not depend on float noise (-0.0 made 0.0)."""
    return round(float(value), 3) + 0.0


class Box(NamedTuple):
    """One label of a layout: det_20 category, inclusive pixel corners, attributes, where it came from (a named
    tuple: immutable and quick to make, det_train holds 1.3M of them)."""

    category: str  # det_20 name: one of the 10 classes, or other person / other vehicle / trailer
    det_class: str  # the evaluated class it counts as
    ignored: bool
    x1: float
    y1: float
    x2: float
    y2: float
    occluded: bool = False
    truncated: bool = False
    light: str = "NA"  # det_20 code: G, R, Y or NA
    source_index: int | None = None  # index in the source frame's labels (a copy keeps its original's)

    @property
    def width(self) -> float:
        return self.x2 - self.x1 + 1

    @property
    def height(self) -> float:
        return self.y2 - self.y1 + 1

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def continuous(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2 + 1, y2 + 1): the pixels it covers as a continuous box (IoUs, as stage 4 computes them)."""
        return self.x1, self.y1, self.x2 + 1, self.y2 + 1

    def shifted(self, dx: float) -> Box:
        return self._replace(x1=round_coord(self.x1 + dx), x2=round_coord(self.x2 + dx))

    def mirrored(self, width: int) -> Box:
        """Left-right mirror in inclusive pixels (vocab.box_layout's arithmetic): column x goes to width - 1 - x."""
        x1, x2 = mirrored_span(self.x1, self.x2, width)
        return self._replace(x1=round_coord(x1), x2=round_coord(x2))

    def det20(self, label_id: str) -> dict[str, Any]:
        return {
            "id": label_id,
            "category": self.category,
            "attributes": {
                "occluded": self.occluded,
                "truncated": self.truncated,
                "trafficLightColor": self.light,
            },
            "box2d": {"x1": self.x1, "y1": self.y1, "x2": self.x2, "y2": self.y2},
        }


def frame_boxes(frame: bdd.Frame, size: tuple[int, int]) -> list[Box]:
    """A frame's boxes of the 10 classes and det_20's ignored categories (legacy names mapped), clipped to the
    image; polygons, unknown categories, labels without a box and boxes wholly outside the image are left out."""
    out = []
    w, h = size[0] - 1.0, size[1] - 1.0
    for i, label in enumerate(frame.label_list()):
        cat = bdd.category_of(label)
        b = label.box2d
        if cat.det_class is None or b is None:
            continue
        if b.x2 < max(b.x1, 0.0) or b.y2 < max(b.y1, 0.0) or b.x1 > w or b.y1 > h:
            continue
        attrs = label.attributes
        light = (
            LIGHT_CODES.get(bdd.light_color(label) or "", "NA") if cat.det_class == "traffic light" else "NA"
        )
        out.append(
            Box(
                category=label.category if cat.ignored else cat.det_class,
                det_class=cat.det_class,
                ignored=cat.ignored,
                x1=round(max(b.x1, 0.0), 3) + 0.0,  # clipped to the image and kept to 1/1000 px (round_coord)
                y1=round(max(b.y1, 0.0), 3) + 0.0,
                x2=round(min(b.x2, w), 3) + 0.0,
                y2=round(min(b.y2, h), 3) + 0.0,
                occluded=attrs.is_occluded if attrs else False,
                truncated=attrs.is_truncated if attrs else False,
                light=light,
                source_index=i,
            )
        )
    return out


def class_counts(boxes: Iterable[Box]) -> Counter:
    """Boxes per evaluated class (ignored categories not counted, as stage 4 leaves them out)."""
    return Counter(b.det_class for b in boxes if not b.ignored)


def ious(box: tuple[float, float, float, float], others: np.ndarray) -> np.ndarray:
    """IoU of one continuous box with each row of ``others`` (N x 4 continuous boxes)."""
    if not len(others):
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def containments(box: tuple[float, float, float, float], others: np.ndarray) -> np.ndarray:
    """How much of the smaller box lies inside the larger one, for one continuous box and each row of ``others``:
    their intersection over the smaller of the two areas (1: one box wholly inside the other, whichever is
    smaller; IoU stays low when a small box sits inside a large one, this does not)."""
    if not len(others):
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    smaller = np.minimum(area, (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]))
    return np.where(smaller > 0, ix * iy / np.where(smaller > 0, smaller, 1), 0.0)


def largest_ious(boxes: Sequence[Box]) -> np.ndarray:
    """Each box's largest IoU with another box of the same layout (0 for a box alone)."""
    if len(boxes) < 2:
        return np.zeros(len(boxes))
    arr = np.array([b.continuous for b in boxes], dtype=np.float64)
    x1, y1, x2, y2 = (arr[:, k] for k in range(4))
    ix = np.clip(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]), 0, None)
    iy = np.clip(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]), 0, None)
    inter = ix * iy
    area = (x2 - x1) * (y2 - y1)
    union = area[:, None] + area[None] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    np.fill_diagonal(iou, 0.0)
    return iou.max(axis=1)


def intersects(a: Box, b: Box) -> bool:
    """Whether two boxes share pixels (as continuous boxes: touching edges do not count)."""
    ax1, ay1, ax2, ay2 = a.continuous
    bx1, by1, bx2, by2 = b.continuous
    return min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1)
