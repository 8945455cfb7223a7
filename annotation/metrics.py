"""Detection metrics for the evaluations of stage 5: COCO mAP of YOLO predictions against YOLO label files.

The numbers come from torchmetrics' ``MeanAveragePrecision`` with the pycocotools backend (COCO's own evaluation
code: 101-point interpolated AP, IoU 0.50:0.95, at most 100 detections per image, COCO's small/medium/large area
ranges in the pixels of the original image); nothing here computes AP by hand. Shared by
``annotation/evaluate_gain.py`` and the fidelity evaluation.

API (all boxes are pixel ``xyxy`` in the original image):

* :class:`Boxes` one image's boxes: ``xyxy`` (n, 4), ``cls`` (n,) class ids, ``conf`` (n,) for predictions.
* :func:`read_yolo_labels` ground truth from a YOLO label file (``cls cx cy w h``, normalised).
* :func:`predict_boxes` a YOLO model's predictions on a list of images, keyed by image path.
* :func:`detection_map` map, map50, map75, per class and per size, over all images or a subset (``keys``).
* :func:`size_bin` COCO's size bin of an area; :func:`ratio` a ratio that is None when undefined.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vocab import bdd

#: COCO's area ranges (pixels²) for the per-size figures, as pycocotools defines them.
SIZE_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}
#: Predictions for mAP keep everything down to this confidence (COCO-style evaluation ranks all boxes).
EVAL_CONF = 0.001
#: COCO scores the 100 most confident boxes of an image (pycocotools' maxDets); predicting more is wasted.
EVAL_MAX_DET = 100


@dataclass(frozen=True)
class Boxes:
    """One image's boxes in pixels of the original image; ``conf`` is None for ground truth."""

    xyxy: np.ndarray
    cls: np.ndarray
    conf: np.ndarray | None = None

    @staticmethod
    def empty(with_conf: bool = False) -> Boxes:
        return Boxes(
            np.zeros((0, 4), np.float64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float64) if with_conf else None,
        )

    def __len__(self) -> int:
        return len(self.cls)


def size_bin(area: float) -> str:
    """COCO's size bin of a box area in pixels² (:func:`vocab.bdd.coco_size`, the bins every report shares)."""
    return bdd.coco_size(area)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is undefined or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def read_yolo_labels(path: Path, width: int, height: int) -> Boxes:
    """Ground truth from a YOLO label file (``cls cx cy w h`` normalised to [0, 1]) in pixels of a WxH image.

    A missing or empty file means no objects (ultralytics' convention for background images). A line that is not
    five numbers raises ValueError naming the file and line.
    """
    if not path.is_file():
        return Boxes.empty()
    rows = []
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
            (cls, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        )
    if not rows:
        return Boxes.empty()
    arr = np.asarray(rows, np.float64)
    return Boxes(arr[:, 1:5], arr[:, 0].astype(np.int64))


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
    max_det: int = EVAL_MAX_DET,
    classes: Sequence[int] | None = None,
) -> dict[Path, Boxes]:
    """Predictions of ``model`` (a weights path/spec or an :class:`annotation.yolo_runtime.LoadedModel`) on
    ``images``, keyed by the resolved image path.

    Batched and streamed through ultralytics (``list_file`` is the image list it reads). Images ultralytics cannot
    read are missing from the result: the caller decides whether that is an error. The offline environment must be
    prepared first (:func:`annotation.yolo_runtime.prepare_offline`). ``classes`` (model class ids) keeps only
    those inside the model's NMS, so that a COCO model's unmapped classes take none of the ``max_det`` places.
    """
    from annotation import yolo_runtime

    loaded = model if isinstance(model, yolo_runtime.LoadedModel) else yolo_runtime.load_model(str(model))
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


def _undefined_to_none(value: float) -> float | None:
    """COCO's -1 ('no ground truth here') as None."""
    return None if value < 0 or math.isnan(value) else float(value)


