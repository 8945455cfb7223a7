"""The planner of generation plans: the real frames, their distribution, and the scenes planned toward targets.

Scene i depends only on the seed, the inputs and scenes 0..i-1: targets take turns by weight, a target fills its
emptiest cell first, source frames come from a per-seed shuffle of each target's pool, edits from a generator
seeded by (seed, i). So the same seed gives the same plan, and a plan of more scenes extends one of fewer.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convert.captions import CaptionBuilder
from convert.planning.boxes import Box, class_counts, frame_boxes, largest_ious
from convert.planning.editor import EditedLayout, Editor
from convert.planning.targets import (
    CELL_KEYS,
    PlanTargets,
    Target,
    cell_name,
    cell_order,
    holds,
    in_cell,
    matches,
)
from core.cli import UserError
from vocab import bdd

#: The passes over the real frames and the planning loop show a progress bar (tqdm, on stderr) from these sizes
#: up: det_train's 70k frames take seconds to tens of seconds per pass; tests and the demo stay quiet.
PROGRESS_FRAMES = 5000
PROGRESS_SCENES = 500


def progress(items: Sequence, desc: str, unit: str = "frame", least: int = PROGRESS_FRAMES):
    """``items`` wrapped in a tqdm bar on stderr, switched off below ``least`` items."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, total=len(items), disable=len(items) < least, file=sys.stderr)


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
    for frame in progress(frames, "reading boxes"):
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


def overlap_stats(frames: Sequence[RealFrame]) -> np.ndarray:
    """Every real box's largest IoU with another box of its frame."""
    parts = [largest_ious(f.boxes) for f in progress(frames, "measuring overlaps") if len(f.boxes) > 1]
    singles = sum(len(f.boxes) for f in frames if len(f.boxes) == 1)
    return np.concatenate([*parts, np.zeros(singles)]) if parts or singles else np.zeros(0)


def overlap_limit(overlaps: np.ndarray, quantile: float) -> float:
    """The largest IoU a moved or copied box may have with another box: the ``quantile`` of the real overlaps."""
    return float(np.quantile(overlaps, quantile)) if len(overlaps) else 0.0


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TargetState:
    """A target while the plan is built: its cells' counts (real + planned so far) and its source pools.

    A cell's frames so far are its real frames plus the planned scenes of *every* target that fit it
    (``planned_in_cell``: what the cell choice balances); the target's own scenes per cell (``own_in_cell``) are
    what the reports credit it with. They differ where targets share cells: a uniform target's cells also count
    the scenes another target placed in them.
    """

    index: int
    target: Target
    cells: list[dict[str, str]]
    real: list[int]  # real frames per cell that match it and the required counts
    planned_in_cell: list[int]  # planned scenes (of any target) that match each cell
    pools: dict[str | None, list[int]]  # scene (or None: any) -> real frame indices that can serve as layouts
    orders: dict[str | None, np.ndarray] = field(default_factory=dict)  # each pool's per-seed shuffle
    cursors: Counter = field(default_factory=Counter)
    planned: int = 0
    own_in_cell: list[int] = field(default_factory=list)  # this target's scenes per cell

    def __post_init__(self) -> None:
        if not self.own_in_cell:
            self.own_in_cell = [0] * len(self.cells)

    def cell_counts(self) -> list[tuple[dict[str, str], int, int, int]]:
        """Per cell: (cell, real frames, this target's scenes, scenes of other targets that fit the cell); the
        cell's combined count is real + own + others."""
        return [
            (c, r, own, every - own)
            for c, r, own, every in zip(
                self.cells, self.real, self.own_in_cell, self.planned_in_cell, strict=True
            )
        ]

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
    layout: EditedLayout
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
        from tqdm import tqdm

        with tqdm(
            total=n, initial=len(self.scenes), desc="planning", unit="scene", disable=n < PROGRESS_SCENES
        ) as bar:
            while len(self.scenes) < n:
                state = self.next_target()
                if state is None:
                    break
                self.scenes.append(self.plan_scene(len(self.scenes), state))
                bar.update()
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
        state.own_in_cell[k] += 1
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


def real_distribution(frames: Sequence[RealFrame]) -> Distribution:
    dist = Distribution()
    for f in progress(frames, "counting frames and boxes"):
        dist.add(f.attributes, f.boxes)
    return dist


def plan_lines(scenes: Iterable[PlannedScene]) -> list[str]:
    return [json.dumps(s.row(), ensure_ascii=False) + "\n" for s in scenes]
