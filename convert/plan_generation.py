"""Plan ControlNet generations that fill what the real labels lack: a layout, a caption and labels per scene.

Usage:
    python convert/plan_generation.py --bdd_data_dir bdd100k --split train --targets config/plan_targets.yaml \\
        --out plan/ [--scenes N] [--seed S] [--labels_file F] [--templates FILE] [--image_size WxH] [--overwrite]

Reads the real labels (det_20, legacy, Scalabel or the 2018 per-image files, as stage 1 does), reports their
distribution (frames, boxes per class and box sizes per weather x time of day x scene) and writes a plan of N
scenes that moves the combined (real + planned) distribution toward the targets of ``--targets`` (every key is
documented in config/plan_targets.yaml). Each planned scene is

* a layout: a real frame's boxes that fit the target (e.g. with pedestrians), optionally edited: mirrored left to
  right, objects removed, moved or duplicated. Moves and copies shift a box along its own image rows, within the
  span that road users stand in near its baseline, to a place where it overlaps no box more than real boxes
  overlap their neighbours (the ``edits.overlap_quantile`` of the real data's per-box largest IoU);
* a caption for the target conditions, written by stage 1's caption code (convert/captions.py) from the layout's
  objects and the target's weather, time of day and scene;
* its labels in det_20 form (``category``, ``box2d`` with inclusive pixel corners, ``attributes``) in the
  layout's pixel space (the real frames' size, 1280x720 for BDD100K): the labels of the image to come.

Scene i depends only on the seed, the inputs and scenes 0..i-1 (targets take turns by weight, a target fills its
emptiest cell first, source frames come from a per-seed shuffle of each target's pool, edits from a generator
seeded by (seed, i)): the same seed gives the same bytes, and a rerun with more scenes extends the plan without
changing its first rows. A rerun whose first rows would differ (other labels, targets or seed) is refused unless
``--overwrite``.

Writes into ``--out``: ``plan.jsonl`` (one scene per line), ``plan.json`` (inputs, settings, before/after counts),
``report.md`` (tables), ``distribution.csv`` (real, planned and combined counts per cell and class) and
``distribution.png`` (before/after plot); all atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import Field, field_validator, model_validator

from convert.bdd_inputs import resolve_bdd_inputs
from convert.captions import CaptionBuilder, load_templates, load_token_counter, save_token_counter
from core.cli import UserError, run_main, setup_logging
from core.config import Section, load_config
from core.io import atomic_write_bytes, atomic_write_text
from vocab import bdd
from vocab.box_layout import mirrored_span

log = logging.getLogger("bdd-sdxl.plan")

PLAN_FILE = "plan.jsonl"
SUMMARY_FILE = "plan.json"
REPORT_FILE = "report.md"
CSV_FILE = "distribution.csv"
PLOT_FILE = "distribution.png"
PLAN_VERSION = 1
#: Frame attributes a target can fix, in the order cells are named.
CELL_KEYS: tuple[str, ...] = ("weather", "timeofday", "scene")
DEFINED: dict[str, tuple[str, ...]] = {
    key: tuple(v for v in bdd.FRAME_ATTRIBUTES[key] if v != "undefined") for key in CELL_KEYS
}
#: Road users: what placement and the "free road" spans are about (lights and signs are not on the road).
ROAD_USERS: tuple[str, ...] = bdd.DET_CLASSES[:8]
#: COCO's area thresholds (pixels) for small / medium / large boxes.
SIZE_BUCKETS = bdd.COCO_SIZES
LIGHT_CODES = {"red": "R", "green": "G", "yellow": "Y"}

# ---------------------------------------------------------------------------------------------------------------
# Targets file: schema (config/plan_targets.yaml documents every key)
# ---------------------------------------------------------------------------------------------------------------

Weather = Literal[DEFINED["weather"]]
TimeOfDay = Literal[DEFINED["timeofday"]]
Scene = Literal[DEFINED["scene"]]
DetClass = Literal[bdd.DET_CLASSES]


class Target(Section):
    """Cells (weather x time of day x scene) to fill, the classes each planned scene must hold, and how many."""

    name: str = Field(min_length=1)
    weather: list[Weather] | Literal["all"] | None = None
    timeofday: list[TimeOfDay] | Literal["all"] | None = None
    scene: list[Scene] | Literal["all"] | None = None
    require: dict[DetClass, int] = {}
    scenes: int | None = Field(None, ge=1)
    weight: float = Field(1.0, gt=0)

    @field_validator("weather", "timeofday", "scene", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        """``rainy`` -> ``[rainy]``: one value is a one-value list; ``all`` and null stay as they are."""
        return [value] if isinstance(value, str) and value != "all" else value

    @field_validator("weather", "timeofday", "scene")
    @classmethod
    def _no_repeats(cls, value, info):
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one value, or write all or null")
            if len(set(value)) != len(value):
                raise ValueError(f"a value is listed twice: {value}")
        return value

    @field_validator("require")
    @classmethod
    def _counts(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if v < 1}
        if bad:
            raise ValueError(f"minimum counts must be >= 1, got {bad}")
        return value

    def values(self, key: str) -> tuple[str, ...] | None:
        """The values of ``key`` this target's cells take (None: not fixed, the source frame's own value)."""
        value = getattr(self, key)
        return DEFINED[key] if value == "all" else tuple(value) if value is not None else None

    def cells(self) -> list[dict[str, str]]:
        """Every combination of the fixed keys' values, in vocabulary order (one empty cell: nothing fixed)."""
        cells: list[dict[str, str]] = [{}]
        for key in CELL_KEYS:
            values = self.values(key)
            if values is not None:
                cells = [{**cell, key: v} for cell in cells for v in values]
        return cells


