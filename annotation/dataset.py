"""Per-image records and the YOLO dataset they become.

A record (one line of manifest.jsonl) holds what inference found, keyed by the image's relative path ``key``
(``<input folder name>/<path inside it>``); the decision fields (labels and their provenance, accepted, split,
layout scores) are recomputed from it and the image's layout on every run, so changing a threshold or
``labels.source`` and rerunning re-filters and relabels without re-running the detector.
:func:`sync_dataset_files` then makes images/, labels/ and confidences/ match the decisions: idempotent, atomic
writes, no appends, files of images that moved split or became rejected removed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from annotation import consensus
from annotation.layout import LayoutSources, MatchResult
from annotation.settings import AnnotationConfig
from core.io import atomic_write_text, link_or_copy, read_jsonl
from vocab import bdd

SPLITS = ("train", "val")
MANIFEST_JSONL = "manifest.jsonl"
MANIFEST_CSV = "manifest.csv"
#: what :func:`decide` recomputes on every run (everything else in a record is what inference found)
DECISION_FIELDS = (
    "reasons", "status", "split", "kept", "n_labels", "counts", "min_confidence", "mean_confidence", "layout",
    "layout_note", "labels", "provenance", "labels_source", "labels_note",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Names and split
# ---------------------------------------------------------------------------------------------------------------


def flat_stem(key: str) -> str:
    """'gen/sub/000001.png' -> 'gen__sub__000001' (one folder level in the dataset, names stay readable)."""
    return os.path.splitext(key)[0].replace("/", "__")


def unique_stem(key: str, taken: set[str]) -> str:
    """A dataset file stem for ``key`` not in ``taken`` (a.png and a.jpg in one folder -> a, a_jpg)."""
    candidate = flat_stem(key)
    if candidate in taken:
        candidate = f"{candidate}_{os.path.splitext(key)[1].lstrip('.').lower()}"
    base, n = candidate, 2
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate)
    return candidate


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """'train' or 'val' from a hash of (seed, key): stable per image, so new images never reshuffle old ones."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


# ---------------------------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------------------------


def decide(
    record: dict[str, Any], cfg: AnnotationConfig, layout: LayoutSources, output_classes: set[int]
) -> None:
    """Fill a record's decision fields in place from its detections and its layout (never the detector):
    labels and their provenance, counts, layout scores, status, reasons, split."""
    flt, lab = cfg.filter, cfg.labels
    for field in DECISION_FIELDS:
        record.pop(field, None)
    if record.get("error"):
        record.update(status="rejected", reasons=["unreadable"], split=None, kept=0, n_labels=0, counts={})
        record.update(min_confidence=None, mean_confidence=None, layout=None, layout_note=None)
        record.update(labels=[], provenance=None, labels_source=None, labels_note=None)
        return
    kept = [d for d in record["detections"] if d["confidence"] >= flt.min_confidence]
    confs = [d["confidence"] for d in kept]
    record["kept"] = len(kept)
    record["min_confidence"] = round(min(confs), 6) if confs else None
    record["mean_confidence"] = round(sum(confs) / len(confs), 6) if confs else None

    reasons = []
    record.update(layout=None, layout_note=None, provenance=None, labels_note=None)
    sources, note = None, "no metadata.jsonl record"
    ref = layout.ref_for(Path(record["source"]))
    if ref is not None:
        sources, note = layout.source_boxes(
            ref, (record["width"], record["height"]), output_classes, flt.layout_min_box_size
        )
        record["layout_note"] = note
    if sources is None:  # no source layout (a LoRA generation): detector labels whatever labels.source says
        labels = consensus.detector_labels(record["detections"], flt.min_confidence)
        record["labels_source"] = "detector"
        if lab.source != "detector":
            record["labels_note"] = f"no source layout ({note}): detector labels instead of {lab.source}"
    else:
        detections = [(d["class_id"], d["confidence"], d["box_xyxy"]) for d in record["detections"]]
        boxes = consensus.match_provenance(
            detections, sources, flt.layout_iou, flt.min_confidence, lab.confirm_min_confidence
        )
        n = consensus.counts_of(boxes)
        match = MatchResult(n["confirmed"], len(sources), n["confirmed"] + n["detector_only"])
        record["layout"] = {
            "source_frame": ref.source_frame,
            "recall": round(match.recall, 4),
            "precision": round(match.precision, 4),
            "score": round(match.score, 4),
            "matched": match.matched,
            "n_source": match.n_source,
            "n_detected": match.n_detected,
            **{f"n_{p}": n[p] for p in consensus.PROVENANCES},
            "disagreement": round(consensus.disagreement_share(n), 4),
        }
        chosen, policy_reasons = consensus.select_labels(
            boxes,
            lab.source,
            min_confidence=flt.min_confidence,
            policy=lab.policy,
            geometry=lab.geometry,
            detector_only_min_confidence=lab.detector_only_min_confidence,
            max_disagreement=lab.max_disagreement,
        )
        labels = [consensus.label_of(boxes[i], geometry) for i, geometry in chosen]
        is_label = {i for i, _ in chosen}
        record["provenance"] = [{**b.to_json(), "label": i in is_label} for i, b in enumerate(boxes)]
        record["labels_source"] = lab.source
        if lab.source != "layout":  # layout labels trust the layout: the detector's scores never reject
            if match.recall < flt.min_recall:
                reasons.append("low_layout_recall")
            if match.precision < flt.min_precision:
                reasons.append("low_layout_precision")
        reasons += policy_reasons
    if len(labels) < flt.min_detections:
        reasons.insert(0, "too_few_detections")
    record["labels"] = labels
    record["n_labels"] = len(labels)
    record["counts"] = dict(Counter(label["class"] for label in labels))
    record["reasons"] = reasons
    record["status"] = "rejected" if reasons else "accepted"
    record["split"] = None if reasons else split_of(record["key"], cfg.split.seed, cfg.split.val_fraction)


