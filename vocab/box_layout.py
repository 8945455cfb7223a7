"""Box layouts: a frame's 2D boxes rendered as a label map, the input of a box-conditioned ControlNet.

Segmentation masks exist for BDD100K's 10K subset only; det_20 boxes for every 100K frame. A box layout is the
boxes drawn in the spirit of a mask: one id per pixel, resized nearest-neighbour like a mask everywhere.

Ids (uint8):

* ``0-9``: the 10 detection classes in :data:`BOX_CLASSES` order (``bdd.DET_CLASSES``: stage 4's YOLO ids);
* ``10`` (:data:`BOUNDARY_ID`): a box's outline, so touching or overlapping objects stay separate instances;
* ``255`` (:data:`BACKGROUND_ID`): no box.

Drawing rules (:func:`render_box_layout`):

* Boxes are inclusive pixel boxes (det_20's convention, in the pixel space of ``size``). A pixel belongs to a box
  when its centre lies inside the box's continuous extent ``[x1, x2 + 1] x [y1, y2 + 1]``, edges included. This
  rule is mirror-exact: flipping a layout left-right gives the layout of the mirrored boxes
  (:func:`mirror_box`), ties at half pixels included.
* Boxes are clipped to the image; boxes wholly outside it, invalid ones (x2 < x1, NaN) and labels without a box
  or outside the 10 classes (det_20's ignored ``other person``/``other vehicle``/``trailer``, legacy lanes and
  drivable areas) are skipped. Legacy names (``person``, ``bike``, ``motor``) read as their det_20 classes.
* Largest first: boxes are painted by pixel area descending (ties in input order), so small, usually far objects
  lie on top of the large near ones that they overlap.
* Each box is filled with its class, then outlined with :data:`BOUNDARY_ID`, :func:`boundary_width` pixels wide
  (1 px up to 540 px short side, 2 px at BDD's 1280x720, 3 px at 1080p). The outline is drawn only on a box's
  own edges, not where the image edge cut it, and never takes a box's last interior pixels: a box under
  ``2 * width + 1`` px gets a thinner outline, and boxes under 3 px none, so every box keeps its class.

Files: vocab/layouts.py writes them (``layouts.save_png(ids, path, "boxes", key)``): mode ``P`` PNGs whose palette
*index* is the id (viewers show :data:`BOX_PALETTE`'s colours), marked ``bdd_layout=boxes``. The ids overlap the
segmentation trainIds numerically; the marker is what tells a box layout from a mask, and the ControlNet code refuses
a file of the other kind. :func:`prepare` is this layout's renderer in vocab/layouts.py's table.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.cli import UserError
from vocab import bdd

#: The 10 detection classes, in stage 4's order (ids 0-9): the one list in vocab/bdd.py.
BOX_CLASSES: tuple[str, ...] = bdd.DET_CLASSES
NUM_BOX_CLASSES = len(BOX_CLASSES)
BOX_CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(BOX_CLASSES)}
BOUNDARY_ID = NUM_BOX_CLASSES  # 10
BACKGROUND_ID = 255
#: Ids a box layout may hold.
LAYOUT_IDS: tuple[int, ...] = (*range(NUM_BOX_CLASSES), BOUNDARY_ID, BACKGROUND_ID)
#: One-hot channels: one per class, one for the outlines (background: all zeros, as a blank condition).
NUM_ONE_HOT_CHANNELS = NUM_BOX_CLASSES + 1

#: Colours: each class has the official BDD100K segmentation colour of the same thing, outlines are white,
#: background black.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    name: bdd.SEG_CLASSES[bdd.DET_CLASS_TO_SEG_ID[name]].rgb for name in BOX_CLASSES
}
BOUNDARY_COLOR = (255, 255, 255)
BACKGROUND_COLOR = (0, 0, 0)


def _palette_lut() -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)
    for name, i in BOX_CLASS_ID.items():
        lut[i] = CLASS_COLORS[name]
    lut[BOUNDARY_ID] = BOUNDARY_COLOR
    lut[BACKGROUND_ID] = BACKGROUND_COLOR
    return lut


#: id -> RGB, 256 entries (unused ids black).
BOX_PALETTE: np.ndarray = _palette_lut()

#: The drawing rules' version, written into each file: a new version redraws every layout.
RENDER_VERSION = "1"

#: Short image side per pixel of outline width (2 px at 720).
_PX_PER_LINE = 360


def boundary_width(size: tuple[int, int]) -> int:
    """Outline width in pixels for an image of ``size`` (width, height): short side / 360, at least 1."""
    return max(1, round(min(size) / _PX_PER_LINE))


@dataclass(frozen=True)
class LayoutBox:
    """One drawable box: class id and its pixel rectangle (inclusive, clipped), with the edges clipping cut."""

    class_id: int
    x1: int
    y1: int
    x2: int
    y2: int
    index: int  # position among the input labels
    # which edges (left, top, right, bottom) the image edge cut: no outline there
    cut: tuple[bool, bool, bool, bool] = (False, False, False, False)

    @property
    def area(self) -> int:
        return (self.x2 - self.x1 + 1) * (self.y2 - self.y1 + 1)

    @property
    def category(self) -> str:
        return BOX_CLASSES[self.class_id]


def _parts(label: Any) -> tuple[str | None, Any]:
    """(category, box) of a vocab.bdd Label or a det_20-style dict."""
    if isinstance(label, Mapping):
        return label.get("category"), label.get("box2d")
    return getattr(label, "category", None), getattr(label, "box2d", None)


def _coords(box: Any) -> tuple[float, float, float, float] | None:
    try:
        if isinstance(box, Mapping):
            values = (box["x1"], box["y1"], box["x2"], box["y2"])
        else:
            values = (box.x1, box.y1, box.x2, box.y2)
        x1, y1, x2, y2 = (float(v) for v in values)
    except (KeyError, AttributeError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def _span(lo: float, hi: float, n: int) -> tuple[int, int, bool, bool] | None:
    """Pixels whose centres lie in [lo, hi + 1] (inclusive box coordinates), clipped to 0..n-1, and which ends
    were cut by the clipping; None when none of them is inside the image."""
    first, last = math.ceil(lo - 0.5), math.floor(hi + 0.5)
    if last < 0 or first > n - 1:
        return None
    return max(first, 0), min(last, n - 1), first < 0, last > n - 1


def layout_boxes(labels: Iterable[Any], size: tuple[int, int]) -> list[LayoutBox]:
    """The drawable boxes of ``labels`` in ``size`` = (width, height) pixels, in drawing order (largest first)."""
    return _drawable(labels, size)[0]


def _drawable(labels: Iterable[Any], size: tuple[int, int]) -> tuple[list[LayoutBox], int]:
    """:func:`layout_boxes`, and how many labels were boxes of the 10 classes (drawn, or wholly outside / invalid)."""
    width, height = size
    out, candidates = [], 0
    for index, label in enumerate(labels):
        category, box = _parts(label)
        cat = bdd.canonical_category(category)
        if cat.det_class is None or cat.ignored or box is None:
            continue
        candidates += 1
        coords = _coords(box)
        if coords is None:
            continue
        xs, ys = _span(coords[0], coords[2], width), _span(coords[1], coords[3], height)
        if xs is None or ys is None:
            continue
        out.append(
            LayoutBox(
                BOX_CLASS_ID[cat.det_class], xs[0], ys[0], xs[1], ys[1], index, (xs[2], ys[2], xs[3], ys[3])
            )
        )
    out.sort(key=lambda b: (-b.area, b.index))
    return out, candidates


def draw_layout(
    boxes: Sequence[LayoutBox], size: tuple[int, int], line_width: int | None = None
) -> np.ndarray:
    """:func:`layout_boxes`' boxes for ``size`` drawn as a (height, width) uint8 array of layout ids."""
    width, height = size
    ids = np.full((height, width), BACKGROUND_ID, dtype=np.uint8)
    line = boundary_width(size) if line_width is None else int(line_width)
    for b in boxes:
        ids[b.y1 : b.y2 + 1, b.x1 : b.x2 + 1] = b.class_id
        t = min(line, (min(b.x2 - b.x1, b.y2 - b.y1)) // 2)  # leaves >= 1 interior pixel per axis
        if t <= 0:
            continue
        left, top, right, bottom = b.cut
        if not left:
            ids[b.y1 : b.y2 + 1, b.x1 : b.x1 + t] = BOUNDARY_ID
        if not right:
            ids[b.y1 : b.y2 + 1, b.x2 - t + 1 : b.x2 + 1] = BOUNDARY_ID
        if not top:
            ids[b.y1 : b.y1 + t, b.x1 : b.x2 + 1] = BOUNDARY_ID
        if not bottom:
            ids[b.y2 - t + 1 : b.y2 + 1, b.x1 : b.x2 + 1] = BOUNDARY_ID
    return ids


def render_box_layout(
    labels: Iterable[Any], size: tuple[int, int], line_width: int | None = None
) -> np.ndarray:
    """A frame's boxes as a (height, width) uint8 array of layout ids (see the module docstring).

    Args:
        labels: vocab.bdd ``Label`` objects (any BDD100K label format) or det_20-style dicts
            ``{"category": ..., "box2d": {"x1", "y1", "x2", "y2"}}``, in the pixel space of ``size``.
        size: (width, height) of the frame.
        line_width: outline width in pixels (default :func:`boundary_width`).
    """
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"layout size must be positive, got {size}")
    return draw_layout(layout_boxes(labels, (width, height)), (width, height), line_width)