class Edits(Section):
    """How layouts are edited (each planned scene draws its edits from its own generator)."""

    mirror: float = Field(0.5, ge=0, le=1)
    remove: float = Field(0.25, ge=0, le=1)
    remove_max_fraction: float = Field(0.25, ge=0, le=1)
    move: float = Field(0.25, ge=0, le=1)
    max_moves: int = Field(2, ge=0)
    duplicate: float = Field(0.25, ge=0, le=1)
    max_duplicates: int = Field(2, ge=0)
    classes: list[DetClass] = list(ROAD_USERS)
    overlap_quantile: float = Field(0.95, ge=0, le=1)
    baseline_tolerance: float = Field(0.25, ge=0)
    span_margin: float = Field(1.0, ge=0)


class PlanTargets(Section):
    scenes: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)  # numpy's seed sequences take non-negative integers
    targets: list[Target] = Field(min_length=1)
    edits: Edits = Edits()

    @model_validator(mode="after")
    def _unique_names(self) -> PlanTargets:
        names = [t.name for t in self.targets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"targets: names must be unique, repeated: {repeated}")
        return self


def load_targets(path: str | Path) -> PlanTargets:
    return load_config(PlanTargets, path)


# ---------------------------------------------------------------------------------------------------------------
# Boxes and layouts
# ---------------------------------------------------------------------------------------------------------------


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
        return self._replace(x1=_r(self.x1 + dx), x2=_r(self.x2 + dx))

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


def _r(value: float) -> float:
    """Coordinates are kept to 1/1000 px, so the plan's bytes do not depend on float noise."""
    return round(float(value), 3) + 0.0


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
                x1=round(max(b.x1, 0.0), 3) + 0.0,  # clipped to the image and kept to 1/1000 px (as _r)
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


def mirror_box(box: Box, width: int) -> Box:
    """Left-right mirror in inclusive pixels (vocab.box_layout's arithmetic): column x goes to width - 1 - x."""
    x1, x2 = mirrored_span(box.x1, box.x2, width)
    return box._replace(x1=_r(x1), x2=_r(x2))


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


def _intersects(a: Box, b: Box) -> bool:
    ax1, ay1, ax2, ay2 = a.continuous
    bx1, by1, bx2, by2 = b.continuous
    return min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1)


# ---------------------------------------------------------------------------------------------------------------
# Layout edits
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """A layout being edited: its boxes (copies appended) and the edits made, in order."""

    boxes: list[Box]
    size: tuple[int, int]
    edits: list[dict[str, Any]] = field(default_factory=list)
    placed: list[int] = field(default_factory=list)  # indices of moved and copied boxes

    def others(self, skip: int | None = None) -> np.ndarray:
        return np.array(
            [b.continuous for i, b in enumerate(self.boxes) if i != skip], dtype=np.float64
        ).reshape(-1, 4)


