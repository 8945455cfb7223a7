"""Write real BDD100K frames as a YOLO detection dataset, in the form stage 4 writes generated ones.

Usage:
    python convert/bdd_to_yolo.py --bdd_data_dir bdd100k --split val --out real_yolo [--max_frames N] \\
        [--labels_file F] [--images_dir D] [--copy] [--overwrite] [--classes car bus] [--min_box_side PX] \\
        [--include_unlabeled]
    python -m convert.bdd_to_yolo ...   (the same)
    python convert/bdd_to_yolo.py --config config/bdd_to_yolo.yaml [--split val] [--check] [key=value ...]

Settings come from a YAML config (config/bdd_to_yolo.yaml documents every key; :class:`ExportConfig` is its
schema), the flags (each another spelling of a key; ``--copy`` is ``copy_images``) and ``key=value`` overrides, in
that order; ``--check`` validates them, finds the labels and images and exits.

Reads the split's labels as every stage does (``labels/det_20/det_<split>.json``, else the legacy 2018 file, else
the per-image 2018 folder ``labels/100k/<split>/``; --labels_file names any of them, Scalabel exports included)
and the images in ``images/100k/<split>`` (else ``images/10k/<split>``; --images_dir names another folder).
Writes, under --out:

    images/<split>/<stem>.jpg    the frame's image, hard-linked (no copy, no extra disk; --copy copies; across
                                 file systems it is copied, and the summary says so)
    labels/<split>/<stem>.txt    YOLO ``cls cx cy w h`` (normalised, %.6f), stage 4's ids (vocab.bdd.DET_CLASSES:
                                 0 pedestrian ... 9 traffic sign); empty for a frame without boxes of those classes
    ignore/<split>/<stem>.txt    the frame's ignore regions in the same form, only for a frame that has any: what
                                 annotation/metrics.py scores as COCO crowd boxes (ultralytics never reads it)
    frames.csv                   ``split,image,weather,timeofday,scene``: one row per frame written, ``image``
                                 relative to --out (``images/val/<stem>.jpg``), for evaluations sliced by condition
    data.yaml                    absolute ``path``, ``train``/``val`` (and ``test``) for the splits present, the 10
                                 names in stage 4's order, no download key

Run it once per split into the same --out to get several splits (frames.csv and data.yaml cover every split present;
ultralytics needs both ``train`` and ``val``, so with one split written both name it, and data.yaml says so).

What goes in: boxes of the 10 detection classes (legacy names mapped: person -> pedestrian, bike -> bicycle, ...),
clipped to the image (counted). Ignore regions (vocab.bdd.is_crowd_region: det_20's other person, other vehicle,
trailer as pedestrian, car, truck, and boxes whose attributes say ``crowd``/``Crowd``/``ignored``, as tracking and
Scalabel exports write them) are no training boxes: they go, clipped, to ignore/<split>/ and are counted by
category, as the BDD100K toolkit's evaluation keeps them (a detection on one is neither a hit nor a false
positive). Boxes wholly outside the image and (with --min_box_side) boxes whose clipped side is shorter are
dropped and counted. Frames whose ``labels`` are absent, null or [] are skipped (counted by reason) unless --include_unlabeled
(then they get an empty label file); frames whose image is missing are skipped, counted and a few are listed.
--classes keeps only those classes' boxes (ids stay stage 4's). --max_frames N keeps the first N frames by name
(image stem) of those that would be written: deterministic, and a larger N extends a smaller one's set.

Reruns: identical outputs are left alone, and missing ignore files are added (an export written before they existed
gets them from a plain rerun); a frame whose label, ignore file, image or frames.csv row differs, and frames of this
split on disk that this run would not write (a smaller --max_frames, say), stop the run before anything is written
unless --overwrite (which replaces or removes them and drops ultralytics' stale ``labels/<split>.cache``). Every
file is written atomically. Progress bars on a terminal (the label file read, the per-frame passes); ends with a
summary; bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import filecmp
import io
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from convert.bdd_inputs import find_labels
from core.cli import UserError, run_main, setup_logging
from core.config import Section, add_config_arguments, flag_values, load_config
from core.io import atomic_write_text, link_or_copy
from vocab import bdd

log = logging.getLogger("bdd-sdxl.convert")
FRAMES_CSV = "frames.csv"
IGNORE_DIR = "ignore"  # annotation/metrics.py's IGNORE_DIR (convert/ cannot import annotation/)
FRAMES_COLUMNS = ("split", "image", "weather", "timeofday", "scene")
DATA_YAML = "data.yaml"
YAML_SPLITS = ("train", "val", "test")
SHOW = 5  # how many names a summary line lists


class ExportConfig(Section):
    """What is written: the schema of config/bdd_to_yolo.yaml (each flag is another spelling of one key)."""

    bdd_data_dir: str | None = None  # BDD100K root: labels and images found as every stage finds them
    split: Literal[bdd.SPLITS]
    out: str  # the dataset folder; several splits can share it
    labels_file: str | None = None  # instead of the one found under bdd_data_dir
    images_dir: str | None = None  # instead of images/100k/<split> (else images/10k/<split>)
    classes: list[str] | None = None  # keep only these classes' boxes (ids stay stage 4's); None: all 10
    min_box_side: float = Field(0.0, ge=0.0)  # clipped box side in pixels below which a box is left out
    skip_empty: bool = False  # leave out frames without a kept box (the demo detector's train split)
    include_unlabeled: bool = False  # frames without labels get an empty label file
    max_frames: int | None = Field(None, ge=1)  # the first N frames by name
    copy_images: bool = False  # copy instead of hard-linking
    overwrite: bool = False  # replace differing files, remove stale frames

    @field_validator("classes")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name not in bdd.DET_CLASS_YOLO_ID:
                raise ValueError(
                    f"--classes: {name!r} is not a BDD100K detection class ({', '.join(bdd.DET_CLASSES)})"
                )
        return value

    @model_validator(mode="after")
    def _inputs(self) -> ExportConfig:
        if not self.bdd_data_dir and not (self.labels_file and self.images_dir):
            raise ValueError("set bdd_data_dir (--bdd_data_dir), or both labels_file and images_dir")
        return self


@dataclass
class FrameFile:
    """One frame to write: its image (placed), its label file and its frames.csv row."""

    stem: str
    source: Path
    image: Path  # under out
    label: Path
    text: str
    row: tuple[str, str, str, str, str]
    ignore: Path  # the ignore-region side file
    ignore_text: str  # "" for none: no file


@dataclass
class BoxCounts:
    """What happened to the boxes of the frames written."""

    boxes: Counter = field(default_factory=Counter)  # class -> boxes written
    crowd: Counter = field(default_factory=Counter)  # category (or "<class> crowd") -> ignore regions written
    dropped: Counter = field(default_factory=Counter)  # reason -> boxes dropped (outside, small, class)
    clipped: int = 0

    def add(self, other: BoxCounts) -> None:
        self.boxes.update(other.boxes)
        self.crowd.update(other.crowd)
        self.dropped.update(other.dropped)
        self.clipped += other.clipped


@dataclass
class Report:
    split: str
    labels_file: Path
    images_dir: Path
    frames: int = 0
    written: int = 0
    unchanged: int = 0
    replaced: int = 0
    removed: int = 0
    copied: int = 0
    linked: int = 0
    copy_reason: str = ""
    empty_labels: int = 0
    not_selected: int = 0
    no_boxes_skipped: int = 0
    ignore_files_written: int = 0
    ignore_files_removed: int = 0
    missing_images: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> frames
    counts: BoxCounts = field(default_factory=BoxCounts)
    label_report: bdd.LabelReport = field(default_factory=bdd.LabelReport)


# ---------------------------------------------------------------------------------------------------------------
# Labels of one frame
# ---------------------------------------------------------------------------------------------------------------


def label_text(
    frame: bdd.Frame, width: int, height: int, cfg: ExportConfig, counts: BoxCounts
) -> tuple[str, str]:
    """The frame's YOLO label file and its ignore-region file: one ``cls cx cy w h`` line per kept box, or per
    ignore region (:func:`vocab.bdd.is_crowd_region`, any size), in the label file's order."""
    keep = set(cfg.classes) if cfg.classes is not None else None
    lines, crowd = [], []
    for label in frame.label_list():
        if label.box2d is None:
            continue
        cat = bdd.category_of(label)
        if cat.det_class is None:
            continue  # polygons (lanes, drivable areas) and unknown categories (reported by the LabelReport)
        if keep is not None and cat.det_class not in keep:
            counts.dropped["class not in --classes"] += 1
            continue
        b = label.box2d
        if b.x1 > width - 1 or b.y1 > height - 1 or b.x2 < 0 or b.y2 < 0 or b.x2 < b.x1 or b.y2 < b.y1:
            counts.dropped["outside the image or inverted"] += 1
            continue
        line = "{} {:.6f} {:.6f} {:.6f} {:.6f}\n".format(
            bdd.DET_CLASS_YOLO_ID[cat.det_class], *bdd.box_to_yolo(b, width, height)
        )
        if bdd.is_crowd_region(label):
            counts.crowd[label.category if cat.ignored else f"{cat.det_class} crowd"] += 1
            crowd.append(line)
            continue
        x1, y1, x2, y2 = bdd.clip_box(b, width, height)
        if min(x2 - x1 + 1, y2 - y1 + 1) < cfg.min_box_side:
            counts.dropped[f"side under {cfg.min_box_side:g} px"] += 1
            continue
        counts.clipped += (x1, y1, x2, y2) != (b.x1, b.y1, b.x2, b.y2)
        counts.boxes[cat.det_class] += 1
        lines.append(line)
    return "".join(lines), "".join(crowd)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header (pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Which frames, with what content
# ---------------------------------------------------------------------------------------------------------------


def default_images_dir(root: Path, split: str) -> Path:
    for sub in ("100k", "10k"):
        folder = root / "images" / sub / split
        if folder.is_dir():
            return folder
    raise UserError(
        f"no image folder for {split} under {root}: looked for images/100k/{split} and images/10k/{split} "
        "(pass --images_dir)"
    )


def select_frames(
    frames: Sequence[bdd.Frame], images_dir: Path, out: Path, report: Report, cfg: ExportConfig
) -> list[FrameFile]:
    """Frames that have an image (and labels, unless include_unlabeled), selected and rendered as files."""
    images = {}
    for path in bdd.list_images(images_dir):
        images.setdefault(path.stem, path)
    candidates: dict[str, tuple[bdd.Frame, Path]] = {}
    for frame in frames:
        stem = frame.stem
        state = frame.labels_state
        if not stem:
            report.skipped["empty frame name"] += 1
        elif stem in candidates:
            report.skipped["duplicate frame name (first kept)"] += 1
        elif state != "ok" and not cfg.include_unlabeled:
            report.skipped[
                {"absent": "no 'labels' key", "null": "'labels': null", "empty": "'labels': []"}[state]
            ] += 1
        elif stem not in images:
            report.missing_images.append(frame.name)
        else:
            candidates[stem] = (frame, images[stem])
    split = report.split
    planned = []
    for stem in tqdm(sorted(candidates), desc=f"{split} frames", unit="frame", disable=None, leave=False):
        if cfg.max_frames is not None and len(planned) >= cfg.max_frames:
            report.not_selected += 1
            continue
        frame, source = candidates[stem]
        width, height = image_size(source)
        counts = BoxCounts()
        text, ignore_text = label_text(frame, width, height, cfg, counts)
        if cfg.skip_empty and not text:
            report.no_boxes_skipped += 1
            continue
        report.counts.add(counts)
        report.label_report.check_frame(frame)
        report.empty_labels += not text
        image = out / "images" / split / f"{stem}{source.suffix.lower()}"
        rel = image.relative_to(out).as_posix()
        planned.append(
            FrameFile(
                stem, source, image, out / "labels" / split / f"{stem}.txt", text,
                (split, rel, frame.weather, frame.timeofday, frame.scene),
                out / IGNORE_DIR / split / f"{stem}.txt", ignore_text,
            )
        )  # fmt: skip
    return planned


# ---------------------------------------------------------------------------------------------------------------
# Files: compare, then write
# ---------------------------------------------------------------------------------------------------------------


def same_image(src: Path, dest: Path) -> bool:
    try:
        return os.path.samefile(src, dest) or filecmp.cmp(src, dest, shallow=False)
    except OSError:
        return False


def read_frames_csv(out: Path) -> list[tuple[str, ...]]:
    path = out / FRAMES_CSV
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or tuple(rows[0]) != FRAMES_COLUMNS:
        raise UserError(
            f"{path} is not this converter's frames file (header {rows[0] if rows else 'missing'}, expected "
            f"{','.join(FRAMES_COLUMNS)}); --out must be a folder this script wrote, or a new one"
        )
    return [tuple(r) for r in rows[1:] if r]


def frames_csv_text(rows: list[tuple[str, ...]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FRAMES_COLUMNS)
    writer.writerows(sorted(rows))
    return buf.getvalue()


def split_files(out: Path, kind: str, split: str) -> dict[str, Path]:
    folder = out / kind / split
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def place_image(src: Path, dest: Path, cfg: ExportConfig, report: Report) -> None:
    """Hard-link ``src`` as ``dest`` (a copy with --copy or where links are impossible), atomically."""
    try:
        copied = link_or_copy(src, dest, hardlink=not cfg.copy_images)
    except OSError as exc:
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from None
    if copied is None:
        report.linked += 1
        return
    report.copied += 1
    if not cfg.copy_images:
        report.copy_reason = report.copy_reason or f"{copied}: copied"


def write_split(out: Path, planned: list[FrameFile], report: Report, cfg: ExportConfig) -> list[Path]:
    """Compare with what is on disk; refuse differences without --overwrite; write. Returns the written files.

    An ignore file that is missing is written without --overwrite (an export made before ignore files existed
    gets them from a rerun); one that differs, or is there for a frame without ignore regions, is a difference.
    """
    split = report.split
    images_on_disk = split_files(out, "images", split)
    labels_on_disk = split_files(out, "labels", split)
    ignores_on_disk = split_files(out, IGNORE_DIR, split)
    old_rows = read_frames_csv(out)
    old_split_rows = {r[1]: r for r in old_rows if r and r[0] == split}
    wanted = {p.stem for p in planned}

    conflicts: list[str] = []
    todo: list[
        tuple[FrameFile, bool, bool, bool]
    ] = []  # (frame, write image, write label, write ignore file)
    for p in tqdm(planned, desc=f"{split} compare", unit="frame", disable=None, leave=False):
        has_image, has_label, has_ignore = p.image.exists(), p.label.exists(), p.stem in ignores_on_disk
        image_ok = has_image and same_image(p.source, p.image)
        label_ok = has_label and p.label.read_text(encoding="utf-8") == p.text
        ignore_ok = p.ignore.read_text(encoding="utf-8") == p.ignore_text if has_ignore else not p.ignore_text
        row_ok = old_split_rows.get(p.row[1]) == p.row
        if image_ok and label_ok and row_ok and ignore_ok:
            report.unchanged += 1
            continue
        if (
            (has_image and not image_ok)
            or (has_label and not label_ok)
            or (has_ignore and not ignore_ok)
            or (p.row[1] in old_split_rows and not row_ok)
        ):
            conflicts.append(p.stem)
        if image_ok and label_ok:  # a killed run wrote the files but not frames.csv, or an older export
            report.unchanged += 1
        todo.append((p, not image_ok, not label_ok, not ignore_ok))
    extra = sorted((set(images_on_disk) | set(labels_on_disk) | set(ignores_on_disk)) - wanted)
    extra_rows = sorted(set(old_split_rows) - {p.row[1] for p in planned})
    if (conflicts or extra or extra_rows) and not cfg.overwrite:
        parts = []
        if conflicts:
            parts.append(f"{len(conflicts)} frame(s) differ from what is there ({_few(conflicts)})")
        if extra or extra_rows:
            names = extra or [Path(r).stem for r in extra_rows]
            parts.append(f"{len(names)} frame(s) of {split} there would not be written now ({_few(names)})")
        raise UserError(
            f"{out}: "
            + "; ".join(parts)
            + ". Nothing was written; pass --overwrite to replace them, or another --out"
        )

    for kind in ("images", "labels"):
        (out / kind / split).mkdir(parents=True, exist_ok=True)
    written = []
    for p, do_image, do_label, do_ignore in tqdm(
        todo, desc=f"{split} write", unit="frame", disable=None, leave=False
    ):
        if do_image:
            place_image(p.source, p.image, cfg, report)
        if do_label:
            atomic_write_text(p.label, p.text)
        if do_ignore:
            write_ignore_file(p, report)
        if not (do_image or do_label):
            continue
        written.append(p.label)
        if p.stem in conflicts:
            report.replaced += 1
        else:
            report.written += 1
    for stem in extra:
        for path in (images_on_disk.get(stem), labels_on_disk.get(stem), ignores_on_disk.get(stem)):
            if path is not None:
                path.unlink()
        report.removed += 1
    rows = [r for r in old_rows if r[0] != split] + [p.row for p in planned]
    text = frames_csv_text(rows)
    path = out / FRAMES_CSV
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    if todo or extra:
        (out / "labels" / f"{split}.cache").unlink(missing_ok=True)  # ultralytics' index of the old files
    return written


def write_ignore_file(p: FrameFile, report: Report) -> None:
    """Write the frame's ignore regions, or remove a stale file when it has none."""
    if p.ignore_text:
        p.ignore.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p.ignore, p.ignore_text)
        report.ignore_files_written += 1
    else:
        p.ignore.unlink(missing_ok=True)
        report.ignore_files_removed += 1


def write_data_yaml(out: Path) -> tuple[Path, str]:
    """data.yaml for the splits present under out/images; returns it and a note when one split stands for two."""
    with out_lock(out):
        return _write_data_yaml(out)


def _write_data_yaml(out: Path) -> tuple[Path, str]:
    present = {s: f"images/{s}" for s in YAML_SPLITS if split_files(out, "images", s)}
    note = ""
    for missing, other in (("train", "val"), ("val", "train")):
        if missing not in present and other in present:
            note = f"no {missing} split written yet: {missing} names {present[other]} (ultralytics needs both keys)"
    data: dict = {
        "path": str(out.resolve()),
        "train": present.get("train") or present.get("val"),
        "val": present.get("val") or present.get("train"),
    }
    if "test" in present:
        data["test"] = present["test"]
    data["nc"] = len(bdd.DET_CLASSES)
    data["names"] = dict(enumerate(bdd.DET_CLASSES))
    header = "# Written by convert/bdd_to_yolo.py (real BDD100K frames; ids as in stage 4's datasets).\n"
    if note:
        header += f"# {note}\n"
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path = out / DATA_YAML
    if path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if old.get("names") not in (None, data["names"], list(bdd.DET_CLASSES)):
            raise UserError(
                f"{path} names other classes ({old.get('names')}); --out holds another dataset: use another --out"
            )
        if path.read_text(encoding="utf-8") == text:
            return path, note
    atomic_write_text(path, text)
    return path, note


def _few(names: Sequence[str]) -> str:
    names = list(names)
    return ", ".join(names[:SHOW]) + (f", ... ({len(names)} in all)" if len(names) > SHOW else "")


# ---------------------------------------------------------------------------------------------------------------
# The conversion and the command line
# ---------------------------------------------------------------------------------------------------------------


def find_inputs(cfg: ExportConfig) -> tuple[Path, Path]:
    """(labels file, image folder) of the split, found as every stage 1 script finds them; clear errors."""
    root, labels_file = find_labels(cfg.bdd_data_dir, cfg.split, cfg.labels_file)
    images_dir = Path(cfg.images_dir) if cfg.images_dir else default_images_dir(root, cfg.split)
    if not images_dir.is_dir():
        raise UserError(f"image folder not found: {images_dir}")
    return labels_file, images_dir


def convert_split(cfg: ExportConfig) -> Report:
    """Write one split of a BDD100K folder into the YOLO dataset at ``cfg.out`` (see the module docstring)."""
    out, split = Path(cfg.out), cfg.split
    labels_file, images_dir = find_inputs(cfg)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    report = Report(split, labels_file, images_dir)
    frames = load_labels(labels_file)
    report.frames = len(frames)
    planned = select_frames(frames, images_dir, out, report, cfg)
    if not planned:
        why = [f"{n} {reason}" for reason, n in report.skipped.items()]
        if report.missing_images:
            why.append(
                f"{len(report.missing_images)} without an image in {images_dir} ({_few(report.missing_images)})"
            )
        if report.no_boxes_skipped:
            kept = "/".join(cfg.classes or bdd.DET_CLASSES)
            side = f" with a side of at least {cfg.min_box_side:g} px" if cfg.min_box_side else ""
            why.append(
                f"{report.no_boxes_skipped} frame(s) without a kept box (--skip_empty): none has a {kept} box{side}; "
                "pass other --classes or a smaller --min_box_side"
            )
        raise UserError(
            f"nothing to write for {split}: {report.frames} frame(s) in {labels_file}, " + "; ".join(why)
        )
    out.mkdir(parents=True, exist_ok=True)
    with out_lock(out):  # two splits converted at once into one --out share frames.csv
        write_split(out, planned, report, cfg)
    return report


def load_labels(path: Path) -> list[bdd.Frame]:
    """:func:`vocab.bdd.load_frames` with a progress bar on a terminal: the bytes read, then the decoding (det_train
    is ~1 GB and 70k frames: half a minute of silence otherwise)."""
    if path.is_dir():
        return bdd.load_frames(path)
    if not path.is_file():
        raise UserError(f"labels file not found: {path}")
    chunks = []
    with (
        tqdm(
            total=path.stat().st_size, desc=f"reading {path.name}", unit="B", unit_scale=True, disable=None
        ) as bar,
        open(path, "rb") as fh,
    ):
        while chunk := fh.read(1 << 24):
            chunks.append(chunk)
            bar.update(len(chunk))
        bar.set_postfix_str("decoding", refresh=True)
        frames = bdd.decode_frames(b"".join(chunks), path)
        bar.set_postfix_str(f"{len(frames)} frames", refresh=True)
    return frames


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out`` for a read-modify-write of its shared files (frames.csv, data.yaml)."""
    import fcntl

    with open(out / ".bdd_to_yolo.lock", "a") as fh:  # "a": no truncation, the mtime stays
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, None, "validate the config and find the labels and images, then exit")
    p.add_argument("--bdd_data_dir", dest="bdd_data_dir", help="BDD100K root (holding images/ and labels/)")
    p.add_argument("--split", dest="split", choices=bdd.SPLITS, help="the split to write")
    p.add_argument("--out", dest="out", help="dataset folder (several splits can share it)")
    p.add_argument("--max_frames", dest="max_frames", type=int, help="write only the first N frames by name")
    p.add_argument("--labels_file", help="label JSON or folder of per-image JSONs, instead of the one found")
    p.add_argument(
        "--images_dir", help="image folder (default: images/100k/<split>, else images/10k/<split>)"
    )
    p.add_argument(
        "--copy",
        dest="copy_images",
        action="store_true",
        default=None,
        help="copy images instead of hard-linking",
    )
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="replace differing files, remove stale frames"
    )
    p.add_argument("--classes", nargs="+", help="keep only these classes' boxes (default: all 10)")
    p.add_argument("--min_box_side", type=float, help="leave out boxes with a shorter side (px)")
    p.add_argument(
        "--include_unlabeled",
        action="store_true",
        default=None,
        help="write frames without labels (empty files)",
    )
    p.add_argument(
        "--skip_empty",
        action="store_true",
        default=None,
        help="leave out frames without a kept box (a detector's train split)",
    )
    args = p.parse_args(argv)
    if args.max_frames is not None and args.max_frames < 1:
        p.error(f"--max_frames must be at least 1, got {args.max_frames}")
    return args


def print_summary(report: Report, out: Path, data_yaml: Path, note: str, seconds: float) -> None:
    r = report
    n = r.written + r.replaced + r.unchanged
    print(f"{r.split}: {n} frame(s) in {out} from {r.labels_file} and {r.images_dir} ({seconds:.1f} s)")
    print(
        f"  new {r.written}, replaced {r.replaced}, unchanged {r.unchanged}, removed {r.removed}; "
        f"images hard-linked {r.linked}, copied {r.copied}"
    )
    if r.copy_reason:
        print(f"  note: {r.copy_reason}")
    skipped = dict(r.skipped)
    if r.missing_images:
        skipped[f"image missing ({_few(r.missing_images)})"] = len(r.missing_images)
    if r.not_selected:
        skipped["beyond --max_frames"] = r.not_selected
    if r.no_boxes_skipped:
        skipped["no kept box"] = r.no_boxes_skipped
    if skipped:
        print("  frames skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    c = r.counts
    boxes = ", ".join(f"{name} {c.boxes[name]}" for name in bdd.DET_CLASSES if c.boxes[name])
    print(f"  boxes: {sum(c.boxes.values())} ({boxes or 'none'}); {r.empty_labels} empty label file(s)")
    if c.crowd:
        crowd = ", ".join(f"{k} {v}" for k, v in c.crowd.most_common())
        files = f"{r.ignore_files_written} file(s) written" + (
            f", {r.ignore_files_removed} removed" if r.ignore_files_removed else ""
        )
        print(
            f"  ignore regions (no training boxes; scored as COCO crowd): {sum(c.crowd.values())} ({crowd}) "
            f"in {out / IGNORE_DIR / r.split} ({files})"
        )
    dropped = [f"{k} {v}" for k, v in c.dropped.items()]
    if dropped or c.clipped:
        print(f"  boxes clipped to the image: {c.clipped}; dropped: {', '.join(dropped) or 'none'}")
    for line in r.label_report.lines():
        print(f"  {line}")
    print(f"  {out / FRAMES_CSV} (weather, time of day, scene per frame)")
    print(f"  {data_yaml}" + (f" ({note})" if note else "") + f": yolo train data={data_yaml}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    cfg = load_config(ExportConfig, args.config, args.overrides, flags=flag_values(args))
    if args.check:
        labels, images = find_inputs(cfg)
        print(f"{args.config or 'flags'}: ok ({cfg.split}: labels {labels}, images {images} -> {cfg.out})")
        return 0
    start = time.perf_counter()
    out = Path(cfg.out)
    report = convert_split(cfg)
    data_yaml, note = write_data_yaml(out)
    print_summary(report, out, data_yaml, note, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