def _size_of(xyxy: np.ndarray) -> list[str]:
    areas = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    return [size_bin(a) for a in areas]


def detection_map(
    predictions: Mapping[Hashable, Boxes],
    truths: Mapping[Hashable, Boxes],
    class_names: Sequence[str],
    keys: Iterable[Hashable] | None = None,
) -> dict[str, Any]:
    """COCO box mAP of ``predictions`` against ``truths`` over ``keys`` (default: every key of ``truths``).

    An image without an entry in ``predictions`` counts as one where nothing was detected. Returns
    ``{"images", "gt_boxes", "map", "map50", "map75", "per_class": {name: {"map", "map50", "gt_boxes"}},
    "per_size": {"small"|"medium"|"large": {"map", "map50", "gt_boxes"}}}``; a figure is None where it is
    undefined (no ground-truth box of that class or size among these images: COCO's -1).
    """
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    keys = list(truths) if keys is None else list(keys)
    # two evaluations: COCO's 0.50:0.95 one, and one at IoU 0.5 only, whose per-class and per-size APs are AP50
    metrics = {
        "coco": MeanAveragePrecision(box_format="xyxy", class_metrics=True, backend="pycocotools"),
        "iou50": MeanAveragePrecision(
            box_format="xyxy", class_metrics=True, backend="pycocotools", iou_thresholds=[0.5]
        ),
    }
    gt_per_class = dict.fromkeys(range(len(class_names)), 0)
    gt_per_size = dict.fromkeys(SIZE_RANGES, 0)
    n_gt = 0
    for key in keys:
        truth = truths[key]
        pred = predictions.get(key) or Boxes.empty(with_conf=True)
        if pred.conf is None:
            raise ValueError(f"predictions for {key} have no confidences")
        target = {
            "boxes": torch.as_tensor(truth.xyxy, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(truth.cls, dtype=torch.int64),
        }
        preds = {
            "boxes": torch.as_tensor(pred.xyxy, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.as_tensor(pred.conf, dtype=torch.float32),
            "labels": torch.as_tensor(pred.cls, dtype=torch.int64),
        }
        for metric in metrics.values():
            metric.update([preds], [target])
        n_gt += len(truth)
        for c in truth.cls.tolist():
            gt_per_class[c] = gt_per_class.get(c, 0) + 1
        for size in _size_of(truth.xyxy):
            gt_per_size[size] += 1
    result: dict[str, Any] = {"images": len(keys), "gt_boxes": n_gt}
    if not keys:
        none = {"map": None, "map50": None}
        result.update(map=None, map50=None, map75=None)
        result["per_class"] = {name: {**none, "gt_boxes": 0} for name in class_names}
        result["per_size"] = {size: {**none, "gt_boxes": 0} for size in SIZE_RANGES}
        return result
    coco, iou50 = (m.compute() for m in metrics.values())
    result["map"] = _undefined_to_none(float(coco["map"]))
    result["map50"] = _undefined_to_none(float(coco["map_50"]))
    result["map75"] = _undefined_to_none(float(coco["map_75"]))

    def per_class(res: dict) -> dict[int, float | None]:
        classes = res["classes"].reshape(-1).tolist()
        values = res["map_per_class"].reshape(-1).tolist()
        return {int(c): _undefined_to_none(v) for c, v in zip(classes, values, strict=True)}

    ap, ap50 = per_class(coco), per_class(iou50)
    result["per_class"] = {
        name: {"map": ap.get(i), "map50": ap50.get(i), "gt_boxes": gt_per_class.get(i, 0)}
        for i, name in enumerate(class_names)
    }
    result["per_size"] = {
        size: {
            "map": _undefined_to_none(float(coco[f"map_{size}"])),
            "map50": _undefined_to_none(float(iou50[f"map_{size}"])),
            "gt_boxes": gt_per_size[size],
        }
        for size in SIZE_RANGES
    }
    return result