class Editor:
    """Applies :class:`Edits` to layouts: the same rules for every scene, a scene's own generator for the draws."""

    def __init__(self, edits: Edits, overlap_limit: float, class_weights: dict[str, float]):
        self.e = edits
        self.limit = overlap_limit
        self.editable = frozenset(edits.classes)
        self.class_weights = class_weights  # for optional copies: rare classes are copied more often

    def movable(self, layout: Layout, i: int) -> bool:
        """Whether box ``i`` may be moved or copied: an editable class, not cut by the frame's edge, and clear of
        every other road user (a rider and its bicycle, or a pedestrian in front of a car, stay together)."""
        box = layout.boxes[i]
        w, h = layout.size
        if box.ignored or box.det_class not in self.editable or box.truncated:
            return False
        if box.x1 <= 0 or box.y1 <= 0 or box.x2 >= w - 1 or box.y2 >= h - 1:
            return False
        return not any(
            j != i and other.det_class in ROAD_USERS and _intersects(box, other)
            for j, other in enumerate(layout.boxes)
        )

    def span(self, layout: Layout, box: Box) -> tuple[float, float]:
        """Where along its rows ``box`` may stand: the x range of road users whose baseline (y2) is within
        ``baseline_tolerance`` box heights of its own, widened by ``span_margin`` box widths, inside the image."""
        tol = self.e.baseline_tolerance * box.height
        near = [b for b in layout.boxes if b.det_class in ROAD_USERS and abs(b.y2 - box.y2) <= tol]
        near.append(box)
        margin = self.e.span_margin * box.width
        lo = max(0.0, min(b.x1 for b in near) - margin)
        hi = min(layout.size[0] - 1.0, max(b.x2 for b in near) + margin)
        return lo, hi

    def place(self, layout: Layout, i: int, rng: np.random.Generator, *, copy: bool) -> float | None:
        """A horizontal shift for box ``i`` (or its copy) to a free place on its rows, or None when there is none.

        Candidates lie on a grid of a quarter box width within :meth:`span`; a candidate is free when its IoU with
        every other box (the original too, for a copy) is at most the real data's overlap limit. A move goes at
        least one box width. One free candidate is drawn at random.
        """
        box = layout.boxes[i]
        lo, hi = self.span(layout, box)
        step = max(1.0, box.width / 4)
        k_lo = math.ceil((lo - box.x1) / step)
        k_hi = math.floor((hi - box.x2) / step)
        if k_hi < k_lo:
            return None
        shifts = np.arange(k_lo, k_hi + 1, dtype=np.float64) * step
        shifts = shifts[np.abs(shifts) >= (box.width if not copy else 1e-9)]
        others = layout.others(skip=None if copy else i)
        free = [
            dx
            for dx in shifts.tolist()
            if ious(box.shifted(dx).continuous, others).max(initial=0.0) <= self.limit + 1e-9
        ]
        if not free:
            return None
        return _r(free[int(rng.integers(len(free)))])

    # -- the edits ------------------------------------------------------------------------------------------

    def mirror(self, layout: Layout) -> None:
        layout.boxes = [mirror_box(b, layout.size[0]) for b in layout.boxes]
        layout.edits.append({"op": "mirror"})

    def remove(self, layout: Layout, rng: np.random.Generator, keep: set[str]) -> None:
        """Remove 1..``remove_max_fraction`` of the editable boxes (never of the classes in ``keep``)."""
        removable = [
            i
            for i, b in enumerate(layout.boxes)
            if not b.ignored and b.det_class in self.editable and b.det_class not in keep
        ]
        most = math.floor(self.e.remove_max_fraction * len(removable))
        if most < 1:
            return
        chosen = sorted(rng.choice(removable, size=int(rng.integers(1, most + 1)), replace=False).tolist())
        for i in chosen:
            b = layout.boxes[i]
            layout.edits.append({"op": "remove", "label": b.source_index, "category": b.category})
        gone = set(chosen)
        layout.boxes = [b for i, b in enumerate(layout.boxes) if i not in gone]

    def move(self, layout: Layout, rng: np.random.Generator) -> None:
        for _ in range(int(rng.integers(1, self.e.max_moves + 1))):
            candidates = [
                i for i in range(len(layout.boxes)) if i not in layout.placed and self.movable(layout, i)
            ]
            if not candidates:
                return
            i = candidates[int(rng.integers(len(candidates)))]
            dx = self.place(layout, i, rng, copy=False)
            if dx is None:
                continue
            b = layout.boxes[i]
            layout.boxes[i] = b.shifted(dx)
            layout.placed.append(i)
            layout.edits.append({"op": "move", "label": b.source_index, "category": b.category, "dx": dx})

    def duplicate(self, layout: Layout, rng: np.random.Generator, det_class: str | None = None) -> bool:
        """Copy one movable box that was not moved or copied itself (of ``det_class``, or of any editable class,
        rare ones more often) to a free place on its rows; False when no box can be copied."""
        candidates = [
            i
            for i, b in enumerate(layout.boxes)
            if (det_class is None or b.det_class == det_class)
            and i not in layout.placed
            and self.movable(layout, i)
        ]
        if det_class is None and candidates:
            weights = np.array([self.class_weights.get(layout.boxes[i].det_class, 0.0) for i in candidates])
            if weights.sum() <= 0:
                return False
            order = rng.choice(
                len(candidates), size=len(candidates), replace=False, p=weights / weights.sum()
            )
        else:
            order = rng.permutation(len(candidates))
        for k in order.tolist():
            i = candidates[k]
            dx = self.place(layout, i, rng, copy=True)
            if dx is None:
                continue
            b = layout.boxes[i]
            layout.boxes.append(b.shifted(dx)._replace(occluded=False))
            layout.placed.append(len(layout.boxes) - 1)
            layout.edits.append(
                {"op": "duplicate", "label": b.source_index, "category": b.category, "dx": dx}
            )
            return True
        return False

    def edit(self, boxes: list[Box], size: tuple[int, int], require: dict[str, int], rng) -> Layout | None:
        """The edited layout of one scene, or None when the required counts cannot be reached by copies."""
        layout = Layout(list(boxes), size)
        e = self.e
        if rng.random() < e.mirror:
            self.mirror(layout)
        if rng.random() < e.remove:
            self.remove(layout, rng, keep=set(require))
        if e.max_moves and rng.random() < e.move:
            self.move(layout, rng)
        for det_class, least in require.items():
            while class_counts(layout.boxes)[det_class] < least:
                if not self.duplicate(layout, rng, det_class):
                    return None
        if e.max_duplicates and rng.random() < e.duplicate:
            for _ in range(int(rng.integers(1, e.max_duplicates + 1))):
                self.duplicate(layout, rng)
        return layout


# ---------------------------------------------------------------------------------------------------------------
# The real data: frames, distribution, overlaps
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealFrame:
    name: str
    attributes: dict[str, str]  # weather, timeofday, scene ("undefined" when absent)
    boxes: tuple[Box, ...]
    counts: Counter  # boxes per evaluated class


def read_real_frames(frames: Sequence[bdd.Frame], size: tuple[int, int]) -> list[RealFrame]:
    """One entry per frame name (the first one kept), in file order."""
    out, seen = [], set()
    for frame in frames:
        if not frame.name or frame.name in seen:
            continue
        seen.add(frame.name)
        boxes = tuple(frame_boxes(frame, size))
        attrs = {key: getattr(frame, key) for key in CELL_KEYS}
        out.append(RealFrame(frame.name, attrs, boxes, class_counts(boxes)))
    return out


