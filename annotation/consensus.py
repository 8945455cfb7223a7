"""Labels from a layout and a detector together: which boxes agree, which become labels, which images pass.

A generated image with a source layout (its source frame's boxes, or a plan's boxes, scaled to the image as
saved) has two box sets: what the image was asked to show and what the detector finds in it.
:func:`match_provenance` pairs them class by class, greedily by confidence at IoU >= a threshold (the matching
of COCO's evaluation), and gives every box a provenance:

* ``confirmed``: a source box and a detection of its class at IoU >= the threshold;
* ``layout_only``: a source box that no detection confirms;
* ``detector_only``: a confident detection (>= ``filter.min_confidence``) that matches no source box.

:func:`select_labels` (:func:`resolve_labels`) turns them into the image's labels for a ``labels.source``
(detector, layout, consensus) and, for consensus, a policy (keep_layout, confirmed, strict), and says whether the
disagreement rejects the image. :func:`agreement_stats` sums provenance per class and per COCO size (small < 32²,
medium < 96², large, by area in the generated image's pixels). Everything here is a pure function of the
recorded detections and the layout, so a rerun re-applies it from the manifest without the detector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vocab import bdd

PROVENANCES = ("confirmed", "layout_only", "detector_only")
SIZES = bdd.COCO_SIZES
POLICIES = ("keep_layout", "confirmed", "strict")
#: (index into the boxes, geometry: "layout" or "detector") of each label, and the image's rejection reasons
Chosen = tuple[list[tuple[int, str]], list[str]]

Detection = tuple[int, float, Sequence[float]]  # (BDD YOLO id, confidence, continuous xyxy)
SourceBox = tuple[int, Sequence[float]]  # (BDD YOLO id, continuous xyxy)


def size_of(box: Sequence[float]) -> str:
    """COCO size bucket of a continuous xyxy box by its area in pixels: small, medium or large."""
    return bdd.coco_size(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


def pair_boxes(
    detections: Sequence[Detection], sources: Sequence[SourceBox], iou_threshold: float
) -> list[tuple[int, int, float]]:
    """(detection index, source index, IoU) of each matched pair.

    Each detection, highest confidence first (ties: the earlier one), takes the unmatched source box of its class
    with the highest IoU (ties: the earlier box) if that IoU is >= ``iou_threshold``. A detection matches at most
    one source box and a source box at most one detection: a detection over two source boxes confirms the one it
    overlaps most, a second detection of one source box is left unmatched.
    """
    free: dict[int, list[int]] = {}
    for j, (cls, _box) in enumerate(sources):
        free.setdefault(cls, []).append(j)
    pairs = []
    for i in sorted(range(len(detections)), key=lambda i: -detections[i][1]):
        cls, _conf, box = detections[i]
        candidates = free.get(cls)
        if not candidates:
            continue
        ious = [bdd.box_iou(box, sources[j][1]) for j in candidates]
        best = max(range(len(ious)), key=ious.__getitem__)
        if ious[best] >= iou_threshold:
            pairs.append((i, candidates.pop(best), ious[best]))
    return pairs


@dataclass(frozen=True)
class BoxProvenance:
    """One box of an image with a layout: where it came from and how it matched."""

    provenance: str  # one of PROVENANCES
    class_id: int
    layout_xyxy: tuple[float, ...] | None  # the source box (None: detector_only)
    detector_xyxy: tuple[float, ...] | None  # the detection (None: layout_only)
    confidence: float | None  # the detection's confidence (None: layout_only)
    iou: float | None  # of the confirmed pair
    detection_index: int | None  # index into the detections passed in

    @property
    def size(self) -> str:
        """COCO size bucket: by the source box where there is one (as COCO buckets a matched pair by its ground
        truth), else by the detection."""
        return size_of(self.layout_xyxy if self.layout_xyxy is not None else self.detector_xyxy)

    def to_json(self) -> dict[str, Any]:
        return {
            "provenance": self.provenance,
            "class": bdd.DET_CLASSES[self.class_id],
            "class_id": self.class_id,
            "size": self.size,
            "layout_xyxy": _rounded(self.layout_xyxy),
            "detector_xyxy": _rounded(self.detector_xyxy),
            "confidence": self.confidence,
            "iou": None if self.iou is None else round(self.iou, 4),
        }


def match_provenance(
    detections: Sequence[Detection],
    sources: Sequence[SourceBox],
    iou_threshold: float,
    min_confidence: float,
    confirm_min_confidence: float | None = None,
) -> list[BoxProvenance]:
    """Every source box (confirmed or layout_only, in source order), then every detector_only detection.

    Detections at or above ``confirm_min_confidence`` (None: ``min_confidence``) may confirm a source box; an
    unmatched detection is detector_only when at or above ``min_confidence`` and ignored (not confident) below.
    """
    confirm = min_confidence if confirm_min_confidence is None else confirm_min_confidence
    eligible = [i for i, d in enumerate(detections) if d[1] >= confirm]
    pairs = pair_boxes([detections[i] for i in eligible], sources, iou_threshold)
    by_source = {j: (eligible[i], iou) for i, j, iou in pairs}
    matched = {i for i, _ in by_source.values()}
    out = []
    for j, (cls, box) in enumerate(sources):
        if j in by_source:
            i, iou = by_source[j]
            out.append(
                BoxProvenance("confirmed", cls, tuple(box), tuple(detections[i][2]), detections[i][1], iou, i)
            )
        else:
            out.append(BoxProvenance("layout_only", cls, tuple(box), None, None, None, None))
    for i, (cls, conf, box) in enumerate(detections):
        if i not in matched and conf >= min_confidence:
            out.append(BoxProvenance("detector_only", cls, None, tuple(box), conf, None, i))
    return out


def counts_of(boxes: Iterable[BoxProvenance]) -> dict[str, int]:
    counts = dict.fromkeys(PROVENANCES, 0)
    for b in boxes:
        counts[b.provenance] += 1
    return counts


def disagreement_share(counts: dict[str, int]) -> float:
    """(layout_only + detector_only) / all boxes; 0 for an image with no box at all."""
    total = sum(counts[p] for p in PROVENANCES)
    return (counts["layout_only"] + counts["detector_only"]) / total if total else 0.0


def from_detector(boxes: Sequence[BoxProvenance], *, min_confidence: float, **_) -> Chosen:
    """``detector``: the detections at or above ``min_confidence`` (detector geometry, detection order)."""
    chosen = [
        i for i, b in enumerate(boxes) if b.detector_xyxy is not None and b.confidence >= min_confidence
    ]
    return [(i, "detector") for i in sorted(chosen, key=lambda i: boxes[i].detection_index)], []


def from_layout(boxes: Sequence[BoxProvenance], **_) -> Chosen:
    """``layout``: every source box (confirmed and layout_only, layout geometry); the detector never rejects."""
    return [(i, "layout") for i, b in enumerate(boxes) if b.layout_xyxy is not None], []


def from_consensus(
    boxes: Sequence[BoxProvenance],
    *,
    policy: str = "keep_layout",
    geometry: str = "layout",
    detector_only_min_confidence: float | None = 0.5,
    max_disagreement: float = 1.0,
    **_,
) -> Chosen:
    """``consensus``: confirmed boxes (``geometry``: the source box or the detection's), and by ``policy``:
    ``keep_layout`` adds layout_only boxes and detector_only ones at or above ``detector_only_min_confidence``
    (None: none); ``confirmed`` adds only those detector_only ones; both reject the image (``layout_disagreement``)
    when the disagreement share exceeds ``max_disagreement``. ``strict`` rejects any image with a layout_only or
    detector_only box."""
    if policy not in POLICIES:
        raise ValueError(f"labels policy {policy!r} is not one of {', '.join(POLICIES)}")
    counts = counts_of(boxes)
    reasons = []
    if policy == "strict":
        if counts["layout_only"] or counts["detector_only"]:
            reasons.append("layout_disagreement")
    elif disagreement_share(counts) > max_disagreement:
        reasons.append("layout_disagreement")
    chosen = []
    for i, b in enumerate(boxes):
        if b.provenance == "confirmed":
            chosen.append((i, geometry))
        elif b.provenance == "layout_only" and policy == "keep_layout":
            chosen.append((i, "layout"))
        elif (
            b.provenance == "detector_only"
            and policy != "strict"
            and detector_only_min_confidence is not None
            and b.confidence >= detector_only_min_confidence
        ):
            chosen.append((i, "detector"))
    return chosen, reasons


#: ``labels.source`` -> how an image with a layout gets its labels: one entry per source (a new source: a function
#: of the boxes' provenance and the settings, and a line here; the config schema takes its name from this table).
LABEL_SOURCES: dict[str, Callable[..., Chosen]] = {
    "detector": from_detector,
    "layout": from_layout,
    "consensus": from_consensus,
}


def select_labels(boxes: Sequence[BoxProvenance], source: str, **settings: Any) -> Chosen:
    """Which boxes of an image with a layout become labels, as (index into ``boxes``, geometry: "layout" or
    "detector"), and the image's rejection reasons, by ``labels.source`` (:data:`LABEL_SOURCES`). ``settings``:
    ``min_confidence``, and for consensus ``policy``, ``geometry``, ``detector_only_min_confidence``,
    ``max_disagreement``."""
    if source not in LABEL_SOURCES:
        raise ValueError(f"labels source {source!r} is not one of {', '.join(LABEL_SOURCES)}")
    return LABEL_SOURCES[source](boxes, **settings)


def resolve_labels(
    boxes: Sequence[BoxProvenance], source: str, **settings: Any
) -> tuple[list[dict[str, Any]], list[str]]:
    """(labels, rejection reasons) of an image with a layout (:func:`select_labels` for the settings).

    A label is ``{"class", "class_id", "box_xyxy", "confidence" (None: from the layout alone), "provenance"}``.
    """
    chosen, reasons = select_labels(boxes, source, **settings)
    return [label_of(boxes[i], geometry) for i, geometry in chosen], reasons


def detector_labels(detections: Sequence[dict[str, Any]], min_confidence: float) -> list[dict[str, Any]]:
    """Labels of an image without a layout: its manifest detections at or above ``min_confidence``."""
    return [
        {
            "class": d["class"],
            "class_id": d["class_id"],
            "box_xyxy": list(d["box_xyxy"]),
            "confidence": d["confidence"],
            "provenance": "detector",
        }
        for d in detections
        if d["confidence"] >= min_confidence
    ]


def label_of(b: BoxProvenance, geometry: str) -> dict[str, Any]:
    box = b.layout_xyxy if geometry == "layout" and b.layout_xyxy is not None else b.detector_xyxy
    return {
        "class": bdd.DET_CLASSES[b.class_id],
        "class_id": b.class_id,
        "box_xyxy": _rounded(box),
        "confidence": b.confidence,
        "provenance": b.provenance,
    }


def _rounded(box: Sequence[float] | None) -> list[float] | None:
    return None if box is None else [round(float(v), 2) for v in box]


# ---------------------------------------------------------------------------------------------------------------
# Agreement rates over a run
# ---------------------------------------------------------------------------------------------------------------


def rates(counts: dict[str, int]) -> dict[str, Any]:
    """Counts plus each provenance's share of all boxes, and the layout's recall (confirmed share of the source
    boxes) and precision (confirmed share of the detector's boxes); None where a denominator is 0."""
    c, lo, do = counts["confirmed"], counts["layout_only"], counts["detector_only"]
    total = c + lo + do
    out: dict[str, Any] = {**{p: counts[p] for p in PROVENANCES}, "total": total}
    for p in PROVENANCES:
        out[f"{p}_rate"] = round(counts[p] / total, 4) if total else None
    out["layout_recall"] = round(c / (c + lo), 4) if c + lo else None
    out["layout_precision"] = round(c / (c + do), 4) if c + do else None
    return out


def agreement_stats(provenance_lists: Iterable[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """Agreement over the images given (each a manifest ``provenance`` list): all boxes, per class, per size.

    Classes and sizes without a box are left out; sizes are COCO's, by area in the generated image's pixels
    (a confirmed or layout_only box by its source box, a detector_only one by the detection).
    """
    total = dict.fromkeys(PROVENANCES, 0)
    per_class: dict[str, dict[str, int]] = {}
    per_size: dict[str, dict[str, int]] = {}
    n_images = 0
    for boxes in provenance_lists:
        n_images += 1
        for b in boxes:
            total[b["provenance"]] += 1
            per_class.setdefault(b["class"], dict.fromkeys(PROVENANCES, 0))[b["provenance"]] += 1
            per_size.setdefault(b["size"], dict.fromkeys(PROVENANCES, 0))[b["provenance"]] += 1
    return {
        "images": n_images,
        "size_buckets": "COCO areas in the generated image's pixels: small < 32^2, medium < 96^2, large >= 96^2",
        "all": rates(total),
        "per_class": {c: rates(per_class[c]) for c in bdd.DET_CLASSES if c in per_class},
        "per_size": {s: rates(per_size[s]) for s in SIZES if s in per_size},
    }
