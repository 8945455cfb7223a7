"""The layout editor of generation plans: a real frame's boxes mirrored, thinned out, moved and copied.

:class:`Editor` applies the targets file's ``edits:`` (:class:`~convert.planning.targets.Edits`) to one
scene's layout with that scene's own random generator. Moves and copies shift a box along its own image rows,
within the span that road users stand in near its baseline, to a place where it overlaps no box more than real
boxes overlap their neighbours (the overlap limit, an IoU) and neither it nor another box lies mostly inside the
other (the containment limit: IoU alone lets a small car sit wholly inside a large one). The layout being edited
is an :class:`EditedLayout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convert.planning.boxes import ROAD_USERS, Box, class_counts, containments, intersects, ious, round_coord
from convert.planning.targets import Edits


@dataclass
class EditedLayout:
    """A layout being edited: its boxes (copies appended), its pixel size, the edits made (in order), which
    boxes were moved or copied (these are not moved or copied again) and what the containment limit refused."""

    boxes: list[Box]
    size: tuple[int, int]
    edits: list[dict[str, Any]] = field(default_factory=list)
    placed: list[int] = field(default_factory=list)  # indices of moved and copied boxes
    # places the overlap limit allowed and the containment limit refused; moves and copies left with no place
    # because of it (every place the overlap limit allowed was refused). For the report, not in plan.jsonl.
    refused_places: int = 0
    refused_placements: int = 0

    def others(self, skip: int | None = None) -> np.ndarray:
        """Every box but ``skip`` as continuous boxes (N x 4), for :func:`~convert.planning.boxes.ious`."""
        return np.array(
            [b.continuous for i, b in enumerate(self.boxes) if i != skip], dtype=np.float64
        ).reshape(-1, 4)


class Editor:
    """Applies :class:`Edits` to layouts: the same rules for every scene, a scene's own generator for the draws."""

    def __init__(self, edits: Edits, overlap_limit: float, class_weights: dict[str, float]):
        self.e = edits
        self.limit = overlap_limit
        self.containment_limit = edits.containment_limit
        self.editable = frozenset(edits.classes)
        self.class_weights = class_weights  # for optional copies: rare classes are copied more often

    def movable(self, layout: EditedLayout, i: int) -> bool:
        """Whether box ``i`` may be moved or copied: an editable class, not cut by the frame's edge, and clear of
        every other road user (a rider and its bicycle, or a pedestrian in front of a car, stay together)."""
        box = layout.boxes[i]
        w, h = layout.size
        if box.ignored or box.det_class not in self.editable or box.truncated:
            return False
        if box.x1 <= 0 or box.y1 <= 0 or box.x2 >= w - 1 or box.y2 >= h - 1:
            return False
        return not any(
            j != i and other.det_class in ROAD_USERS and intersects(box, other)
            for j, other in enumerate(layout.boxes)
        )

    def span(self, layout: EditedLayout, box: Box) -> tuple[float, float]:
        """Where along its rows ``box`` may stand: the x range of road users whose baseline (y2) is within
        ``baseline_tolerance`` box heights of its own, widened by ``span_margin`` box widths, inside the image."""
        tol = self.e.baseline_tolerance * box.height
        near = [b for b in layout.boxes if b.det_class in ROAD_USERS and abs(b.y2 - box.y2) <= tol]
        near.append(box)
        margin = self.e.span_margin * box.width
        lo = max(0.0, min(b.x1 for b in near) - margin)
        hi = min(layout.size[0] - 1.0, max(b.x2 for b in near) + margin)
        return lo, hi

    def free_shifts(self, layout: EditedLayout, i: int, *, copy: bool) -> tuple[list[float], int]:
        """The horizontal shifts that put box ``i`` (or its copy) in a free place on its rows, and how many places
        the overlap limit allowed and the containment limit refused.

        Candidates lie on a grid of a quarter box width within :meth:`span`; a candidate is free when its IoU with
        every other box (the original too, for a copy) is at most the real data's overlap limit and their
        containment (intersection over the smaller box's area) at most ``edits.containment_limit``. A move goes
        at least one box width.
        """
        box = layout.boxes[i]
        lo, hi = self.span(layout, box)
        step = max(1.0, box.width / 4)
        k_lo = math.ceil((lo - box.x1) / step)
        k_hi = math.floor((hi - box.x2) / step)
        if k_hi < k_lo:
            return [], 0
        shifts = np.arange(k_lo, k_hi + 1, dtype=np.float64) * step
        shifts = shifts[np.abs(shifts) >= (box.width if not copy else 1e-9)]
        others = layout.others(skip=None if copy else i)
        free, refused = [], 0
        for dx in shifts.tolist():
            candidate = box.shifted(dx).continuous
            if ious(candidate, others).max(initial=0.0) > self.limit + 1e-9:
                continue
            if containments(candidate, others).max(initial=0.0) > self.containment_limit + 1e-9:
                refused += 1
                continue
            free.append(dx)
        return free, refused

    def place(self, layout: EditedLayout, i: int, rng: np.random.Generator, *, copy: bool) -> float | None:
        """A shift drawn at random from :meth:`free_shifts`, or None when there is none; refusals by containment
        are counted on ``layout``."""
        free, refused = self.free_shifts(layout, i, copy=copy)
        layout.refused_places += refused
        if not free:
            layout.refused_placements += refused > 0
            return None
        return round_coord(free[int(rng.integers(len(free)))])

    # -- the edits ------------------------------------------------------------------------------------------

    def mirror(self, layout: EditedLayout) -> None:
        layout.boxes = [b.mirrored(layout.size[0]) for b in layout.boxes]
        layout.edits.append({"op": "mirror"})

    def remove(self, layout: EditedLayout, rng: np.random.Generator, keep: set[str]) -> None:
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

    def move(self, layout: EditedLayout, rng: np.random.Generator) -> None:
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

    def duplicate(self, layout: EditedLayout, rng: np.random.Generator, det_class: str | None = None) -> bool:
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

    def edit(
        self, boxes: list[Box], size: tuple[int, int], require: dict[str, int], rng
    ) -> EditedLayout | None:
        """The edited layout of one scene, or None when the required counts cannot be reached by copies."""
        layout = EditedLayout(list(boxes), size)
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