@dataclass
class Distribution:
    """Frames, boxes per class and box sizes per (weather, timeofday, scene) cell.

    ``frames[cell]``: frames in the cell; ``with_class[cell, cls]``: frames holding at least one ``cls`` box;
    ``boxes[cell, cls]``, ``sizes[cell, cls, bucket]`` and ``heights[cell, cls]`` (a list of box heights).
    """

    frames: Counter = field(default_factory=Counter)
    with_class: Counter = field(default_factory=Counter)
    boxes: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    heights: dict[tuple, list[float]] = field(default_factory=dict)

    def add(self, attributes: dict[str, str], boxes: Iterable[Box]) -> None:
        cell = tuple(attributes[k] for k in CELL_KEYS)
        self.frames[cell] += 1
        seen = set()
        for b in boxes:
            if b.ignored:
                continue
            key = (cell, b.det_class)
            self.boxes[key] += 1
            self.sizes[(cell, b.det_class, bdd.coco_size(b.area))] += 1
            self.heights.setdefault(key, []).append(b.height)
            seen.add(b.det_class)
        for cls in seen:
            self.with_class[(cell, cls)] += 1

    def merged(self, other: Distribution) -> Distribution:
        out = Distribution(
            self.frames + other.frames,
            self.with_class + other.with_class,
            self.boxes + other.boxes,
            self.sizes + other.sizes,
        )
        for src in (self.heights, other.heights):
            for key, values in src.items():
                out.heights.setdefault(key, []).extend(values)
        return out

    def cells(self) -> list[tuple[str, str, str]]:
        return sorted(self.frames, key=cell_order)

    def frames_by(self, *keys: str) -> Counter:
        """Frames summed over the other attributes, keyed by the values of ``keys`` (e.g. weather, timeofday)."""
        idx = [CELL_KEYS.index(k) for k in keys]
        out: Counter = Counter()
        for cell, n in self.frames.items():
            out[tuple(cell[i] for i in idx)] += n
        return out

    def class_totals(self) -> Counter:
        out: Counter = Counter()
        for (_, cls), n in self.boxes.items():
            out[cls] += n
        return out

    def size_totals(self) -> Counter:
        out: Counter = Counter()
        for (_, cls, bucket), n in self.sizes.items():
            out[(cls, bucket)] += n
        return out


def cell_order(cell: Sequence[str]) -> tuple[int, ...]:
    """Vocabulary order (bdd.py's), 'undefined' and unknown values last."""
    out = []
    for key, value in zip(CELL_KEYS, cell, strict=True):
        vocab = DEFINED[key]
        out.append(vocab.index(value) if value in vocab else len(vocab) + (value != "undefined"))
    return tuple(out)


def overlap_stats(frames: Sequence[RealFrame]) -> np.ndarray:
    """Every real box's largest IoU with another box of its frame."""
    parts = [largest_ious(f.boxes) for f in frames if len(f.boxes) > 1]
    singles = sum(len(f.boxes) for f in frames if len(f.boxes) == 1)
    return np.concatenate([*parts, np.zeros(singles)]) if parts or singles else np.zeros(0)


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


def in_cell(attributes: dict[str, str], cell: dict[str, str]) -> bool:
    return all(attributes.get(k) == v for k, v in cell.items())


def holds(counts: Counter, require: dict[str, int]) -> bool:
    return all(counts[c] >= n for c, n in require.items())


def matches(
    attributes: dict[str, str], counts: Counter, cell: dict[str, str], require: dict[str, int]
) -> bool:
    return in_cell(attributes, cell) and holds(counts, require)


def cell_name(cell: dict[str, str]) -> str:
    return " / ".join(f"{cell[k]}" for k in CELL_KEYS if k in cell) or "any conditions"


@dataclass
class TargetState:
    """A target while the plan is built: its cells' counts (real + planned so far) and its source pools."""

    index: int
    target: Target
    cells: list[dict[str, str]]
    real: list[int]  # real frames per cell that match it and the required counts
    planned_in_cell: list[int]  # planned scenes (of any target) that match each cell
    pools: dict[str | None, list[int]]  # scene (or None: any) -> real frame indices that can serve as layouts
    orders: dict[str | None, np.ndarray] = field(default_factory=dict)  # each pool's per-seed shuffle
    cursors: Counter = field(default_factory=Counter)
    planned: int = 0

    @property
    def require(self) -> dict[str, int]:
        return dict(self.target.require)

    def exhausted(self) -> bool:
        return self.target.scenes is not None and self.planned >= self.target.scenes

    def next_cell(self) -> int:
        """The cell with the fewest frames (real + planned), the first in vocabulary order on ties."""
        totals = [r + p for r, p in zip(self.real, self.planned_in_cell, strict=True)]
        return totals.index(min(totals))


@dataclass
class PlannedScene:
    index: int
    target: str
    cell: dict[str, str]
    attributes: dict[str, str]
    source: RealFrame
    layout: Layout
    caption: str = ""

    @property
    def id(self) -> str:
        return f"plan_{self.index:05d}"

    def labels(self) -> list[dict[str, Any]]:
        return [b.det20(str(k)) for k, b in enumerate(self.layout.boxes)]

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "target": self.target,
            "cell": self.cell,
            "caption": self.caption,
            "attributes": self.attributes,
            "size": list(self.layout.size),
            "source_frame": self.source.name,
            "source_attributes": self.source.attributes,
            "edits": self.layout.edits,
            "labels": self.labels(),
        }


