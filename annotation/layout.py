"""Layout consistency: do a generated image's detections sit where its source frame's boxes were?

Generation writes ``metadata.jsonl`` beside the images, one JSON record per image::

    {"file": "000001.png", "source_frame": "b1c66a42-6f7d68ca.jpg",
     "source_labels": "/data/bdd100k/labels/det_20/det_val.json", "mask_path": "...", "source_size": [1280, 720]}

``file`` is required; the rest is optional. Relative paths are resolved against the metadata file's folder. A
record may carry its layout inline instead, as a ``labels`` list in det_20 form (``[{"category": "car", "box2d":
{"x1": .., "y1": .., "x2": .., "y2": ..}, "attributes": {..}}, ...]``, in the pixels of ``source_size``: a
generation plan's boxes); then those are the source boxes and ``source_labels`` is not read. The source size
comes from ``source_size``, else from the mask at ``mask_path`` (masks have their frame's size), else it is
BDD100K's 1280x720. Source boxes are scaled to the generated image's size, then detections and source boxes are
matched class by class, greedily by confidence, at IoU >= a threshold (:func:`match_boxes`,
:func:`annotation.consensus.pair_boxes`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from annotation.consensus import pair_boxes
from core.cli import UserError
from core.io import read_jsonl
from vocab import bdd

METADATA_FILE = "metadata.jsonl"
log = logging.getLogger("bdd-sdxl.annotation")


@dataclass(frozen=True)
class SourceRef:
    """What metadata.jsonl says about one generated image."""

    source_frame: str | None = None
    source_labels: Path | None = None
    mask_path: Path | None = None
    source_size: tuple[int, int] | None = None
    labels: tuple[bdd.Label, ...] | None = None  # an inline layout (det_20 labels): read, not source_labels


@dataclass(frozen=True)
class MatchResult:
    matched: int
    n_source: int
    n_detected: int

    @property
    def recall(self) -> float:
        return self.matched / self.n_source if self.n_source else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.n_detected if self.n_detected else 1.0

    @property
    def score(self) -> float:
        """F1 of recall and precision: one number per image for sorting and contact sheets."""
        r, p = self.recall, self.precision
        return 2 * r * p / (r + p) if r + p else 0.0


def match_boxes(
    detections: Sequence[tuple[int, float, Sequence[float]]],
    sources: Sequence[tuple[int, Sequence[float]]],
    iou_threshold: float = 0.5,
) -> MatchResult:
    """Greedy class-wise matching.

    Args:
        detections: (class id, confidence, xyxy) in continuous pixel coordinates.
        sources: (class id, xyxy) reference boxes in the same coordinates.
        iou_threshold: a pair matches at IoU >= this.

    Each detection, highest confidence first, takes the unmatched reference box of its class with the highest IoU.
    """
    return MatchResult(len(pair_boxes(detections, sources, iou_threshold)), len(sources), len(detections))


class LayoutSources:
    """Reads metadata.jsonl files and det_20 label files once each, and answers per image."""

    def __init__(self) -> None:
        self._metadata: dict[Path, dict[str, SourceRef]] = {}
        self._labels: dict[Path, dict[str, bdd.Frame]] = {}
        self._sizes: dict[Path, tuple[int, int]] = {}

    def ref_for(self, image: Path) -> SourceRef | None:
        folder = image.parent
        if folder not in self._metadata:
            self._metadata[folder] = read_metadata(folder / METADATA_FILE)
        return self._metadata[folder].get(image.name)

    def source_boxes(
        self,
        ref: SourceRef,
        image_size: tuple[int, int],
        keep_classes: set[int],
        min_box_size: float = 0.0,
        crowd: bool = False,
    ) -> tuple[list[tuple[int, list[float]]] | None, str]:
        """The source frame's boxes as (BDD YOLO id, xyxy) in the generated image's pixels, or None and why not.

        Only classes in ``keep_classes`` (what the detector can output) count; ignore regions
        (:func:`vocab.bdd.is_crowd_region`: det_20's other person, other vehicle, trailer and crowd boxes) and boxes
        smaller than ``min_box_size`` pixels are left out. ``crowd=True`` returns the ignore regions instead (any
        size), for an evaluation that scores them as COCO crowd boxes. An inline ``labels`` layout wins over
        ``source_frame``/``source_labels``.
        """
        if ref.labels is not None:
            labels = ref.labels
            origin = f"inline labels of {ref.source_frame}" if ref.source_frame else "inline labels"
        elif ref.source_frame is None or ref.source_labels is None:
            return None, "no source_frame/source_labels (nor inline labels) in metadata"
        else:
            frames = self._frames(ref.source_labels)
            frame = frames.get(ref.source_frame) or frames.get(bdd.stem(ref.source_frame))
            if frame is None:
                return None, f"frame {ref.source_frame} not in {ref.source_labels}"
            labels, origin = frame.label_list(), ref.source_frame
        src_w, src_h = self._source_size(ref)
        sx, sy = image_size[0] / src_w, image_size[1] / src_h
        out = []
        for label in labels:
            category = bdd.category_of(label)
            if label.box2d is None or category.det_class is None or bdd.is_crowd_region(label) != crowd:
                continue
            cls = bdd.DET_CLASS_YOLO_ID[category.det_class]
            if cls not in keep_classes:
                continue
            x1, y1, x2, y2 = bdd.clip_box(label.box2d, src_w, src_h)
            box = [x1 * sx, y1 * sy, (x2 + 1) * sx, (y2 + 1) * sy]  # inclusive pixels -> continuous
            if not crowd and min(box[2] - box[0], box[3] - box[1]) < min_box_size:
                continue
            out.append((cls, box))
        return out, f"{len(out)} source boxes from {origin}"

    def _frames(self, path: Path) -> dict[str, bdd.Frame]:
        if path not in self._labels:
            frames = bdd.load_frames(path)
            index: dict[str, bdd.Frame] = {}
            for frame in frames:
                index.setdefault(frame.name, frame)
                index.setdefault(frame.stem, frame)
            self._labels[path] = index
        return self._labels[path]

    def _source_size(self, ref: SourceRef) -> tuple[int, int]:
        if ref.source_size is not None:
            return ref.source_size
        if ref.mask_path is not None and ref.mask_path.is_file():
            if ref.mask_path not in self._sizes:
                from PIL import Image

                with Image.open(ref.mask_path) as im:
                    self._sizes[ref.mask_path] = im.size
            return self._sizes[ref.mask_path]
        return bdd.IMAGE_WIDTH, bdd.IMAGE_HEIGHT


def read_metadata(path: Path) -> dict[str, SourceRef]:
    """file name -> SourceRef for one folder's metadata.jsonl ({} when there is none)."""
    if not path.is_file():
        return {}
    out: dict[str, SourceRef] = {}
    base = path.parent
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
            raise UserError(
                f'{path}:{lineno}: a record needs "file" (the image file name), got {json.dumps(rec)[:80]!r}'
            )
        size = rec.get("source_size")
        if size is not None and not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
        ):
            raise UserError(f'{path}:{lineno}: "source_size" must be [width, height] in pixels, got {size!r}')
        out[os.path.basename(rec["file"])] = SourceRef(
            source_frame=rec.get("source_frame"),
            source_labels=_resolve(base, rec.get("source_labels")),
            mask_path=_resolve(base, rec.get("mask_path")),
            source_size=tuple(size) if size else None,
            labels=_inline_labels(rec.get("labels"), f"{path}:{lineno}"),
        )
    return out


_LABELS_DECODER = msgspec.json.Decoder(list[bdd.Label])


def _inline_labels(value: object, where: str) -> tuple[bdd.Label, ...] | None:
    """A record's ``labels`` list (det_20 form) as labels; None when the record has none."""
    if value is None:
        return None
    try:
        return tuple(_LABELS_DECODER.decode(msgspec.json.encode(value)))
    except msgspec.ValidationError as exc:
        raise UserError(
            f'{where}: "labels" must be a list of det_20 labels such as {{"category": "car", "box2d": '
            f'{{"x1": 10, "y1": 20, "x2": 50, "y2": 60}}}}: {str(exc).replace("`$", "`labels")}'
        ) from None


def _resolve(base: Path, value: str | None) -> Path | None:
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p
