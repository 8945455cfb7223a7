"""Detection metrics for the evaluations of stage 5: COCO mAP of YOLO predictions against YOLO label files.

The numbers are pycocotools' ``COCOeval`` itself (iouType bbox, its default float64 IoU thresholds 0.50:0.05:0.95
and 101 recall points, at most 100 detections per image *and class*, its small/medium/large area ranges in the
pixels of the original image), read from its ``eval['precision']`` array as ``COCOeval.summarize`` reads it;
nothing here computes AP by hand. BDD100K's ignore regions (det_20's ``other person``/``other vehicle``/
``trailer`` and boxes with ``crowd: true``, see :func:`vocab.bdd.is_crowd_region`) are COCO crowd boxes of
pedestrian/car/truck or their own class: a detection on one is neither a hit nor a false positive, and one is
never missed, as in the BDD100K toolkit (Scalabel's COCO-based ``evaluate_det``). Shared by
``annotation/evaluate_gain.py`` and the fidelity evaluation.

Conventions: boxes are continuous pixel ``xyxy`` in the original image (a BDD100K inclusive box x1..x2 is
[x1, x2 + 1)); a ground-truth box's area is its width x height (what the toolkit's ``x2 - x1 + 1`` gives too).

API:

* :class:`Boxes` one image's boxes: ``xyxy`` (n, 4), ``cls`` (n,) class ids, ``conf`` (n,) for predictions,
  ``crowd`` (n,) for ground truth (True: an ignore region).
* :func:`read_yolo_labels` ground truth from a YOLO label file (``cls cx cy w h``, normalised), with the ignore
  regions of its side file (``labels/<split>/x.txt`` -> ``ignore/<split>/x.txt``, what convert/bdd_to_yolo.py writes).
* :func:`predict_boxes` a YOLO model's predictions on a list of images, keyed by image path.
* :func:`detection_map` map, map50, map75, per class and per size, over all images or a subset (``keys``);
  :func:`detection_maps` the same for many subsets (conditions, bootstrap resamples) from one evaluation.
* :func:`write_scalabel_predictions` predictions as a BDD100K/Scalabel JSON, for the official toolkit.
* :data:`DEFINITION` the sentence a report prints to say which mAP it is; :func:`ratio` a ratio or None.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.io import atomic_write_text

#: What every report says its mAP is.
DEFINITION = (
    "COCO mAP as pycocotools' COCOeval computes it (bbox, IoU 0.50:0.95, 101 recall points, at most 100 detections "
    "per image and class), with BDD100K's ignore regions (other person/other vehicle/trailer and crowd boxes) as "
    "crowd: a detection on one is neither a hit nor a false positive"
)
#: COCO's area ranges (pixels²) as pycocotools' Params define them; both ends count (a box of exactly 32² is
#: in small and in medium, as pycocotools scores it).
SIZE_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e5**2)}
#: Predictions for mAP keep everything down to this confidence (COCO-style evaluation ranks all boxes).
EVAL_CONF = 0.001
#: COCO scores the 100 most confident boxes of each image and class (pycocotools' maxDets, per category).
COCO_MAX_DETS = 100
#: Folder beside ``labels/`` holding each label file's ignore regions (YOLO lines); ultralytics never reads it.
IGNORE_DIR = "ignore"


@dataclass(frozen=True)
class Boxes:
    """One image's boxes in pixels of the original image; ``conf`` is None for ground truth, ``crowd`` None when
    no box is an ignore region."""

    xyxy: np.ndarray
    cls: np.ndarray
    conf: np.ndarray | None = None
    crowd: np.ndarray | None = None

    @staticmethod
    def empty(with_conf: bool = False) -> Boxes:
        return Boxes(
            np.zeros((0, 4), np.float64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float64) if with_conf else None,
        )

    def __len__(self) -> int:
        return len(self.cls)

    @property
    def is_crowd(self) -> np.ndarray:
        """(n,) bool: which boxes are ignore regions."""
        return np.zeros(len(self), bool) if self.crowd is None else np.asarray(self.crowd, bool)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is undefined or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ---------------------------------------------------------------------------------------------------------------
# Ground truth from YOLO label files
# ---------------------------------------------------------------------------------------------------------------


def ignore_path(label_path: Path) -> Path | None:
    """The ignore-region side file of a label file: the last ``labels`` folder of its path read as ``ignore``
    (``<out>/labels/val/x.txt`` -> ``<out>/ignore/val/x.txt``, as ultralytics maps images/ to labels/); None when
    the path has no ``labels`` folder."""
    parts = Path(label_path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "labels":
            return Path(*parts[:i], IGNORE_DIR, *parts[i + 1 :])
    return None


def read_yolo_boxes(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(xyxy in pixels of a WxH image, class ids) of a YOLO label file; a missing file has none.

    A line that is not five numbers raises ValueError naming the file and line.
    """
    rows = []
    if path.is_file():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 5:
                    raise ValueError
                cls, cx, cy, w, h = int(parts[0]), *(float(p) for p in parts[1:])
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: not a YOLO box line 'cls cx cy w h': {line.strip()!r}"
                ) from None
            rows.append(
                (
                    cls,
                    (cx - w / 2) * width,
                    (cy - h / 2) * height,
                    (cx + w / 2) * width,
                    (cy + h / 2) * height,
                )
            )
    arr = np.asarray(rows, np.float64).reshape(-1, 5)
    return arr[:, 1:5], arr[:, 0].astype(np.int64)


