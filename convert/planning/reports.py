"""The reports of a generation plan: its distribution table (CSV), report (Markdown), plot (PNG) and summary.

Numbers read 'real → real + planned' where the plan adds some. The tables and the figure go through core.report
(the Markdown tables and PNG figures every stage writes); matplotlib is imported only when the plot is drawn.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from convert.planning import CSV_FILE, PLAN_FILE, PLAN_VERSION, PLOT_FILE
from convert.planning.boxes import containments, largest_ious
from convert.planning.planner import Distribution, PlannedScene, TargetState
from convert.planning.targets import CELL_KEYS, DEFINED, PlanTargets, cell_name
from core.report import markdown_table, save_figure, subplots
from vocab import bdd

#: COCO's area thresholds (pixels) for small / medium / large boxes.
SIZE_BUCKETS = bdd.COCO_SIZES
PLOT_DPI = 90
#: A moved or copied box this much inside another box (or holding one this much inside it) is counted in the
#: report: a car inside a car.
CONTAINED = 0.9


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
    rows = []
    for w in _values(combined, "weather"):
        row = [_arrow(before[(w, t)], after[(w, t)]) for t in times]
        total = _arrow(sum(before[(w, t)] for t in times), sum(after[(w, t)] for t in times))
        rows.append([w, *row, total])
    return markdown_table(["weather \\ time of day", *times, "all"], rows)


def weather_time_text(real: Distribution) -> str:
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
    """report.md: frames per weather x time of day, the targets' cells, boxes per class and size, every cell, the
    edits and the overlaps (``overlaps``: :func:`overlap_summary`), each 'real → real + planned'."""
    combined = real.merged(planned)
    targets = []
    for s in states:
        required = ", ".join(f"{n} {c}" for c, n in s.target.require.items()) or "-"
        for cell, r, own, others in s.cell_counts():
            targets.append([s.target.name, cell_name(cell), required, r, own, others, r + own + others])
    totals_r, totals_c = real.class_totals(), combined.class_totals()
    sizes_r, sizes_p = real.size_totals(), planned.size_totals()
    classes = [
        [
            c,
            _arrow(totals_r[c], totals_c[c]),
            " / ".join(str(sizes_r[(c, b)]) for b in SIZE_BUCKETS),
            " / ".join(str(sizes_p[(c, b)]) for b in SIZE_BUCKETS),
        ]
        for c in bdd.DET_CLASSES
    ]
    cells = [
        [
            *cell,
            _arrow(real.frames[cell], combined.frames[cell]),
            *(_arrow(real.boxes[(cell, c)], combined.boxes[(cell, c)]) for c in bdd.DET_CLASSES),
        ]
        for cell in combined.cells()
    ]
    edits = Counter(e["op"] for s in scenes for e in s.layout.edits)
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
        "`planned`: this target's scenes in the cell; `other targets`: scenes other targets placed that fit the "
        "cell too (they count toward its frames when the cell's next scene is chosen).",
        "",
        *markdown_table(
            ["target", "cell", "required", "real", "planned", "other targets", "combined"], targets
        ),
        "",
        "## Boxes per class and size (small < 32², medium < 96², large: COCO's areas in layout pixels)",
        "",
        *markdown_table(
            ["class", "boxes", "real small / medium / large", "planned small / medium / large"], classes
        ),
        "",
        "## Frames and boxes per weather × time of day × scene",
        "",
        *markdown_table(["weather", "time of day", "scene", "frames", *bdd.DET_CLASSES], cells),
        "",
        "## Layout edits",
        "",
        f"Edits made: {', '.join(f'{k} {v}' for k, v in sorted(edits.items())) or 'none'}. A moved or copied box "
        f"overlaps every other box with IoU <= {overlaps['limit']:.3f}: the {overlaps['quantile']:.2f} quantile of "
        "real boxes' largest IoU with another box of their frame (real quantiles: "
        + ", ".join(f"{k} {v:.3f}" for k, v in overlaps["real"].items())
        + f"). Largest IoU of a moved or copied box in the plan: {overlaps['planned_max']:.3f}.",
        "",
        containment_text(overlaps["containment"]),
        "",
        f"Plot: `{PLOT_FILE}`; every cell and class as numbers: `{CSV_FILE}`.",
        "",
    ]
    return "\n".join(out)


def containment_text(containment: dict[str, Any]) -> str:
    """The report's paragraph on the containment limit (``containment``: :func:`overlap_summary`'s)."""
    inside = containment[f"placed_{int(CONTAINED * 100)}_percent_inside"]
    return (
        f"Neither a moved or copied box nor another box lies more than {containment['limit']:.0%} inside the other "
        f"(intersection over the smaller box's area; IoU alone lets a small car sit wholly inside a large one): "
        f"{containment['refused_placements']} moves or copies found no place because of it "
        f"({containment['refused_places']} places refused that the IoU limit allowed). Of the "
        f"{containment['placed']} moved or copied boxes, {inside} are >= {CONTAINED:.0%} inside another box or hold "
        f"one that much inside them; the largest containment is {containment['planned_max']:.3f}."
    )


def distribution_figure(real: Distribution, planned: Distribution):
    """The plot: frames per weather x time of day before and after (two heat maps, one colour scale, the counts
    written in the cells), then one panel per class with its boxes per size, real beside real + planned, on the
    panel's own linear axis (class totals span orders of magnitude: one shared or logarithmic axis hides the small
    classes or the planned additions), the real count and what the plan adds written above each pair."""
    combined = real.merged(planned)
    weathers, times = _values(combined, "weather"), _values(combined, "timeofday")
    fig, ax = subplots(figsize=(18, 13))
    ax.remove()  # the figure's panels are laid out on the grid below
    grid = fig.add_gridspec(3, 10, height_ratios=[1.3, 1, 1])
    top = np.log1p(max(combined.frames_by("weather", "timeofday").values(), default=1))
    for k, (dist, title) in enumerate(((real, "real frames"), (combined, "real + planned frames"))):
        ax = fig.add_subplot(grid[0, 5 * k : 5 * k + 5])
        by = dist.frames_by("weather", "timeofday")
        counts = np.array([[by[(w, t)] for t in times] for w in weathers], dtype=float)
        ax.imshow(np.log1p(counts), cmap="viridis", aspect="auto", vmin=0, vmax=top)
        for (r, c), v in np.ndenumerate(counts):
            colour = "white" if np.log1p(v) < top / 2 else "black"
            ax.text(c, r, f"{int(v)}", ha="center", va="center", color=colour)
        ax.set_xticks(range(len(times)), times, rotation=30)
        ax.set_yticks(range(len(weathers)), weathers)
        ax.set_title(f"{title} per weather x time of day")
    x = np.arange(len(SIZE_BUCKETS))
    sizes_r, sizes_c = real.size_totals(), combined.size_totals()
    totals_r, totals_c = real.class_totals(), combined.class_totals()
    for k, cls in enumerate(bdd.DET_CLASSES):
        ax = fig.add_subplot(grid[1 + k // 5, 2 * (k % 5) : 2 * (k % 5) + 2])
        before = [sizes_r[(cls, b)] for b in SIZE_BUCKETS]
        after = [sizes_c[(cls, b)] for b in SIZE_BUCKETS]
        ax.bar(x - 0.2, before, 0.4, color="#4292c6", label="real")
        ax.bar(x + 0.2, after, 0.4, color="#fd8d3c", label="real + planned")
        for pos, b, a in zip(x, before, after, strict=True):  # one label per pair: 70k-frame counts are wide
            ax.text(pos, a, f"{b}\n+{a - b}" if a > b else str(b), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, max(max(after), 1) * 1.3)  # room for the labels above the bars
        ax.set_xticks(x, SIZE_BUCKETS)
        ax.set_title(f"{cls}: {_arrow(totals_r[cls], totals_c[cls])} boxes", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.yaxis.get_major_locator().set_params(integer=True)  # counts: no 0.2-box ticks
        if k == 0:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def save_plot(real: Distribution, planned: Distribution, path: str | os.PathLike) -> None:
    """Write :func:`distribution_figure` as a PNG, atomically."""
    save_figure(distribution_figure(real, planned), path, dpi=PLOT_DPI)


def overlap_summary(
    overlaps: np.ndarray,
    quantile: float,
    limit: float,
    containment_limit: float,
    scenes: Sequence[PlannedScene],
) -> dict[str, Any]:
    """The overlap limit, the real overlaps' quantiles and the plan's largest overlap of a moved or copied box; the
    containment limit, what it refused and how many moved or copied boxes are >= 90 % inside another box or
    hold one >= 90 % inside them (:data:`CONTAINED`)."""
    placed_iou, placed_containment = [], []
    for s in scenes:
        largest = largest_ious(s.layout.boxes)
        for i in s.layout.placed:
            placed_iou.append(
                float(largest[i])
            )  # the IoU of each moved or copied box with its nearest neighbour
            others = s.layout.others(skip=i)
            placed_containment.append(
                float(containments(s.layout.boxes[i].continuous, others).max(initial=0.0))
            )
    return {
        "quantile": quantile,
        "limit": round(limit, 6),
        "real": {
            f"q{int(p * 100)}": round(float(np.quantile(overlaps, p)), 6) if len(overlaps) else 0.0
            for p in (0.5, 0.9, 0.95, 0.99)
        }
        | {"max": round(float(overlaps.max(initial=0.0)), 6)},
        "planned_max": round(max(placed_iou, default=0.0), 6),
        "containment": {
            "limit": containment_limit,
            "refused_placements": sum(s.layout.refused_placements for s in scenes),
            "refused_places": sum(s.layout.refused_places for s in scenes),
            "placed": len(placed_containment),
            f"placed_{int(CONTAINED * 100)}_percent_inside": sum(c >= CONTAINED for c in placed_containment),
            "planned_max": round(max(placed_containment, default=0.0), 6),
        },
    }


def plan_summary(
    spec: PlanTargets,
    inputs: dict[str, Any],
    real: Distribution,
    planned: Distribution,
    states: Sequence[TargetState],
    scenes: Sequence[PlannedScene],
    overlaps: dict[str, Any],
) -> dict[str, Any]:
    """plan.json: the inputs, the per-target and per-cell counts before and after, the edits and the settings."""
    combined = real.merged(planned)
    return {
        "version": PLAN_VERSION,
        "inputs": inputs,
        "scenes": len(scenes),
        "targets": [
            {
                "name": s.target.name,
                "require": s.require,
                "planned": s.planned,
                "cells": [
                    {
                        "cell": c,
                        "real": r,
                        "planned": own,
                        "other_targets": others,
                        "combined": r + own + others,
                    }
                    for c, r, own, others in s.cell_counts()
                ],
            }
            for s in states
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
        "overlap": overlaps,
        "edits": dict(sorted(Counter(e["op"] for s in scenes for e in s.layout.edits).items())),
        "settings": spec.model_dump(mode="json"),
    }