def mirrored_span(x1: float, x2: float, width: int) -> tuple[float, float]:
    """The inclusive column span ``x1..x2`` mirrored left-right in an image ``width`` pixels wide: column x goes to
    ``width - 1 - x``, so the ends swap. The one mirror arithmetic: :func:`mirror_box` and the generation plans'
    boxes (convert/planning/boxes.py) both use it."""
    return width - 1 - x2, width - 1 - x1


def mirror_box(box: Any, width: int) -> dict[str, float]:
    """An inclusive box mirrored left-right in an image ``width`` pixels wide (det_20 ``box2d`` dict): rendering
    the mirrored boxes gives exactly the mirrored layout."""
    coords = _coords(box)
    if coords is None:
        raise ValueError(f"not a valid box: {box!r}")
    x1, y1, x2, y2 = coords
    mx1, mx2 = mirrored_span(x1, x2, width)
    return {"x1": mx1, "y1": y1, "x2": mx2, "y2": y2}


# ---------------------------------------------------------------------------------------------------------------
# Ids, keys and the renderer of vocab/layouts.py's table
# ---------------------------------------------------------------------------------------------------------------


def check_layout_ids(arr: np.ndarray, source: str | os.PathLike = "<array>") -> None:
    """Raise if ``arr`` holds values other than the layout ids (0-10, 255)."""
    bad = (arr > BOUNDARY_ID) & (arr != BACKGROUND_ID)
    if bad.any():
        values = np.unique(arr[bad])[:10].tolist()
        raise UserError(
            f"box layout {source} has values {values} outside the layout ids 0-{NUM_BOX_CLASSES - 1} (classes), "
            f"{BOUNDARY_ID} (outline) and {BACKGROUND_ID} (background)"
        )