class Planner:
    """Builds the plan scene by scene; scene i depends on the seed, the inputs and scenes 0..i-1 only."""

    def __init__(
        self,
        spec: PlanTargets,
        frames: Sequence[RealFrame],
        size: tuple[int, int],
        seed: int,
        builder: CaptionBuilder,
        overlap_limit: float,
        labels_file: str = "labels",
    ):
        self.spec = spec
        self.frames = frames
        self.size = size
        self.seed = seed
        self.builder = builder
        totals = Counter()
        for f in frames:
            totals.update(f.counts)
        weights = {c: 1.0 / totals[c] for c in spec.edits.classes if totals[c]}
        self.editor = Editor(spec.edits, overlap_limit, weights)
        self.states = [self._target_state(i, t, labels_file) for i, t in enumerate(spec.targets)]
        self.scenes: list[PlannedScene] = []

    def _target_state(self, index: int, target: Target, labels_file: str) -> TargetState:
        cells = target.cells()
        require = dict(target.require)
        # real frames holding the required counts per attribute combination, then summed per cell: one pass over
        # the frames, not one per cell (every weather, time of day and scene are 108 cells)
        holding = Counter(tuple(f.attributes.items()) for f in self.frames if holds(f.counts, require))
        real = [sum(n for attrs, n in holding.items() if in_cell(dict(attrs), c)) for c in cells]
        has_all = [i for i, f in enumerate(self.frames) if f.boxes and all(f.counts[c] for c in require)]
        if not has_all:
            needs = ", ".join(f"{c}" for c in require)
            raise UserError(
                f"target {target.name!r}: no frame in {labels_file} has boxes"
                + (f" of every required class ({needs})" if require else "")
                + "; copies are made of a frame's own objects, so the real data cannot supply this target: "
                "require classes that occur, or use other labels"
            )
        scenes = target.values("scene")
        pools: dict[str | None, list[int]] = {}
        if scenes is None:
            pools[None] = has_all
        else:
            for scene in scenes:
                pools[scene] = [i for i in has_all if self.frames[i].attributes["scene"] == scene]
                if not pools[scene]:
                    raise UserError(
                        f"target {target.name!r}: no {scene} frame in {labels_file} has the boxes it needs"
                        + (f" ({', '.join(require)})" if require else "")
                        + "; the layouts of a scene type come from real frames of that type: leave it out of "
                        "the target's scene list, or set scene: null"
                    )
        state = TargetState(index, target, cells, real, [0] * len(cells), pools)
        for k, scene in enumerate(pools):
            rng = np.random.default_rng([self.seed, 1, index, k])
            state.orders[scene] = rng.permutation(len(pools[scene]))
        return state

    def next_target(self) -> TargetState | None:
        """Targets take turns by weight: the one furthest below its share goes next (ties: file order)."""
        active = [s for s in self.states if not s.exhausted()]
        if not active:
            return None
        return min(active, key=lambda s: ((s.planned + 1) / s.target.weight, s.index))

    def build(self, n: int) -> list[PlannedScene]:
        while len(self.scenes) < n:
            state = self.next_target()
            if state is None:
                break
            self.scenes.append(self.plan_scene(len(self.scenes), state))
        return self.scenes

    def plan_scene(self, index: int, state: TargetState) -> PlannedScene:
        k = state.next_cell()
        cell = state.cells[k]
        scene_key = cell.get("scene")
        pool, order = state.pools[scene_key], state.orders[scene_key]
        rng = np.random.default_rng([self.seed, 0, index])
        for _ in range(len(pool)):
            source = self.frames[pool[int(order[state.cursors[scene_key] % len(pool)])]]
            state.cursors[scene_key] += 1
            layout = self.editor.edit(list(source.boxes), self.size, state.require, rng)
            if layout is not None:
                break
        else:
            raise UserError(
                f"target {state.target.name!r}, cell {cell_name(cell)}: no source frame can hold "
                + ", ".join(f"{n} {c}" for c, n in state.require.items())
                + " with copies placed where they overlap no box more than real boxes do; lower the required "
                "counts, or raise edits.overlap_quantile"
            )
        attributes = {key: cell.get(key, source.attributes[key]) for key in CELL_KEYS}
        scene = PlannedScene(index, state.target.name, cell, attributes, source, layout)
        scene.caption = self.caption(scene)
        state.planned += 1
        counts = class_counts(layout.boxes)
        for s in self.states:
            for j, c in enumerate(s.cells):
                if matches(attributes, counts, c, s.require):
                    s.planned_in_cell[j] += 1
        return scene

    def caption(self, scene: PlannedScene) -> str:
        """Stage 1's caption of the planned frame: its labels with the target's attributes, read as a det_20 file."""
        frame = {"name": f"{scene.id}.jpg", "attributes": scene.attributes, "labels": scene.labels()}
        text, _, _ = self.builder.caption(bdd.decode_frames(json.dumps([frame]).encode())[0])
        return text


def plan_distribution(scenes: Iterable[PlannedScene]) -> Distribution:
    dist = Distribution()
    for s in scenes:
        dist.add(s.attributes, s.layout.boxes)
    return dist


def real_distribution(frames: Iterable[RealFrame]) -> Distribution:
    dist = Distribution()
    for f in frames:
        dist.add(f.attributes, f.boxes)
    return dist