def read_yolo_labels(path: Path, width: int, height: int) -> Boxes:
    """Ground truth from a YOLO label file (``cls cx cy w h`` normalised to [0, 1]) in pixels of a WxH image, plus
    the ignore regions of its side file (:func:`ignore_path`) when there is one, as crowd boxes.

    A missing or empty file means no objects (ultralytics' convention for background images). A line that is not
    five numbers raises ValueError naming the file and line.
    """
    xyxy, cls = read_yolo_boxes(Path(path), width, height)
    side = ignore_path(Path(path))
    if side is None or not side.is_file():
        return Boxes(xyxy, cls)
    crowd_xyxy, crowd_cls = read_yolo_boxes(side, width, height)
    crowd = np.concatenate([np.zeros(len(cls), bool), np.ones(len(crowd_cls), bool)])
    return Boxes(np.concatenate([xyxy, crowd_xyxy]), np.concatenate([cls, crowd_cls]), None, crowd)


# ---------------------------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------------------------


def predict_boxes(
    model: Any,
    images: Sequence[Path],
    list_file: Path,
    *,
    imgsz: int,
    batch: int = 16,
    device: str | int | None = None,
    conf: float = EVAL_CONF,
    iou: float = 0.7,
    max_det: int | None = None,
    classes: Sequence[int] | None = None,
) -> dict[Path, Boxes]:
    """Predictions of ``model`` (a weights path/spec or an :class:`annotation.yolo_runtime.LoadedModel`) on
    ``images``, keyed by the resolved image path.

    Batched and streamed through ultralytics (``list_file`` is the image list it reads). Images ultralytics cannot
    read are missing from the result: the caller decides whether that is an error. The offline environment must be
    prepared first (:func:`annotation.yolo_runtime.prepare_offline`). ``classes`` (model class ids) keeps only
    those inside the model's NMS. ``max_det`` (ultralytics' cap, per image across classes) defaults to
    :data:`COCO_MAX_DETS` per class kept, so that every class can fill COCO's per-class cap of 100.
    """
    from annotation import yolo_runtime

    loaded = model if isinstance(model, yolo_runtime.LoadedModel) else yolo_runtime.load_model(str(model))
    if max_det is None:
        max_det = COCO_MAX_DETS * (len(classes) if classes is not None else len(loaded.names))
    resolved = [Path(p).resolve() for p in images]
    out: dict[Path, Boxes] = {}
    results = yolo_runtime.stream_predictions(
        loaded, resolved, list_file, conf=conf, iou=iou, imgsz=imgsz, batch=batch, device=device,
        max_det=max_det, classes=sorted(classes) if classes is not None else None,
    )  # fmt: skip
    for r in results:
        if r.detections:
            xyxy = np.asarray([d.xyxy for d in r.detections], np.float64)
            cls = np.asarray([d.model_class for d in r.detections], np.int64)
            scores = np.asarray([d.confidence for d in r.detections], np.float64)
        else:
            xyxy, cls, scores = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0)
        out[Path(r.path).resolve()] = Boxes(xyxy, cls, scores)
    return out