def layout_key(labels: Iterable[Any], size: tuple[int, int], line_width: int | None = None) -> str:
    """A short hash of everything the rendering depends on (renderer version, size, outline, drawable boxes):
    equal keys give equal layouts, so a rerun can keep a file whose key matches without decoding it."""
    return boxes_key(layout_boxes(labels, size), size, line_width)


def boxes_key(boxes: Sequence[LayoutBox], size: tuple[int, int], line_width: int | None = None) -> str:
    """:func:`layout_key` of :func:`layout_boxes`' boxes for ``size`` (made once by a caller that draws them)."""
    line = boundary_width(size) if line_width is None else int(line_width)
    text = repr(
        (RENDER_VERSION, tuple(size), line, [(b.class_id, b.x1, b.y1, b.x2, b.y2, b.cut) for b in boxes])
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BoxDrawing:
    """One frame's box layout, prepared: the key and counts without drawing; :meth:`ids` draws it."""

    boxes: tuple[LayoutBox, ...]
    size: tuple[int, int]
    key: str
    drawn: int  # boxes on the layout
    left_out: int  # boxes of the 10 classes wholly outside the frame, or invalid

    def ids(self) -> np.ndarray:
        return draw_layout(self.boxes, self.size)


def prepare(labels: Sequence[Any], size: tuple[int, int]) -> BoxDrawing:
    """The renderer of vocab/layouts.py's ``boxes`` layout: ``labels`` (as :func:`render_box_layout` takes them)
    at ``size``, with the key of everything the drawing depends on and the boxes drawn and left out."""
    size = (int(size[0]), int(size[1]))
    boxes, candidates = _drawable(labels, size)
    return BoxDrawing(tuple(boxes), size, boxes_key(boxes, size), len(boxes), candidates - len(boxes))