def plan_lines(scenes: Iterable[PlannedScene]) -> list[str]:
    return [json.dumps(s.row(), ensure_ascii=False) + "\n" for s in scenes]


# ---------------------------------------------------------------------------------------------------------------
# Reports: CSV, Markdown, plot, summary
# ---------------------------------------------------------------------------------------------------------------


def _median(values: Sequence[float] | None) -> float | str:
    return round(float(np.median(values)), 1) if values else ""


def distribution_csv(real: Distribution, planned: Distribution) -> str:
    """One row per set (real, planned, combined), cell and class (``all``: every class)."""
    combined = real.merged(planned)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["set", *CELL_KEYS, "class", "frames", "boxes", *SIZE_BUCKETS, "median_height"])
    for name, dist in (("real", real), ("planned", planned), ("combined", combined)):
        for cell in dist.cells():
            total_boxes = sum(dist.boxes[(cell, c)] for c in bdd.DET_CLASSES)
            sizes = [sum(dist.sizes[(cell, c, b)] for c in bdd.DET_CLASSES) for b in SIZE_BUCKETS]
            heights = [h for c in bdd.DET_CLASSES for h in dist.heights.get((cell, c), [])]
            writer.writerow([name, *cell, "all", dist.frames[cell], total_boxes, *sizes, _median(heights)])
            for c in bdd.DET_CLASSES:
                if dist.boxes[(cell, c)]:
                    writer.writerow(
                        [
                            name,
                            *cell,
                            c,
                            dist.with_class[(cell, c)],
                            dist.boxes[(cell, c)],
                            *(dist.sizes[(cell, c, b)] for b in SIZE_BUCKETS),
                            _median(dist.heights.get((cell, c))),
                        ]
                    )
    return buf.getvalue()


def _arrow(before: int, after: int) -> str:
    return f"{before}" if before == after else f"{before} → {after}"


def _values(dist: Distribution, key: str) -> list[str]:
    idx = CELL_KEYS.index(key)
    present = {cell[idx] for cell in dist.frames}
    return [v for v in (*DEFINED[key], "undefined") if v in present or v in DEFINED[key]] + sorted(
        present - set(bdd.FRAME_ATTRIBUTES[key])
    )


def weather_time_table(real: Distribution, combined: Distribution) -> list[str]:
    """Frames per weather (rows) x time of day (columns), 'real → combined' where the plan adds some."""
    before, after = real.frames_by("weather", "timeofday"), combined.frames_by("weather", "timeofday")
    times = _values(combined, "timeofday")
    lines = ["| weather \\ time of day | " + " | ".join(times) + " | all |", "|---" * (len(times) + 2) + "|"]
    for w in _values(combined, "weather"):
        row = [_arrow(before[(w, t)], after[(w, t)]) for t in times]
        total = _arrow(sum(before[(w, t)] for t in times), sum(after[(w, t)] for t in times))
        lines.append(f"| {w} | " + " | ".join(row) + f" | {total} |")
    return lines


def print_table(real: Distribution) -> str:
    """The real frames per weather x time of day, as plain text for stdout."""
    by = real.frames_by("weather", "timeofday")
    times = _values(real, "timeofday")
    weathers = _values(real, "weather")
    width = max(len(w) for w in weathers) + 2
    lines = [" " * width + "".join(f"{t:>11}" for t in times)]
    for w in weathers:
        lines.append(f"{w:<{width}}" + "".join(f"{by[(w, t)]:>11}" for t in times))
    return "\n".join(lines)


def report_markdown(
    real: Distribution,
    planned: Distribution,
    states: Sequence[TargetState],
    scenes: Sequence[PlannedScene],
    overlaps: dict[str, Any],
    inputs: dict[str, Any],
) -> str:
    combined = real.merged(planned)
    out = [
        "# Generation plan",
        "",
        f"Real labels: `{inputs['labels_file']}` ({inputs['frames']} frames, layout size "
        f"{inputs['size'][0]}x{inputs['size'][1]}); targets: `{inputs['targets_file']}`; seed {inputs['seed']}; "
        f"{len(scenes)} planned scenes (`{PLAN_FILE}`). Numbers read 'real → real + planned'.",
        "",
        "## Frames per weather × time of day",
        "",
        *weather_time_table(real, combined),
        "",
        "## Targets",
        "",
        "| target | cell | required | real | planned | combined |",
        "|---|---|---|---|---|---|",
    ]
    for s in states:
        required = ", ".join(f"{n} {c}" for c, n in s.target.require.items()) or "-"
        for cell, r, p in zip(s.cells, s.real, s.planned_in_cell, strict=True):
            out.append(f"| {s.target.name} | {cell_name(cell)} | {required} | {r} | {p} | {r + p} |")
    totals_r, totals_c = real.class_totals(), combined.class_totals()
    sizes_r, sizes_p = real.size_totals(), planned.size_totals()
    out += [
        "",
        "## Boxes per class and size (small < 32², medium < 96², large: COCO's areas in layout pixels)",
        "",
        "| class | boxes | real small / medium / large | planned small / medium / large |",
        "|---|---|---|---|",
    ]
    for c in bdd.DET_CLASSES:
        r = " / ".join(str(sizes_r[(c, b)]) for b in SIZE_BUCKETS)
        p = " / ".join(str(sizes_p[(c, b)]) for b in SIZE_BUCKETS)
        out.append(f"| {c} | {_arrow(totals_r[c], totals_c[c])} | {r} | {p} |")
    out += [
        "",
        "## Frames and boxes per weather × time of day × scene",
        "",
        "| weather | time of day | scene | frames | " + " | ".join(bdd.DET_CLASSES) + " |",
        "|---" * (4 + len(bdd.DET_CLASSES)) + "|",
    ]
    for cell in combined.cells():
        counts = [_arrow(real.boxes[(cell, c)], combined.boxes[(cell, c)]) for c in bdd.DET_CLASSES]
        out.append(
            f"| {' | '.join(cell)} | {_arrow(real.frames[cell], combined.frames[cell])} | "
            + " | ".join(counts)
            + " |"
        )
    edits = Counter(e["op"] for s in scenes for e in s.layout.edits)
    out += [
        "",
        "## Layout edits",
        "",
        f"Edits made: {', '.join(f'{k} {v}' for k, v in sorted(edits.items())) or 'none'}. A moved or copied box "
        f"overlaps every other box with IoU <= {overlaps['limit']:.3f}: the {overlaps['quantile']:.2f} quantile of "
        "real boxes' largest IoU with another box of their frame (real quantiles: "
        + ", ".join(f"{k} {v:.3f}" for k, v in overlaps["real"].items())
        + f"). Largest IoU of a moved or copied box in the plan: {overlaps['planned_max']:.3f}.",
        "",
        f"Plot: `{PLOT_FILE}`; every cell and class as numbers: `{CSV_FILE}`.",
        "",
    ]
    return "\n".join(out)


