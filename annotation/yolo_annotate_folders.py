"""Auto-annotate folders of (generated) traffic images with a YOLO detector into a dataset `yolo train` takes as is.

Usage::

    python annotation/yolo_annotate_folders.py --input_folder generations/ --output_folder annotated/ \\
        --model models/yolov8x.pt [--config config/annotation.yaml] [--conf 0.1] [--min_confidence 0.3] ...
    yolo train data=annotated/data.yaml model=yolov8n.pt

Input folders are walked recursively for jpg/jpeg/png/webp. Detections are mapped to the 10 BDD100K detection
classes (COCO -> BDD by default, identity for a detector already trained on BDD classes, or --class_map),
filtered by confidence, count and, where a ``metadata.jsonl`` beside the images names each image's source layout
(its source frame and det_20 labels, or an inline ``labels`` list), by layout consistency. Such an image's labels
come from ``labels.source`` (--labels_source): the detector, the layout, or their consensus (annotation/consensus.py:
boxes both agree on, plus the disagreements a policy keeps; every box's provenance goes to the manifest and the
summary reports agreement per class and size). Images without a layout keep the detector's labels.

Outputs in --output_folder: images/{train,val}/ (hardlinks or copies of accepted images), labels/{train,val}/
(YOLO txt, an empty file for an accepted image without detections), confidences/{train,val}/ (one confidence per
label line), data.yaml (absolute path, BDD class names), previews/ and contact_sheet.jpg, manifest.jsonl and
manifest.csv (every image: detections, labels and their provenance, counts, confidences, layout scores, accepted
or why not), summary.json (and agreement.png when images have layouts).

Nothing goes online: ultralytics is imported only after its offline switches are set, weights are only ever
read from a local file. A rerun into the same folder skips images already processed (same relative path and
file hash, same model settings) and re-applies the filters to all records, so changing a threshold is cheap.
Flags override the YAML config; every value is checked against the schema in annotation/settings.py.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from annotation import consensus, dataset
from annotation.layout import METADATA_FILE, LayoutSources
from annotation.settings import AnnotationConfig, parse_class_map_arg, resolve_class_map
from core import report
from core.cli import UserError, run_main, setup_logging
from core.config import load_config, save_resolved_config
from core.io import atomic_write_text, sha256_bytes
from vocab import bdd

log = logging.getLogger("bdd-sdxl.annotation")

#: command-line flag -> dotted config key
FLAG_KEYS: dict[str, str] = {
    "model": "model",
    "conf": "predict.conf",
    "iou": "predict.iou",
    "imgsz": "predict.imgsz",
    "batch": "predict.batch",
    "device": "predict.device",
    "classes": "classes",
    "class_map": "class_map",
    "min_detections": "filter.min_detections",
    "min_confidence": "filter.min_confidence",
    "min_recall": "filter.min_recall",
    "min_precision": "filter.min_precision",
    "labels_source": "labels.source",
    "labels_policy": "labels.policy",
    "val_fraction": "split.val_fraction",
    "seed": "split.seed",
}
CHUNK_BATCHES = 8  # images per predict() call = batch x this: bounded memory, manifest saved after each chunk


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="YOLO auto-annotation of image folders into a BDD100K-class YOLO dataset (offline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input_folder", nargs="+", required=True, help="folders of images (walked recursively)")
    p.add_argument("--output_folder", required=True, help="dataset folder; a rerun into it resumes")
    p.add_argument(
        "--config", default=None, help="YAML config (e.g. config/annotation.yaml); flags override it"
    )
    p.add_argument(
        "--model", help="local weights (.pt) or an architecture yaml (yolov8n.yaml: random weights)"
    )
    p.add_argument("--conf", help="predict confidence threshold (detections below are never returned)")
    p.add_argument("--iou", help="NMS IoU threshold")
    p.add_argument("--imgsz", help="inference size in pixels")
    p.add_argument("--batch", help="images per inference batch")
    p.add_argument("--device", help="cpu, 0, cuda:0 ... (default: auto)")
    p.add_argument("--classes", help="comma-separated BDD classes to keep, e.g. 'car,bus,truck'")
    p.add_argument("--class_map", help="YAML file, inline '{person: pedestrian}' or 'person=pedestrian,...'")
    p.add_argument("--min_detections", help="reject images with fewer kept detections")
    p.add_argument("--min_confidence", help="detections below become no label")
    p.add_argument("--min_recall", help="reject below this layout recall (images with source metadata)")
    p.add_argument("--min_precision", help="reject below this layout precision (images with source metadata)")
    p.add_argument(
        "--labels_source",
        help="labels of images with a source layout: detector, layout or consensus (images without one: detector)",
    )
    p.add_argument("--labels_policy", help="consensus disagreements: keep_layout, confirmed or strict")
    p.add_argument("--val_fraction", help="share of accepted images in val (stable per image)")
    p.add_argument("--seed", help="seed of the train/val split")
    p.add_argument("--log_level", default=None, help="DEBUG, INFO, WARNING")
    return p


def merged_config(args: argparse.Namespace) -> AnnotationConfig:
    """YAML config (or defaults) with the flags given on the command line, validated by the schema."""
    flags: dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    if args.classes is not None:
        flags["classes"] = [v.strip() for v in args.classes.split(",") if v.strip()]
    if args.class_map is not None:
        flags["class_map"] = parse_class_map_arg(args.class_map)
    return load_config(AnnotationConfig, args.config, flags=flags)


def scan_inputs(folders: Sequence[str], output: Path) -> list[tuple[str, Path]]:
    """(key, absolute path) of every image; key = '<folder name>/<path inside it>', stable across reruns."""
    seen_names: dict[str, Path] = {}
    out = []
    output = output.resolve()
    for folder in folders:
        root = Path(folder).resolve()
        if not root.is_dir():
            raise UserError(f"input folder not found: {folder}")
        if root.name in seen_names and seen_names[root.name] != root:
            raise UserError(
                f"input folders {seen_names[root.name]} and {root} have the same name {root.name!r}, which keys "
                "the images in the manifest; pass their parent folder or rename one"
            )
        seen_names[root.name] = root
        images = [p for p in bdd.list_images(root, recursive=True) if output not in p.parents]
        if not images:
            log.warning("no images (%s) under %s", ", ".join(bdd.IMAGE_EXTENSIONS), folder)
        out += [(f"{root.name}/{p.relative_to(root).as_posix()}", p) for p in images]
    if not out:
        raise UserError(
            f"no images ({', '.join(bdd.IMAGE_EXTENSIONS)}) found under {', '.join(folders)} (searched recursively)"
        )
    return out


def read_image(path: Path) -> tuple[str, int, int, str | None]:
    """(sha256, width, height, error) after a full decode, so corrupt or truncated files are caught here."""
    from PIL import Image

    data = path.read_bytes()
    digest = sha256_bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            w, h = im.size
    except Exception as exc:  # PIL raises many types for broken files
        return digest, 0, 0, f"unreadable: {type(exc).__name__}: {exc}"
    if min(w, h) < 10:
        return digest, w, h, f"unreadable: {w}x{h} is below ultralytics' 10-pixel minimum"
    return digest, w, h, None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    cfg = merged_config(args)
    out = Path(args.output_folder)
    images = scan_inputs(args.input_folder, out)
    layout = LayoutSources()
    if cfg.labels.source == "layout":
        require_some_layout(images, layout)
    from annotation import yolo_runtime  # no ultralytics import yet: that waits for prepare_offline()

    yolo_runtime.check_model_spec(cfg.model)

    # --- setup: offline ultralytics, model, class mapping ------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    (out / ".work").mkdir(exist_ok=True)
    dataset.make_dirs(out)
    yolo_runtime.prepare_offline(out / ".ultralytics")
    loaded = yolo_runtime.load_model(cfg.model)
    id_map, map_origin = resolve_class_map(loaded.names, cfg.class_map, cfg.classes)
    output_classes = set(id_map.values())
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                loaded.fingerprint,
                cfg.predict.conf,
                cfg.predict.iou,
                cfg.predict.imgsz,
                cfg.predict.max_det,
                id_map,
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    save_resolved_config(cfg, out / "annotation_config.yaml")
    log.info("model %s; classes: %s", loaded.description, map_origin)

    # --- resume: which images still need the detector --------------------------------------------------------
    records = dataset.load_manifest(out)
    previous = {k: decision_of(r) for k, r in records.items()}
    taken = {r["out_stem"] for r in records.values()}
    pending, skipped = [], 0
    for key, path in images:
        rec, st = records.get(key), path.stat()
        same_file = (
            rec is not None and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
        )
        if same_file and rec.get("inference") == fingerprint:
            skipped += 1
        else:
            pending.append((key, path))

    # --- loop: hash and decode-check, then batched streamed inference ------------------------------------------
    fresh: set[str] = set()
    unreadable: list[str] = []
    n_inferred, t0 = 0, time.perf_counter()
    chunk = cfg.predict.batch * CHUNK_BATCHES
    names = loaded.names
    try:
        with tqdm(total=len(pending), desc="annotating", unit="img", disable=not pending) as bar:
            for start in range(0, len(pending), chunk):
                to_predict: dict[Path, dict[str, Any]] = {}
                for key, path in pending[start : start + chunk]:
                    st = path.stat()
                    digest, w, h, error = read_image(path)
                    rec = records.get(key)
                    if rec and rec.get("sha256") == digest and rec.get("inference") == fingerprint:
                        rec.update(size=st.st_size, mtime_ns=st.st_mtime_ns, source=str(path))  # touched only
                        skipped += 1
                        bar.update()
                        continue
                    out_stem = rec["out_stem"] if rec else dataset.unique_stem(key, taken)
                    new = {"key": key, "source": str(path), "out_stem": out_stem, "sha256": digest}
                    new.update(
                        size=st.st_size, mtime_ns=st.st_mtime_ns, width=w, height=h, inference=fingerprint
                    )
                    new.update(detections=[], error=error)
                    if error:
                        records[key] = new
                        fresh.add(key)
                        unreadable.append(key)
                        log.warning("skipping %s: %s", path, error)
                        bar.update()
                    else:
                        to_predict[path.resolve()] = new
                if not to_predict:
                    continue
                results = yolo_runtime.stream_predictions(
                    loaded,
                    list(to_predict),
                    out / ".work" / "sources.txt",
                    conf=cfg.predict.conf,
                    iou=cfg.predict.iou,
                    imgsz=cfg.predict.imgsz,
                    batch=cfg.predict.batch,
                    device=cfg.predict.device,
                    max_det=cfg.predict.max_det,
                    classes=sorted(id_map),
                )
                for result in results:
                    rec = to_predict.pop(Path(result.path).resolve(), None)
                    if rec is None:
                        continue
                    rec.update(width=result.width, height=result.height)
                    rec["detections"] = [
                        {
                            "class": bdd.DET_CLASSES[id_map[d.model_class]],
                            "class_id": id_map[d.model_class],
                            "model_class": names[d.model_class],
                            "confidence": round(d.confidence, 6),
                            "box_xyxy": [round(v, 2) for v in d.xyxy],
                        }
                        for d in result.detections
                        if d.model_class in id_map
                    ]
                    records[rec["key"]] = rec
                    fresh.add(rec["key"])
                    n_inferred += 1
                    bar.update()
                for (
                    rec
                ) in to_predict.values():  # ultralytics skipped these (read error): listed, never silent
                    rec.update(error="unreadable: ultralytics could not read it")
                    records[rec["key"]] = rec
                    fresh.add(rec["key"])
                    unreadable.append(rec["key"])
                    log.warning("skipping %s: ultralytics could not read it", rec["source"])
                    bar.update()
                dataset.write_manifests(out, records)  # resume point
    finally:
        dataset.write_manifests(out, records)
    elapsed = time.perf_counter() - t0

    # --- save: decisions for every record, dataset files, previews, data.yaml, manifests, summary --------------
    from annotation import previews

    sheet_items = []
    for key in tqdm(sorted(records), desc="writing dataset", unit="img", disable=len(records) < 200):
        rec = records[key]
        dataset.decide(rec, cfg, layout, output_classes)
        dataset.sync_dataset_files(out, rec, cfg, fresh=key in fresh)
        changed = key in fresh or previous.get(key) != decision_of(rec)
        preview = out / "previews" / f"{rec['out_stem']}.jpg"
        if cfg.output.previews and not rec.get("error") and (changed or not preview.exists()):
            preview.parent.mkdir(exist_ok=True)
            image = previews.draw_preview(rec, cfg.filter.min_confidence, cfg.output.preview_max_side)
            previews.save_jpeg(image, preview)
        if key in fresh and preview.exists() and len(sheet_items) < cfg.output.contact_sheet_max_images:
            sheet_items.append((preview, rec))
    if sheet_items:
        previews.save_jpeg(
            previews.contact_sheet(sheet_items, cfg.output.contact_sheet_thumb), out / "contact_sheet.jpg"
        )
    dataset.write_manifests(out, records)
    split_counts = Counter(r["split"] for r in records.values() if r["status"] == "accepted")
    data_yaml, warnings = dataset.write_data_yaml(out, split_counts["train"], split_counts["val"])
    for warning in warnings:
        log.warning(warning)

    summary = build_summary(records, len(images), n_inferred, skipped, unreadable, elapsed, data_yaml)
    summary.update(labels_summary(records, cfg))
    if summary["images_without_layout"] and cfg.labels.source != "detector":
        warnings.append(
            f"labels.source is {cfg.labels.source}, but {summary['images_without_layout']} image(s) have no source "
            "layout: they keep the detector's labels (labels_note in the manifest says why)"
        )
        log.warning(warnings[-1])
    summary["agreement_plot"] = None
    if summary["agreement"]["all"]["total"]:
        plot_agreement(summary["agreement"], out / "agreement.png")
        summary["agreement_plot"] = str((out / "agreement.png").resolve())
    elif (out / "agreement.png").exists():  # a previous run's, from layouts that are gone now
        (out / "agreement.png").unlink()
    summary.update(model=loaded.description, class_map=map_origin, warnings=warnings)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return 0


def require_some_layout(images: Sequence[tuple[str, Path]], layout: LayoutSources) -> None:
    """labels.source: layout with no image that has a source layout is a mistake (a LoRA folder, a missing
    metadata.jsonl or labels file): refuse before anything is written. Some images without one keep detector
    labels (said in the manifest and the summary)."""
    first_note = "no metadata.jsonl beside the images"
    for _key, path in images:
        ref = layout.ref_for(path)
        if ref is None:
            continue
        boxes, note = layout.source_boxes(ref, (1, 1), set(range(len(bdd.DET_CLASSES))))
        if boxes is not None:
            return
        first_note = f"{path.name}: {note}"
    raise UserError(
        f"labels.source is layout, but none of the {len(images)} images has a source layout ({first_note}). "
        f"Layouts come from a {METADATA_FILE} beside the images (source_frame + source_labels, or inline labels, "
        "as ControlNet generation writes it); for images without one use --labels_source detector"
    )


def decision_of(record: dict[str, Any]) -> tuple:
    """What a preview shows that a rerun may change."""
    fields = ("status", "split", "reasons", "labels", "labels_source", "provenance", "layout")
    return tuple(json.dumps(record.get(f), sort_keys=True) for f in fields)


def labels_summary(records: dict[str, dict[str, Any]], cfg: AnnotationConfig) -> dict[str, Any]:
    """Where labels came from and how layout and detector agree (images with a layout, accepted or not)."""
    readable = [r for r in records.values() if not r.get("error")]
    with_layout = [r for r in readable if r.get("provenance") is not None]
    by_provenance = Counter(
        label["provenance"] for r in readable if r["status"] == "accepted" for label in r["labels"]
    )
    return {
        "labels_source": cfg.labels.source,
        "labels_policy": cfg.labels.policy if cfg.labels.source == "consensus" else None,
        "images_by_labels_source": dict(Counter(r["labels_source"] for r in readable).most_common()),
        "images_without_layout": len(readable) - len(with_layout),
        "dataset_labels_by_provenance": {
            p: by_provenance[p] for p in (*consensus.PROVENANCES, "detector") if by_provenance[p]
        },
        "agreement": consensus.agreement_stats(r["provenance"] for r in with_layout),
    }


def plot_agreement(agreement: dict[str, Any], path: Path) -> None:
    """Stacked bars: the share of confirmed, layout-only and detector-only boxes overall, per class, per size."""
    from annotation.previews import PROVENANCE_RGB

    groups = [("all", agreement["all"])]
    groups += [(c, v) for c, v in agreement["per_class"].items()]
    groups += [(f"size: {s}", v) for s, v in agreement["per_size"].items()]
    fig, ax = report.subplots(figsize=(7, 0.35 * len(groups) + 1.2))
    y = list(range(len(groups)))[::-1]
    left = [0.0] * len(groups)
    for p in consensus.PROVENANCES:
        shares = [g[f"{p}_rate"] or 0.0 for _, g in groups]
        ax.barh(y, shares, left=left, color=[c / 255 for c in PROVENANCE_RGB[p]], label=p.replace("_", "-"))
        left = [a + b for a, b in zip(left, shares, strict=True)]
    ax.set_yticks(y, [f"{name} (n={g['total']})" for name, g in groups])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of boxes")
    ax.set_title(
        f"layout vs detector agreement, {agreement['images']} images (sizes: COCO areas)", fontsize=9
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=100)


def build_summary(records, n_seen, n_inferred, n_skipped, unreadable, elapsed, data_yaml) -> dict[str, Any]:
    accepted = [r for r in records.values() if r["status"] == "accepted"]
    rejected = Counter(
        reason for r in records.values() if r["status"] == "rejected" for reason in r["reasons"]
    )
    by_class = Counter()
    for r in accepted:
        by_class.update(r["counts"])
    return {
        "images_seen": n_seen,
        "images_annotated_now": n_inferred,
        "images_skipped_already_done": n_skipped,
        "unreadable_now": sorted(unreadable),
        "images_per_second": round(n_inferred / elapsed, 2) if n_inferred and elapsed > 0 else None,
        "dataset_images": len(records),
        "accepted": len(accepted),
        "train": sum(r["split"] == "train" for r in accepted),
        "val": sum(r["split"] == "val" for r in accepted),
        "rejected": sum(r["status"] == "rejected" for r in records.values()),
        "rejected_by_reason": dict(rejected.most_common()),
        "detections_by_class": {c: by_class[c] for c in bdd.DET_CLASSES if by_class[c]},
        "data_yaml": str(data_yaml.resolve()),
    }


def print_summary(s: dict[str, Any]) -> None:
    speed = f" at {s['images_per_second']} images/s" if s["images_per_second"] else ""
    print(
        f"images seen: {s['images_seen']}, annotated now: {s['images_annotated_now']}{speed}, "
        f"skipped (already done): {s['images_skipped_already_done']}, unreadable: {len(s['unreadable_now'])}"
    )
    for key in s["unreadable_now"]:
        print(f"  unreadable: {key}")
    print(
        f"dataset: {s['dataset_images']} images, accepted {s['accepted']} (train {s['train']}, val {s['val']}), "
        f"rejected {s['rejected']}"
        + (
            " (" + ", ".join(f"{k}: {v}" for k, v in s["rejected_by_reason"].items()) + ")"
            if s["rejected"]
            else ""
        )
    )
    classes = ", ".join(f"{k}: {v}" for k, v in s["detections_by_class"].items()) or "none"
    print(f"labels by class: {classes}")
    sources = ", ".join(f"{k}: {v}" for k, v in s["images_by_labels_source"].items()) or "none"
    policy = f", policy {s['labels_policy']}" if s["labels_policy"] else ""
    print(f"labels.source {s['labels_source']}{policy}; images by label source: {sources}")
    if s["dataset_labels_by_provenance"]:
        prov = ", ".join(f"{k.replace('_', '-')}: {v}" for k, v in s["dataset_labels_by_provenance"].items())
        print(f"dataset labels by provenance: {prov}")
    agreement = s["agreement"]
    if agreement["all"]["total"]:
        print(
            f"layout vs detector agreement over {agreement['images']} images with a source layout "
            "(sizes: COCO areas in generated pixels, small < 32^2 <= medium < 96^2 <= large):"
        )
        print(f"  {'':<16}{'confirmed':>10}{'layout-only':>12}{'detector-only':>14}{'conf. rate':>11}")
        rows = [("all", agreement["all"]), *agreement["per_class"].items()]
        rows += [(f"size {k}", v) for k, v in agreement["per_size"].items()]
        for name, g in rows:
            print(
                f"  {name:<16}{g['confirmed']:>10}{g['layout_only']:>12}{g['detector_only']:>14}"
                f"{g['confirmed_rate']:>11.2f}"
            )
        if s.get("agreement_plot"):
            print(f"  plot: {s['agreement_plot']}")
    if s["accepted"]:
        print(f"train with: yolo train data={s['data_yaml']}")
    else:  # an empty dataset is a result (nothing passed the filters), not a crash: say where and why to look
        manifest = Path(s["data_yaml"]).with_name("manifest.csv")
        print(
            f"YOLO dataset {s['data_yaml']} is empty: no image was accepted (reasons per image: {manifest})"
        )


if __name__ == "__main__":
    sys.exit(run_main(main))