def write_scalabel_predictions(
    predictions: Mapping[Hashable, Boxes], names: Sequence[str], path: Path
) -> Path:
    """Write ``predictions`` as a BDD100K/Scalabel JSON list of frames ``{"name", "labels": [{"id", "category",
    "score", "box2d"}]}``, for ``python -m bdd100k.eval.run -t det -g det_val.json -r <path>``.

    A frame's name is its key's file name (an image path's ``abc.jpg``; det_20 names frames so); ``names`` are the
    class names by id. ``box2d`` is in the toolkit's inclusive pixels (x2 = right edge - 1: the toolkit's width is
    x2 - x1 + 1), so its boxes are ours.
    """
    frames = []
    for key, boxes in predictions.items():
        if boxes.conf is None:
            raise ValueError(f"predictions for {key} have no confidences")
        labels = [
            {
                "id": str(i),
                "category": names[int(c)],
                "score": float(s),
                "box2d": {"x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]) - 1, "y2": float(b[3]) - 1},
            }
            for i, (c, s, b) in enumerate(zip(boxes.cls, boxes.conf, boxes.xyxy, strict=True))
        ]
        frames.append({"name": os.path.basename(os.fspath(key)), "labels": labels})
    atomic_write_text(Path(path), json.dumps(frames))
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# COCO mAP
# ---------------------------------------------------------------------------------------------------------------


def _coco(images: list[dict], annotations: list[dict], n_classes: int):
    """A pycocotools COCO object built in memory."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c} for c in range(n_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
        coco.createIndex()
    return coco


def _annotations(boxes: Boxes, image_id: int, first_id: int, with_score: bool) -> list[dict]:
    xyxy = np.asarray(boxes.xyxy, np.float64).reshape(-1, 4)
    crowd = boxes.is_crowd
    out = []
    for i in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        w, h = x2 - x1, y2 - y1
        ann = {
            "id": first_id + i,  # from 1: COCOeval reads id 0 as "unmatched"
            "image_id": image_id,
            "category_id": int(boxes.cls[i]),
            "bbox": [x1, y1, w, h],
            "area": w * h,
            "iscrowd": int(crowd[i]),
        }
        if with_score:
            ann["score"] = float(boxes.conf[i])  # type: ignore[index]
        out.append(ann)
    return out


def _mean_defined(values: np.ndarray) -> float | None:
    """COCOeval.summarize's mean over the entries > -1; None where there is none (COCO's -1: no ground truth)."""
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else None


def detection_map(
    predictions: Mapping[Hashable, Boxes],
    truths: Mapping[Hashable, Boxes],
    class_names: Sequence[str],
    keys: Iterable[Hashable] | None = None,
) -> dict[str, Any]:
    """COCO box mAP of ``predictions`` against ``truths`` over ``keys`` (default: every key of ``truths``), as
    pycocotools' COCOeval computes it (see the module docstring), crowd truths as ignore regions.

    An image without an entry in ``predictions`` counts as one where nothing was detected. Returns
    ``{"images", "gt_boxes", "crowd_boxes", "map", "map50", "map75", "per_class": {name: {"map", "map50",
    "gt_boxes"}}, "per_size": {"small"|"medium"|"large": {"map", "map50", "gt_boxes"}}}``; ``gt_boxes`` count the
    scored (not crowd) boxes, per size with both ends of a range included (a box of exactly 32² counts in small and
    medium). A figure is None where it is undefined (no scored box of that class or size: COCO's -1).
    """
    keys = list(truths) if keys is None else list(keys)
    return detection_maps(predictions, truths, class_names, {"": keys})[""]


def detection_maps(
    predictions: Mapping[Hashable, Boxes],
    truths: Mapping[Hashable, Boxes],
    class_names: Sequence[str],
    subsets: Mapping[str, Sequence[Hashable]],
) -> dict[str, dict[str, Any]]:
    """:func:`detection_map` of each subset of images (name -> keys), from ONE ``COCOeval.evaluate`` over their
    union: the per-image matching is done once and only COCO's accumulation runs per subset (what makes the
    per-condition tables and bootstrap resamples affordable at 10,000 val frames). A key may repeat within a subset
    (a bootstrap resample): each occurrence counts as an image of its own. Equal to a fresh COCOeval per subset,
    since COCO matches each image and class on its own and accumulates images in the order given.
    """
    from pycocotools.cocoeval import COCOeval

    union = list(dict.fromkeys(k for keys in subsets.values() for k in keys))
    n_classes = len(class_names)
    images, gts, dts = [], [], []
    gt_rows: dict[Hashable, list[dict]] = {}
    for image_id, key in enumerate(union, 1):
        truth = truths[key]
        pred = predictions.get(key) or Boxes.empty(with_conf=True)
        if pred.conf is None:
            raise ValueError(f"predictions for {key} have no confidences")
        for boxes in (truth, pred):
            bad = [int(c) for c in boxes.cls if not 0 <= c < n_classes]
            if bad:
                raise ValueError(
                    f"boxes of {key} have class ids {sorted(set(bad))} outside 0..{n_classes - 1}"
                )
        images.append({"id": image_id})
        gt_rows[key] = _annotations(truth, image_id, len(gts) + 1, with_score=False)
        gts += gt_rows[key]
        dts += _annotations(pred, image_id, len(dts) + 1, with_score=True)

    evaluator = None
    if union:
        evaluator = COCOeval(_coco(images, gts, n_classes), _coco(images, dts, n_classes), iouType="bbox")
        evaluator.params.imgIds, evaluator.params.catIds = [im["id"] for im in images], list(range(n_classes))
        with contextlib.redirect_stdout(io.StringIO()):  # evaluate prints progress lines
            evaluator.evaluate()
    position = {key: i for i, key in enumerate(union)}
    return {
        name: _subset_result(evaluator, [position[k] for k in keys], [gt_rows[k] for k in keys], class_names)
        for name, keys in subsets.items()
    }


def _subset_result(
    evaluator: Any, positions: list[int], gt_rows: list[list[dict]], class_names: Sequence[str]
) -> dict[str, Any]:
    """One subset's figures: COCO's accumulation over the evaluated images at ``positions`` (in that order)."""
    n_classes = len(class_names)
    scored = [g for rows in gt_rows for g in rows if not g["iscrowd"]]
    result: dict[str, Any] = {
        "images": len(positions),
        "gt_boxes": len(scored),
        "crowd_boxes": sum(len(rows) for rows in gt_rows) - len(scored),
    }
    gt_per_class = [sum(g["category_id"] == c for g in scored) for c in range(n_classes)]
    gt_per_size = {s: sum(lo <= g["area"] <= hi for g in scored) for s, (lo, hi) in SIZE_RANGES.items()}
    none = {"map": None, "map50": None}
    if not positions:
        result.update(map=None, map50=None, map75=None)
        result["per_class"] = {name: {**none, "gt_boxes": 0} for name in class_names}
        result["per_size"] = {size: {**none, "gt_boxes": 0} for size in SIZE_RANGES}
        return result

    # evalImgs is laid out class-major, then area range, then image (COCOeval.evaluate): pick this subset's images
    p = evaluator.params
    n_images, n_areas = len(p.imgIds), len(p.areaRng)
    subset = copy.copy(evaluator)
    subset.evalImgs = [
        evaluator.evalImgs[(k * n_areas + a) * n_images + i]
        for k in range(n_classes)
        for a in range(n_areas)
        for i in positions
    ]
    subset.params, subset._paramsEval = copy.copy(p), copy.copy(evaluator._paramsEval)
    subset.params.imgIds = subset._paramsEval.imgIds = list(range(len(positions)))
    with contextlib.redirect_stdout(io.StringIO()):  # accumulate prints progress lines
        subset.accumulate()
    precision = subset.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    m = p.maxDets.index(COCO_MAX_DETS)
    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    assert [tuple(p.areaRng[area[s]]) for s in SIZE_RANGES] == list(SIZE_RANGES.values()), p.areaRng
    t50, t75 = (int(np.where(p.iouThrs == thr)[0][0]) for thr in (0.5, 0.75))  # summarize's exact match

    def ap(t: int | None = None, k: int | None = None, a: str = "all") -> float | None:
        s = precision[:, :, :, area[a], m]
        s = s if t is None else s[t : t + 1]
        return _mean_defined(s if k is None else s[:, :, k])

    result.update(map=ap(), map50=ap(t50), map75=ap(t75))
    result["per_class"] = {
        name: {"map": ap(k=k), "map50": ap(t50, k=k), "gt_boxes": gt_per_class[k]}
        for k, name in enumerate(class_names)
    }
    result["per_size"] = {
        size: {"map": ap(a=size), "map50": ap(t50, a=size), "gt_boxes": gt_per_size[size]}
        for size in SIZE_RANGES
    }
    return result
