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
  overlap their neighbours (the ``edits.overlap_quantile`` of the real data's per-box largest IoU) and where
  neither it nor another box lies more than ``edits.containment_limit`` inside the other;
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
``distribution.png`` (before/after plot); all atomically. Reading det_train's 70k frames takes tens of seconds:
the passes over the labels and the planning loop show progress bars on stderr (from 5,000 frames / 500 scenes).

This script reads the inputs, plans and saves; the parts are in convert/planning/: the boxes (``boxes.py``), the
targets file's schema and cells (``targets.py``), the layout editor (``editor.py``), the planner (``planner.py``)
and the reports (``reports.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from convert.bdd_inputs import resolve_bdd_inputs
from convert.captions import CaptionBuilder, load_templates, load_token_counter, save_token_counter
from convert.planning import CSV_FILE, PLAN_FILE, PLOT_FILE, REPORT_FILE, SUMMARY_FILE
from convert.planning.planner import (
    PROGRESS_FRAMES,
    Planner,
    overlap_limit,
    overlap_stats,
    plan_distribution,
    plan_lines,
    progress,
    read_real_frames,
    real_distribution,
)
from convert.planning.reports import (
    distribution_csv,
    overlap_summary,
    plan_summary,
    report_markdown,
    save_plot,
    weather_time_text,
)
from convert.planning.targets import PlanTargets, cell_name, load_targets
from core.cli import UserError, run_main, setup_logging
from core.io import atomic_write_text
from vocab import bdd

log = logging.getLogger("bdd-sdxl.plan")


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


def load_labels(path: Path) -> list[bdd.Frame]:
    """The real labels' frames (``bdd.load_frames``); a folder of per-image files (the 2018 release: 70k of them)
    is read file by file under a progress bar, one large file in one go after a log line (no bar: one decode)."""
    if path.is_dir():
        files = bdd.label_folder_files(path)
        if len(files) >= PROGRESS_FRAMES:
            frames: list[bdd.Frame] = []
            for file in progress(files, "reading label files", unit="file"):
                frames += bdd.decode_frames(file.read_bytes(), file)
            return frames
    elif path.is_file():
        log.info("reading %s (%.0f MB)", path, path.stat().st_size / 1e6)
    return bdd.load_frames(path)


def scene_count(spec: PlanTargets, scenes: int | None, targets_file: str) -> int:
    """How many scenes to plan: ``--scenes``, else the file's ``scenes:``, else the sum of the targets' own."""
    n = scenes or spec.scenes
    if n is None:
        if any(t.scenes is None for t in spec.targets):
            raise UserError(
                f"{targets_file}: how many scenes? Set scenes: N in the file or pass --scenes N (without either, "
                "every target needs its own scenes: N, and their sum is the default)"
            )
        n = sum(t.scenes for t in spec.targets)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    # Inputs: the targets file first (a bad one fails before the labels are read), then templates and labels.
    spec = load_targets(args.targets)
    seed = spec.seed if args.seed is None else args.seed
    n = scene_count(spec, args.scenes, args.targets)
    templates = load_templates(args.templates)
    bdd_inputs = resolve_bdd_inputs(args.bdd_data_dir, args.split, args.labels_file, args.image_size)
    labels_file, size = bdd_inputs.labels_file, bdd_inputs.image_size
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    frames = read_real_frames(load_labels(Path(labels_file)), size)
    if not any(f.boxes for f in frames):
        raise UserError(f"{labels_file}: no frame has boxes of the detection classes; nothing to plan from")
    real = real_distribution(frames)
    log.info("read %d frames from %s (layout size %dx%d)", len(frames), labels_file, *size)
    print(f"real frames per weather x time of day ({labels_file}):\n{weather_time_text(real)}")
    totals = real.class_totals()
    print("real boxes per class: " + ", ".join(f"{c} {totals[c]}" for c in bdd.DET_CLASSES))

    # Plan: copies and moves may overlap other boxes as much as real boxes overlap their neighbours.
    overlaps = overlap_stats(frames)
    limit = overlap_limit(overlaps, spec.edits.overlap_quantile)
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

    # Save: every file atomically.
    planned = plan_distribution(scenes)
    overlap_info = overlap_summary(
        overlaps, spec.edits.overlap_quantile, limit, spec.edits.containment_limit, scenes
    )
    inputs = {
        "labels_file": str(labels_file),
        "frames": len(frames),
        "size": list(size),
        "targets_file": str(args.targets),
        "seed": seed,
    }
    summary = plan_summary(spec, inputs, real, planned, planner.states, scenes, overlap_info)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PLAN_FILE, "".join(lines))
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / CSV_FILE, distribution_csv(real, planned))
    atomic_write_text(
        out / REPORT_FILE, report_markdown(real, planned, planner.states, scenes, overlap_info, inputs)
    )
    save_plot(real, planned, out / PLOT_FILE)

    # Summary: scenes kept and planned, the cells each target changed.
    kept = len(old) if old == lines[: len(old)] else 0  # 0: replaced (--overwrite)
    print(f"planned {len(scenes)} scenes ({kept} kept from the plan on disk) -> {out / PLAN_FILE}")
    for s in planner.states:
        changed = [
            f"{cell_name(c)} {r} -> {r + own + others}"
            + (f" ({others} of them from other targets)" if others else "")
            for c, r, own, others in s.cell_counts()
            if own
        ]
        print(f"  {s.target.name}: {s.planned} scenes; " + ("; ".join(changed) or "no cell changed"))
    print(f"report: {out / REPORT_FILE}, {out / CSV_FILE}, {out / PLOT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