def plot_png(real: Distribution, planned: Distribution) -> bytes:
    """Frames per weather x time of day before and after (one colour scale), boxes per class and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combined = real.merged(planned)
    weathers, times = _values(combined, "weather"), _values(combined, "timeofday")
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    top = np.log1p(max(combined.frames_by("weather", "timeofday").values(), default=1))
    for ax, dist, title in ((axes[0], real, "real frames"), (axes[1], combined, "real + planned frames")):
        by = dist.frames_by("weather", "timeofday")
        grid = np.array([[by[(w, t)] for t in times] for w in weathers], dtype=float)
        ax.imshow(np.log1p(grid), cmap="viridis", aspect="auto", vmin=0, vmax=top)
        for (r, c), v in np.ndenumerate(grid):
            colour = "white" if np.log1p(v) < top / 2 else "black"
            ax.text(c, r, f"{int(v)}", ha="center", va="center", color=colour)
        ax.set_xticks(range(len(times)), times, rotation=30)
        ax.set_yticks(range(len(weathers)), weathers)
        ax.set_title(title)
    x = np.arange(len(bdd.DET_CLASSES))
    colours = {"small": "#9ecae1", "medium": "#4292c6", "large": "#08519c"}
    for offset, dist, hatch, name in ((-0.2, real, "", "real"), (0.2, combined, "//", "real + planned")):
        sizes, bottom = dist.size_totals(), np.zeros(len(x))
        for bucket in SIZE_BUCKETS:
            values = np.array([sizes[(c, bucket)] for c in bdd.DET_CLASSES], dtype=float)
            axes[2].bar(
                x + offset,
                values,
                0.4,
                bottom=bottom,
                color=colours[bucket],
                hatch=hatch,
                edgecolor="white",
                label=f"{name}: {bucket}",
            )
            bottom += values
    axes[2].set_yscale("symlog")
    axes[2].set_xticks(x, bdd.DET_CLASSES, rotation=40, ha="right")
    axes[2].set_title("boxes per class and size (left: real, right hatched: real + planned)")
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python convert/plan_generation.py",
        description=__doc__.split("\n\n")[0],
        epilog="Every key of the targets file is documented in config/plan_targets.yaml.",
    )
    parser.add_argument("--bdd_data_dir", help="BDD100K root (holding images/ and labels/)")
    parser.add_argument(
        "--split", default="train", choices=("train", "val"), help="label split (default: train)"
    )
    parser.add_argument("--labels_file", help="label file or folder of per-image files to read instead")
    parser.add_argument("--targets", required=True, help="targets YAML (see config/plan_targets.yaml)")
    parser.add_argument("--out", required=True, help="plan folder (plan.jsonl, plan.json, report.md, ...)")
    parser.add_argument("--scenes", type=int, help="scenes to plan (default: the targets file's scenes)")
    parser.add_argument("--seed", type=int, help="seed (default: the targets file's seed)")
    parser.add_argument("--templates", help="caption templates YAML (default: config/caption_templates.yaml)")
    parser.add_argument(
        "--image_size",
        help="WxH of the layouts: the size the labels' boxes refer to, not a generation size (boxes are not "
        "scaled; generation scales the layouts). Default: the first image's size under images/, else 1280x720",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a plan made from other inputs")
    args = parser.parse_args(argv)
    if not args.bdd_data_dir and not args.labels_file:
        parser.error("pass --bdd_data_dir (or --labels_file)")
    if args.scenes is not None and args.scenes < 1:
        parser.error("--scenes must be >= 1")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def existing_rows(path: Path) -> list[str]:
    """The lines of an existing plan.jsonl ([] when there is none)."""
    if not path.is_file():
        return []
    return [line + "\n" for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    spec = load_targets(args.targets)  # a bad targets file fails before the labels are read
    seed = spec.seed if args.seed is None else args.seed
    n = args.scenes or spec.scenes
    if n is None:
        if any(t.scenes is None for t in spec.targets):
            raise UserError(
                f"{args.targets}: how many scenes? Set scenes: N in the file or pass --scenes N (without either, "
                "every target needs its own scenes: N, and their sum is the default)"
            )
        n = sum(t.scenes for t in spec.targets)
    templates = load_templates(args.templates)
    bdd_inputs = resolve_bdd_inputs(args.bdd_data_dir, args.split, args.labels_file, args.image_size)
    labels_file, size = bdd_inputs.labels_file, bdd_inputs.image_size
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")

    frames = read_real_frames(bdd.load_frames(labels_file), size)
    if not any(f.boxes for f in frames):
        raise UserError(f"{labels_file}: no frame has boxes of the detection classes; nothing to plan from")
    real = real_distribution(frames)
    log.info("read %d frames from %s (layout size %dx%d)", len(frames), labels_file, *size)
    print(f"real frames per weather x time of day ({labels_file}):\n{print_table(real)}")
    totals = real.class_totals()
    print("real boxes per class: " + ", ".join(f"{c} {totals[c]}" for c in bdd.DET_CLASSES))

    overlaps = overlap_stats(frames)
    q = spec.edits.overlap_quantile
    limit = float(np.quantile(overlaps, q)) if len(overlaps) else 0.0
    counter = load_token_counter()
    builder = CaptionBuilder(templates, counter, size)
    planner = Planner(spec, frames, size, seed, builder, limit, str(labels_file))
    scenes = planner.build(n)
    save_token_counter(counter)
    lines = plan_lines(scenes)

    # A rerun extends the plan: its first rows must be the ones on disk.
    old = existing_rows(out / PLAN_FILE)
    prefix = min(len(old), len(lines))
    if old[:prefix] != lines[:prefix] and not args.overwrite:
        row = next(i for i in range(prefix) if old[i] != lines[i])
        raise UserError(
            f"{out / PLAN_FILE} holds another plan (row {row} differs: made from other labels, targets, seed or "
            "templates); nothing was written: use another --out, or pass --overwrite to replace it"
        )
    if len(old) > len(lines) and not args.overwrite:
        print(
            f"{out / PLAN_FILE} already holds {len(old)} scenes, these {len(lines)} among them: left as it is"
        )
        return 0
    if len(lines) < n:
        print(
            f"the targets take {len(lines)} scenes in all (each has its scenes: N); planned {len(lines)} of {n}"
        )

    planned = plan_distribution(scenes)
    placed = [
        float(largest_ious(s.layout.boxes)[i]) for s in scenes for i in s.layout.placed
    ]  # the IoU of each moved or copied box with its nearest neighbour
    overlap_info = {
        "quantile": q,
        "limit": round(limit, 6),
        "real": {
            f"q{int(p * 100)}": round(float(np.quantile(overlaps, p)), 6) if len(overlaps) else 0.0
            for p in (0.5, 0.9, 0.95, 0.99)
        }
        | {"max": round(float(overlaps.max(initial=0.0)), 6)},
        "planned_max": round(max(placed, default=0.0), 6),
    }
    inputs = {
        "labels_file": str(labels_file),
        "frames": len(frames),
        "size": list(size),
        "targets_file": str(args.targets),
        "seed": seed,
    }
    combined = real.merged(planned)
    summary = {
        "version": PLAN_VERSION,
        "inputs": inputs,
        "scenes": len(scenes),
        "targets": [
            {
                "name": s.target.name,
                "require": s.require,
                "planned": s.planned,
                "cells": [
                    {"cell": c, "real": r, "planned": p, "combined": r + p}
                    for c, r, p in zip(s.cells, s.real, s.planned_in_cell, strict=True)
                ],
            }
            for s in planner.states
        ],
        "frames_by_weather_timeofday": [
            {
                "weather": w,
                "timeofday": t,
                "real": real.frames_by("weather", "timeofday")[(w, t)],
                "combined": v,
            }
            for (w, t), v in sorted(combined.frames_by("weather", "timeofday").items(), key=lambda kv: kv[0])
        ],
        "boxes_by_class": {
            c: {"real": real.class_totals()[c], "combined": combined.class_totals()[c]}
            for c in bdd.DET_CLASSES
        },
        "overlap": overlap_info,
        "edits": dict(sorted(Counter(e["op"] for s in scenes for e in s.layout.edits).items())),
        "settings": spec.model_dump(mode="json"),
    }

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PLAN_FILE, "".join(lines))
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / CSV_FILE, distribution_csv(real, planned))
    atomic_write_text(
        out / REPORT_FILE, report_markdown(real, planned, planner.states, scenes, overlap_info, inputs)
    )
    atomic_write_bytes(out / PLOT_FILE, plot_png(real, planned))

    kept = len(old) if old == lines[: len(old)] else 0  # 0: replaced (--overwrite)
    print(f"planned {len(scenes)} scenes ({kept} kept from the plan on disk) -> {out / PLAN_FILE}")
    for s in planner.states:
        changed = [
            f"{cell_name(c)} {r} -> {r + p}"
            for c, r, p in zip(s.cells, s.real, s.planned_in_cell, strict=True)
            if p
        ]
        print(f"  {s.target.name}: {s.planned} scenes; " + ("; ".join(changed) or "no cell changed"))
    print(f"report: {out / REPORT_FILE}, {out / CSV_FILE}, {out / PLOT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