def label_lines(record: dict[str, Any]) -> tuple[str, str]:
    """(YOLO label text, confidence sidecar text): one line per label, in the same order; a label from the
    layout alone has no detector confidence (``nan``)."""
    w, h = record["width"], record["height"]
    labels, confs = [], []
    for d in record["labels"]:
        x1, y1, x2, y2 = d["box_xyxy"]
        x1, x2 = (min(max(v, 0.0), w) for v in (x1, x2))
        y1, y2 = (min(max(v, 0.0), h) for v in (y1, y2))
        if x2 <= x1 or y2 <= y1:
            continue
        cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
        labels.append(f"{d['class_id']} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
        confs.append("nan\n" if d["confidence"] is None else f"{d['confidence']:.6f}\n")
    return "".join(labels), "".join(confs)


# ---------------------------------------------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------------------------------------------


def dataset_paths(out: Path, split: str, record: dict[str, Any]) -> tuple[Path, Path, Path]:
    stem, ext = record["out_stem"], os.path.splitext(record["key"])[1].lower()
    return (
        out / "images" / split / f"{stem}{ext}",
        out / "labels" / split / f"{stem}.txt",
        out / "confidences" / split / f"{stem}.txt",
    )


def make_dirs(out: Path) -> None:
    for kind in ("images", "labels", "confidences"):
        for split in SPLITS:
            (out / kind / split).mkdir(parents=True, exist_ok=True)


def sync_dataset_files(out: Path, record: dict[str, Any], cfg: AnnotationConfig, fresh: bool) -> None:
    """Make the record's dataset files match its decision (``fresh``: the source was (re)read in this run)."""
    for split in SPLITS:
        image, label, conf = dataset_paths(out, split, record)
        if record["status"] == "accepted" and record["split"] == split:
            if fresh or not image.exists():
                place_image(Path(record["source"]), image, cfg.output.image_mode)
            label_text, conf_text = label_lines(record)
            write_if_changed(label, label_text)
            if cfg.output.confidence_sidecars:
                write_if_changed(conf, conf_text)
            elif conf.exists():
                conf.unlink()
        else:
            for path in (image, label, conf):
                if path.exists():
                    path.unlink()


def place_image(src: Path, dest: Path, mode: str) -> None:
    """Hardlink (falls back to a copy across file systems) or copy, atomically replacing ``dest``."""
    link_or_copy(src, dest, hardlink=mode == "hardlink")


def write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def write_data_yaml(out: Path, n_train: int, n_val: int) -> tuple[Path, list[str]]:
    """data.yaml with an absolute path, the 10 BDD classes, no download key. Returns it and any warnings."""
    warnings = []
    train, val = "images/train", "images/val"
    if n_val == 0 and n_train > 0:
        val = train
        warnings.append(
            "no accepted image fell into val: data.yaml validates on images/train (raise --val_fraction)"
        )
    elif n_train == 0 and n_val > 0:
        train = val
        warnings.append(
            "no accepted image fell into train: data.yaml trains on images/val (lower --val_fraction)"
        )
    elif n_train == 0:
        warnings.append("no image was accepted: the dataset is empty and `yolo train` will refuse it")
    data = {
        "path": str(out.resolve()),
        "train": train,
        "val": val,
        "nc": len(bdd.DET_CLASSES),
        "names": dict(enumerate(bdd.DET_CLASSES)),
    }
    path = out / "data.yaml"
    header = (
        "# Written by annotation/yolo_annotate_folders.py: `yolo train data=<this file>` takes it as is.\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path, warnings


# ---------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------


def load_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """key -> record from a previous run's manifest.jsonl ({} when there is none; bad lines are an error)."""
    from core.cli import UserError

    path = out / MANIFEST_JSONL
    if not path.is_file():
        return {}
    records = {}
    hint = "a manifest record; the output folder holds a damaged manifest (move it away to start that folder over)"
    for lineno, rec in read_jsonl(path, what=hint):
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            raise UserError(f"{path}:{lineno}: not {hint}")
        records[rec["key"]] = rec
    return records


def write_manifests(out: Path, records: dict[str, dict[str, Any]]) -> None:
    """manifest.jsonl (full records) and manifest.csv (one flat row per image), both rewritten atomically."""
    ordered = [records[k] for k in sorted(records)]
    atomic_write_text(out / MANIFEST_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered))
    buf = io.StringIO()
    columns = [
        "key",
        "status",
        "reasons",
        "split",
        "out_stem",
        "width",
        "height",
        "kept",
        "labels_source",
        "n_labels",
        *(f"n_{c.replace(' ', '_')}" for c in bdd.DET_CLASSES),
        "min_confidence",
        "mean_confidence",
        "layout_recall",
        "layout_precision",
        "layout_score",
        "n_confirmed",
        "n_layout_only",
        "n_detector_only",
        "disagreement",
        "layout_note",
        "labels_note",
        "detections",
        "source",
        "sha256",
    ]
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in ordered:
        counts = r.get("counts") or {}
        layout = r.get("layout") or {}
        dets = ";".join(
            f"{d['class']}:{d['confidence']:.3f}:" + ",".join(f"{v:.1f}" for v in d["box_xyxy"])
            for d in r.get("detections", [])
        )
        writer.writerow(
            [
                r["key"],
                r.get("status"),
                "|".join(r.get("reasons") or []) or (r.get("error") or ""),
                r.get("split") or "",
                r.get("out_stem"),
                r.get("width"),
                r.get("height"),
                r.get("kept"),
                r.get("labels_source") or "",
                _blank(r.get("n_labels")),
                *(counts.get(c, 0) for c in bdd.DET_CLASSES),
                _blank(r.get("min_confidence")),
                _blank(r.get("mean_confidence")),
                _blank(layout.get("recall")),
                _blank(layout.get("precision")),
                _blank(layout.get("score")),
                *(_blank(layout.get(f"n_{p}")) for p in consensus.PROVENANCES),
                _blank(layout.get("disagreement")),
                r.get("layout_note") or "",
                r.get("labels_note") or "",
                dets,
                r.get("source"),
                r.get("sha256"),
            ]
        )
    atomic_write_text(out / MANIFEST_CSV, buf.getvalue())


def _blank(value: Any) -> Any:
    return "" if value is None else value
