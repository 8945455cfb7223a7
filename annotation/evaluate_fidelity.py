"""Layout fidelity of generated images: does a detector find the source layout's boxes in them as well as in the
real frames those layouts came from?

Usage::

    python annotation/evaluate_fidelity.py --generations inference_outputs/controlnet/generations \\
        --detector models/yolo_bdd.pt --bdd_data_dir $BDD_DATA_DIR [--out inference_outputs/controlnet/fidelity] \\
        [--imgsz 640] [--batch 16] [--device 0] [--classes car bus ...] [--class_map ...] [--max_images N] \\
        [--seg_model FOLDER] [--fid_features FILE [--fid_dims 2048]]
    python annotation/evaluate_fidelity.py --generations G --detector D --real_images FOLDER ...
    python annotation/evaluate_fidelity.py --config config/fidelity.yaml [--check] [key=value ...]

Settings come from a YAML config (config/fidelity.yaml documents every key; annotation/fidelity_config.py is its
schema), the flags above (each another spelling of a key: ``--imgsz`` is ``detector.imgsz``) and ``key=value``
overrides, in that order; ``--check`` validates them and the inputs and exits.

Each generated image listed in ``metadata.jsonl`` beside it (``file``, ``source_frame``, ``source_labels``,
``source_size``, ``mask_path``: what ControlNet generation records) is paired with its source frame: the real image
of that name under ``--bdd_data_dir``'s ``images/100k/<split>`` (else ``images/10k/<split>``) or anywhere under
``--real_images``. The ground truth of both is the source frame's det_20 boxes (annotation/layout.py: scaled to
each image's saved size), its ignore regions (det_20's ignored categories, crowd boxes) as COCO crowd boxes. The
detector runs on both sets the same way (conf 0.001, as for any mAP) and annotation/metrics.py computes mAP50 and
mAP50-95 as pycocotools' COCOeval does (:data:`annotation.metrics.DEFINITION`), overall, per class and per size
(COCO's small/medium/large, judged in the real frame's pixels so that an object lands in the same bin in both
sets). A source frame with several generations counts once per generation on the real side too, so both
sets weight the layouts alike. The **fidelity ratio** is generated / real: 1.0 means the generated images are as
detectable as the real frames (the "YOLO score" of layout-to-image work, normalised by the real oracle).

Optional, with local models (nothing is ever downloaded):

* ``--seg_model FOLDER``: a transformers semantic segmentation model trained on Cityscapes' 19 classes (BDD100K's
  sem_seg ids are Cityscapes' trainIds), e.g. a SegFormer folder. Its prediction on each generated image is scored
  against the conditioning mask (``mask_path``) as mIoU (torchmetrics' MulticlassJaccardIndex, 255 ignored), and
  its prediction on the real frame the same way; their ratio is the segmentation fidelity. Box layouts (what a
  box-conditioned ControlNet records as ``mask_path``) are no masks and are left out.
* ``--fid_features FILE``: torch-fidelity's InceptionV3 weights (``weights-inception-2015-12-05-6726825d.pth``);
  FID and KID (torchmetrics) between the generated images and their unique real source frames.

Writes ``<out>/fidelity.json`` (everything), ``<out>/fidelity.md`` (a table) and ``<out>/fidelity_per_class.png``
(per-class mAP50, generated vs real), and prints the headline figures and where they are. ``--out`` defaults
to ``<generations>/../fidelity``. Records without a source layout, images missing or unreadable and source
frames absent from their labels file are skipped and counted; a generation whose real frame is missing is an
error (``--allow_missing_real`` evaluates the complete pairs only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotation import metrics
from annotation.fidelity_config import FID_HELP, SEG_MODEL_HELP, DetectorSettings, FidelityConfig
from annotation.layout import METADATA_FILE, LayoutSources, SourceRef, read_metadata
from annotation.settings import parse_class_map_arg
from core import report
from core.cli import UserError, run_main, setup_logging
from core.config import add_config_arguments, flag_values, load_config, save_resolved_config
from core.io import atomic_write_text
from vocab import bdd

log = logging.getLogger("bdd-sdxl.annotation")
SHOW = 5


@dataclass
class Pair:
    """One generated image and the real frame of its source layout, with that layout's boxes in each."""

    key: str  # the generated file's name
    generated: Path
    real: Path
    ref: SourceRef
    generated_size: tuple[int, int]
    real_size: tuple[int, int]
    truth_generated: list[tuple[int, list[float]]]
    truth_real: list[tuple[int, list[float]]]
    crowd_generated: list[tuple[int, list[float]]]  # the layout's ignore regions (scored as COCO crowd)
    crowd_real: list[tuple[int, list[float]]]


# ---------------------------------------------------------------------------------------------------------------
# Inputs: generations, their layouts, their real frames
# ---------------------------------------------------------------------------------------------------------------


def real_frame_index(bdd_data_dir: Path | None, real_images: Path | None) -> tuple[dict[str, Path], str]:
    """stem -> real image path, and a phrase saying where they were looked for."""
    index: dict[str, Path] = {}
    if real_images is not None:
        if not real_images.is_dir():
            raise UserError(f"--real_images folder not found: {real_images}")
        for path in bdd.list_images(real_images, recursive=True):
            index.setdefault(path.stem, path)
        return index, str(real_images)
    assert bdd_data_dir is not None
    if not bdd_data_dir.is_dir():
        raise UserError(f"BDD100K folder not found: {bdd_data_dir} (expected images/ and labels/ inside)")
    folders = [bdd_data_dir / "images" / sub / s for sub in ("100k", "10k") for s in bdd.SPLITS]
    for folder in folders:
        if folder.is_dir():
            for path in bdd.list_images(folder):
                index.setdefault(path.stem, path)
    return index, f"{bdd_data_dir}/images/{{100k,10k}}/{{train,val,test}}"


def image_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        return None


def read_refs(generations: Path) -> dict[str, SourceRef]:
    """file name -> SourceRef of the generations' metadata.jsonl; an error unless some record names a layout."""
    if not generations.is_dir():
        raise UserError(f"--generations folder not found: {generations}")
    metadata = generations / METADATA_FILE
    if not metadata.is_file():
        raise UserError(
            f"no {METADATA_FILE} in {generations}: fidelity needs each generation's source layout, which ControlNet "
            "generation records there (file, source_frame, source_labels, source_size)"
        )
    refs = read_metadata(metadata)
    if not any(r.source_frame and r.source_labels for r in refs.values()):
        planned = sum(r.labels is not None for r in refs.values())
        why = (
            f"{planned} carry a generation plan's inline layout, which has no real frame to compare with"
            if planned
            else "LoRA generations have none, ControlNet generation records them when paths.source_labels is set"
        )
        raise UserError(
            f"{metadata}: none of its {len(refs)} record(s) names a source layout (source_frame and source_labels); "
            + why
        )
    return refs


def collect_pairs(
    generations: Path,
    refs: dict[str, SourceRef],
    real_index: dict[str, Path],
    real_where: str,
    keep_classes: set[int],
    min_box_size: float,
    max_images: int | None,
    allow_missing_real: bool,
) -> tuple[list[Pair], Counter, dict[str, list[str]]]:
    """Pairs to score, skip counts by reason and a few names per reason."""
    layout = LayoutSources()
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}

    def skip(reason: str, name: str) -> None:
        skipped[reason] += 1
        examples.setdefault(reason, [])
        if len(examples[reason]) < SHOW:
            examples[reason].append(name)

    pairs, missing_real = [], []
    for name in sorted(refs):
        if max_images is not None and len(pairs) >= max_images:
            break
        ref = refs[name]
        if ref.labels is not None:
            skip("an inline layout (a generation plan's): no real frame to compare with", name)
            continue
        if not (ref.source_frame and ref.source_labels):
            skip("no source layout in its record", name)
            continue
        path = generations / name
        if not path.is_file():
            skip("listed in metadata.jsonl but not in the folder", name)
            continue
        size = image_size(path)
        if size is None:
            skip("unreadable image", name)
            continue
        real = real_index.get(bdd.stem(ref.source_frame))
        if real is None:
            missing_real.append(ref.source_frame)
            continue
        real_size = image_size(real)
        if real_size is None:
            raise UserError(f"cannot read the real frame {real} (source of {path})")
        truth_gen, note = layout.source_boxes(ref, size, keep_classes, min_box_size)
        if truth_gen is None:
            skip("source frame not in its labels file", f"{name} ({note})")
            continue
        truth_real, _ = layout.source_boxes(ref, real_size, keep_classes, min_box_size)
        crowd_gen, crowd_real = (
            layout.source_boxes(ref, s, keep_classes, crowd=True)[0] or [] for s in (size, real_size)
        )
        pairs.append(
            Pair(name, path, real, ref, size, real_size, truth_gen, truth_real or [], crowd_gen, crowd_real)
        )
    if missing_real:
        if not allow_missing_real:
            raise UserError(
                f"{len(missing_real)} generation(s) name a source frame not found under {real_where} "
                f"({', '.join(missing_real[:SHOW])}{' ...' if len(missing_real) > SHOW else ''}); pass the folder "
                "holding them with --bdd_data_dir or --real_images, or --allow_missing_real to score the rest"
            )
        skipped["real frame missing"] += len(missing_real)
        examples["real frame missing"] = missing_real[:SHOW]
    if not pairs:
        why = "; ".join(f"{reason}: {n}" for reason, n in skipped.items()) or "no records"
        raise UserError(f"no generation in {generations} can be scored ({why})")
    return pairs, skipped, examples


# ---------------------------------------------------------------------------------------------------------------
# Detection fidelity
# ---------------------------------------------------------------------------------------------------------------


def _boxes(items: list, scale: tuple[float, float], with_conf: bool) -> metrics.Boxes:
    """(cls, [conf,] xyxy) items as metrics.Boxes in the reference pixels (xyxy scaled by ``scale``)."""
    import numpy as np

    if not items:
        return metrics.Boxes.empty(with_conf=with_conf)
    sx, sy = scale
    xyxy = np.array([it[-1] for it in items], np.float64) * np.array([sx, sy, sx, sy])
    cls = np.array([it[0] for it in items], np.int64)
    conf = np.array([it[1] for it in items], np.float64) if with_conf else None
    return metrics.Boxes(xyxy, cls, conf)


def _truth(items: list, crowd: list, scale: tuple[float, float]) -> metrics.Boxes:
    """Ground truth: the layout's boxes, then its ignore regions as crowd boxes."""
    import numpy as np

    boxes = _boxes(items + crowd, scale, False)
    return metrics.Boxes(boxes.xyxy, boxes.cls, None, np.arange(len(boxes)) >= len(items))


def _mapped(pred: metrics.Boxes, mapping: dict[int, int]) -> list[tuple[int, float, list[float]]]:
    assert pred.conf is not None
    return [
        (mapping[int(c)], float(p), list(map(float, b)))
        for c, p, b in zip(pred.cls, pred.conf, pred.xyxy, strict=True)
        if int(c) in mapping
    ]


def detection_fidelity(
    pairs: list[Pair], loaded, mapping: dict[int, int], detector: DetectorSettings
) -> dict[str, Any]:
    """mAP tables of the generated images and of their real frames, and their ratios."""
    import tempfile

    real_paths = sorted({p.real.resolve() for p in pairs})
    d = detector
    kwargs = dict(imgsz=d.imgsz, batch=d.batch, device=d.device, conf=d.conf, iou=d.iou)
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        log.info("detector on %d generated images and %d real frames", len(pairs), len(real_paths))
        pred_gen = metrics.predict_boxes(
            loaded, [p.generated for p in pairs], Path(tmp) / "gen.txt", classes=sorted(mapping), **kwargs
        )
        pred_real = metrics.predict_boxes(
            loaded, real_paths, Path(tmp) / "real.txt", classes=sorted(mapping), **kwargs
        )
    unread = [str(p.generated) for p in pairs if p.generated.resolve() not in pred_gen]
    unread += [str(p) for p in real_paths if p not in pred_real]
    if unread:
        raise UserError(f"the detector could not read {len(unread)} image(s): {', '.join(unread[:SHOW])}")
    truths_gen, truths_real, preds_gen, preds_real = {}, {}, {}, {}
    for p in pairs:
        # reference pixels: the real frame's, so that an object is judged at one size in both sets
        scale = (p.real_size[0] / p.generated_size[0], p.real_size[1] / p.generated_size[1])
        truths_gen[p.key] = _truth(p.truth_generated, p.crowd_generated, scale)
        preds_gen[p.key] = _boxes(_mapped(pred_gen[p.generated.resolve()], mapping), scale, True)
        truths_real[p.key] = _truth(p.truth_real, p.crowd_real, (1.0, 1.0))
        preds_real[p.key] = _boxes(_mapped(pred_real[p.real.resolve()], mapping), (1.0, 1.0), True)
    classes = sorted(set(mapping.values()))
    generated = _restrict(metrics.detection_map(preds_gen, truths_gen, bdd.DET_CLASSES), classes)
    real = _restrict(metrics.detection_map(preds_real, truths_real, bdd.DET_CLASSES), classes)
    return {"generated": generated, "real": real, "ratio": ratios(generated, real)}


def _restrict(table: dict[str, Any], classes: list[int]) -> dict[str, Any]:
    """Only the evaluated classes in per_class (the others have no boxes and no detections here)."""
    table["per_class"] = {bdd.DET_CLASSES[c]: table["per_class"][bdd.DET_CLASSES[c]] for c in classes}
    return table


def ratios(generated: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
    def pair(g: dict, r: dict) -> dict[str, float | None]:
        return {k: metrics.ratio(g[k], r[k]) for k in ("map", "map50")}

    return {
        **pair(generated, real),
        "per_class": {
            c: pair(generated["per_class"][c], real["per_class"][c]) for c in generated["per_class"]
        },
        "per_size": {s: pair(generated["per_size"][s], real["per_size"][s]) for s in generated["per_size"]},
    }


# ---------------------------------------------------------------------------------------------------------------
# Segmentation fidelity (optional)
# ---------------------------------------------------------------------------------------------------------------


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def torch_device(spec: str | None):
    import torch

    if spec in (None, ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(f"cuda:{spec}" if str(spec).isdigit() else spec)


def load_segmenter(folder: Path):
    """A local transformers semantic segmentation model whose 19 classes are Cityscapes' (BDD100K's) trainIds
    (the config checked that the folder exists)."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    try:
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForSemanticSegmentation.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load a segmentation model from {folder}: {first}; {SEG_MODEL_HELP}"
        ) from None
    names = [str(model.config.id2label.get(i, "")).lower() for i in range(model.config.num_labels)]
    expected = [c.name for c in bdd.SEG_CLASSES]
    if names != expected:
        raise UserError(
            f"{folder} predicts {model.config.num_labels} classes ({', '.join(names[:6])}, ...); mask fidelity needs "
            f"Cityscapes' 19 in trainId order ({', '.join(expected[:6])}, ...), as BDD100K's sem_seg masks use"
        )
    return processor, model.eval()


def segmentation_fidelity(
    pairs: list[Pair], folder: Path, device_name: str | None, batch: int
) -> dict[str, Any]:
    """mIoU of the segmenter's prediction against each conditioning mask, on the generated and the real image."""
    import numpy as np
    import torch
    from torchmetrics.classification import MulticlassJaccardIndex

    from vocab import layouts

    conditioned = [p for p in pairs if p.ref.mask_path is not None and p.ref.mask_path.is_file()]
    # a box layout (box-conditioned ControlNet) is recorded as mask_path too; its ids (detection classes,
    # outlines) are valid trainIds by value, so only its file marker keeps it out of the mask mIoU
    found = {p.ref.mask_path: layouts.of_file(p.ref.mask_path) for p in conditioned}
    with_mask = [p for p in conditioned if found[p.ref.mask_path].cityscapes_ids]
    if not with_mask:
        kinds = dict.fromkeys(found.values())
        raise UserError(
            "--seg_model: no scored generation's record names an existing segmentation mask as mask_path "
            + (
                f"(all {len(conditioned)} name {' and '.join(k.what for k in kinds)}, whose ids are "
                f"{' and '.join(k.ids_are for k in kinds)}, not Cityscapes' ones)"
                if conditioned
                else "(ControlNet generation records each image's conditioning mask there)"
            )
        )
    processor, model = load_segmenter(folder)
    device = torch_device(device_name)
    model.to(device)
    n = bdd.NUM_SEG_CLASSES
    scores = {
        side: {
            "miou": MulticlassJaccardIndex(n, average="macro", ignore_index=bdd.SEG_IGNORE_ID),
            "iou": MulticlassJaccardIndex(n, average="none", ignore_index=bdd.SEG_IGNORE_ID),
        }
        for side in ("generated", "real")
    }
    pixels = np.zeros(n, np.int64)
    for start in range(0, len(with_mask), batch):
        chunk = with_mask[start : start + batch]
        masks = [torch.from_numpy(bdd.read_label_mask(p.ref.mask_path).astype(np.int64)) for p in chunk]
        for m in masks:
            pixels += np.bincount(m[m != bdd.SEG_IGNORE_ID].numpy().ravel(), minlength=n)[:n]
        sizes = [tuple(m.shape) for m in masks]
        for side in ("generated", "real"):
            images = [_rgb(getattr(p, side)) for p in chunk]
            inputs = processor(images=images, return_tensors="pt").to(device)
            with torch.no_grad():
                outputs = model(**inputs)
            preds = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            for pred, mask in zip(preds, masks, strict=True):
                for metric in scores[side].values():
                    metric.update(pred.cpu().reshape(1, -1), mask.reshape(1, -1))
    result: dict[str, Any] = {
        "model": str(folder),
        "images": len(with_mask),
        "box_layouts_left_out": len(conditioned) - len(with_mask),
    }
    for side in ("generated", "real"):
        result[f"miou_{side}"] = float(scores[side]["miou"].compute())
    result["ratio"] = metrics.ratio(result["miou_generated"], result["miou_real"])
    per_class = {side: scores[side]["iou"].compute().tolist() for side in ("generated", "real")}
    result["per_class"] = {
        c.name: {"pixels": int(pixels[c.train_id]), "generated": per_class["generated"][c.train_id],
                 "real": per_class["real"][c.train_id]}
        for c in bdd.SEG_CLASSES if pixels[c.train_id]
    }  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------------------------
# Distribution distance (optional)
# ---------------------------------------------------------------------------------------------------------------


def distribution_distance(
    pairs: list[Pair], weights: Path, dims: int, device_name: str | None, batch: int
) -> dict[str, Any]:
    """FID and KID (torchmetrics, InceptionV3 features from a local torch-fidelity weights file, which the
    config's check found)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real = sorted({p.real for p in pairs})
    generated = [p.generated for p in pairs]
    if len(real) < 2 or len(generated) < 2:
        return {
            "note": f"FID/KID need at least 2 images per set (got {len(generated)} generated, {len(real)} real)"
        }
    try:
        fid = FrechetInceptionDistance(feature=dims, feature_extractor_weights_path=str(weights))
    except Exception as exc:  # a foreign or truncated file: say which
        raise UserError(
            f"cannot load InceptionV3 weights from {weights}: {type(exc).__name__}: {exc}; {FID_HELP}"
        ) from None
    subset = min(1000, len(real), len(generated))
    with warnings.catch_warnings():  # "KID keeps every feature in memory": 8 kB per image at 2048 dims
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=fid.inception, subset_size=subset)  # the same (local) network
    device = torch_device(device_name)
    fid.to(device)
    kid.to(device)
    for is_real, paths in ((True, real), (False, generated)):
        by_size: dict[tuple[int, int], list[Path]] = {}
        for path in paths:
            with Image.open(path) as im:
                by_size.setdefault(im.size, []).append(path)
        for group in by_size.values():  # the network resizes to 299x299; a batch needs one input size
            for start in range(0, len(group), batch):
                images = [np.asarray(_rgb(p)) for p in group[start : start + batch]]
                imgs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(device)
                fid.update(imgs, real=is_real)
                kid.update(imgs, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {
        "features": str(weights),
        "dims": dims,
        "real_images": len(real),
        "generated_images": len(generated),
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
    }


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    det = result["detection"]
    g, r, q = det["generated"], det["real"], det["ratio"]
    lines = [
        "# Layout fidelity: generated images vs their real source frames",
        "",
        f"Generations: `{result['generations']}` ({result['counts']['generations']} images of "
        f"{result['counts']['source_frames']} source frames); detector: `{result['detector']}` "
        f"(imgsz {result['settings']['imgsz']}, conf {result['settings']['conf']}). Ground truth: each source "
        "frame's det_20 boxes, scaled to each image. mAP: "
        + metrics.DEFINITION
        + ". Ratio = generated / real (1.0: "
        "the generated images are as detectable as the real frames).",
        "",
    ]

    def row(name: str, gg: dict, rr: dict, qq: dict, boxes: int) -> list:
        return [name, boxes, _f(gg["map50"]), _f(rr["map50"]), _f(qq["map50"], 2), _f(gg["map"]), _f(rr["map"]),
                _f(qq["map"], 2)]  # fmt: skip

    rows = [row("**all**", g, r, q, g["gt_boxes"])]
    for name in g["per_class"]:
        pc = g["per_class"][name]
        rows.append(row(name, pc, r["per_class"][name], q["per_class"][name], pc["gt_boxes"]))
    for size in g["per_size"]:
        ps = g["per_size"][size]
        rows.append(row(f"*{size}*", ps, r["per_size"][size], q["per_size"][size], ps["gt_boxes"]))
    header = [
        "",
        "boxes",
        "mAP50 generated",
        "mAP50 real",
        "ratio",
        "mAP50-95 generated",
        "mAP50-95 real",
        "ratio",
    ]
    lines += report.markdown_table(header, rows, "lrrrrrrr")
    lines.append("")
    lines.append("Sizes are COCO's area bins (0–32², 32²–96², 96² px and up, both ends counted as pycocotools does) in "
                 "the real frame's pixels; – : undefined (no box of that class or size, or a real mAP of 0).")  # fmt: skip
    seg = result.get("segmentation")
    if seg:
        lines += [
            "",
            f"Segmentation fidelity ({seg['images']} images, `{seg['model']}`): mIoU against the conditioning masks "
            f"{_f(seg['miou_generated'])} generated, {_f(seg['miou_real'])} real, ratio {_f(seg['ratio'], 2)}"
            + (
                f" ({seg['box_layouts_left_out']} box layouts left out)."
                if seg["box_layouts_left_out"]
                else "."
            ),
        ]
    dist = result.get("distribution")
    if dist and "fid" in dist:
        lines += [
            "",
            f"Distribution distance (InceptionV3 {dist['dims']}-d features, {dist['generated_images']} generated vs "
            f"{dist['real_images']} real): FID {dist['fid']:.2f}, KID {dist['kid_mean']:.4f} ± {dist['kid_std']:.4f}.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-class mAP50, generated vs real, as grouped bars."""
    det = result["detection"]
    names = list(det["generated"]["per_class"])
    gen = [det["generated"]["per_class"][n]["map50"] or 0.0 for n in names]
    real = [det["real"]["per_class"][n]["map50"] or 0.0 for n in names]
    fig, ax = report.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(names)), 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], real, width=0.4, label="real source frames", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], gen, width=0.4, label="generated", color="#dd8452")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mAP50")
    ratio = det["ratio"]["map50"]
    ax.set_title(f"Layout fidelity per class (overall mAP50 ratio {_f(ratio, 2)})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The flags, each another spelling of a config key (its ``dest``): YAML < flags < ``key=value`` overrides."""
    p = argparse.ArgumentParser(
        prog="python annotation/evaluate_fidelity.py",
        description="Layout fidelity: a detector's mAP on generated images vs on their real source frames.",
        epilog="Every key is documented in config/fidelity.yaml; flags and key=value overrides replace its values.",
    )
    add_config_arguments(
        p, None, "validate the config and the inputs (generations, detector, models), then exit"
    )
    p.add_argument(
        "--generations", dest="paths.generations", help="folder of generated images with metadata.jsonl"
    )
    p.add_argument("--detector", dest="detector.model", help="local YOLO weights (.pt)")
    p.add_argument(
        "--bdd_data_dir",
        dest="paths.bdd_data_dir",
        help="BDD100K folder whose images/ hold the source frames",
    )
    p.add_argument(
        "--real_images",
        dest="paths.real_images",
        help="folder (searched recursively) holding the source frames",
    )
    p.add_argument("--out", dest="paths.out", help="report folder (default: <generations>/../fidelity)")
    p.add_argument("--imgsz", dest="detector.imgsz", type=int, help="detector input size (640)")
    p.add_argument(
        "--batch", dest="detector.batch", type=int, help="images per batch: detector, segmenter, FID (16)"
    )
    p.add_argument(
        "--device", dest="detector.device", help="cpu, 0, cuda:0 ... (default: the first GPU, else cpu)"
    )
    p.add_argument(
        "--conf",
        dest="detector.conf",
        type=float,
        help=f"lowest detection confidence kept ({metrics.EVAL_CONF})",
    )
    p.add_argument("--iou", dest="detector.iou", type=float, help="detector NMS IoU (0.7)")
    p.add_argument(
        "--classes",
        dest="detector.classes",
        nargs="+",
        help="BDD classes to score (default: every class the detector maps to)",
    )
    p.add_argument(
        "--class_map",
        dest="detector.class_map",
        help="model class -> BDD class (as annotation's --class_map; default: auto)",
    )
    p.add_argument(
        "--min_box_size",
        dest="scoring.min_box_size",
        type=float,
        help="leave out layout boxes with a shorter side (px)",
    )
    p.add_argument(
        "--max_images",
        dest="scoring.max_images",
        type=int,
        help="score only the first N generations (by file name)",
    )
    p.add_argument(
        "--allow_missing_real",
        dest="scoring.allow_missing_real",
        action="store_true",
        default=None,
        help="skip generations whose real frame is missing",
    )
    p.add_argument(
        "--seg_model",
        dest="segmentation.model",
        help="local Cityscapes-class segmentation model folder (mask mIoU)",
    )
    p.add_argument(
        "--fid_features",
        dest="distribution.features",
        help="local torch-fidelity InceptionV3 weights file (FID/KID)",
    )
    p.add_argument(
        "--fid_dims",
        dest="distribution.dims",
        type=int,
        choices=(64, 192, 768, 2048),
        help="InceptionV3 features (2048)",
    )
    p.add_argument("--log_level", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    flags = flag_values(args, exclude=("log_level",))
    if flags["detector.class_map"] is not None:
        flags["detector.class_map"] = parse_class_map_arg(flags["detector.class_map"])
    cfg = load_config(FidelityConfig, args.config, args.overrides, flags=flags)
    from annotation import yolo_runtime

    yolo_runtime.check_model_spec(cfg.detector.model)  # a missing weights file fails before anything is read
    generations = Path(cfg.paths.generations)
    out = Path(cfg.paths.out) if cfg.paths.out else generations.resolve().parent / "fidelity"
    if out.exists() and not out.is_dir():
        raise UserError(f"paths.out (--out) {out} is a file, not a folder")
    refs = read_refs(generations)  # bad generations fail before --out is made
    real_index, real_where = real_frame_index(
        Path(cfg.paths.bdd_data_dir) if cfg.paths.bdd_data_dir else None,
        Path(cfg.paths.real_images) if cfg.paths.real_images else None,
    )
    if args.check:
        print(
            f"{args.config or 'flags'}: ok ({len(refs)} record(s) in {generations}, detector {cfg.detector.model})"
        )
        return 0

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    yolo_runtime.prepare_offline(out / ".ultralytics")
    loaded = yolo_runtime.load_model(cfg.detector.model)
    mapping, origin = metrics_classes(loaded, cfg.detector.class_map, cfg.detector.classes)
    s = cfg.scoring
    pairs, skipped, examples = collect_pairs(
        generations, refs, real_index, real_where, set(mapping.values()), s.min_box_size, s.max_images,
        s.allow_missing_real,
    )  # fmt: skip

    d = cfg.detector
    result: dict[str, Any] = {
        "generations": str(generations),
        "detector": loaded.description,
        "class_map": origin,
        "classes": [bdd.DET_CLASSES[c] for c in sorted(set(mapping.values()))],
        "settings": {
            "imgsz": d.imgsz,
            "conf": d.conf,
            "iou": d.iou,
            "batch": d.batch,
            "min_box_size": s.min_box_size,
            "max_images": s.max_images,
        },  # fmt: skip
        "counts": {
            "generations": len(pairs),
            "source_frames": len({p.real for p in pairs}),
            "skipped": dict(skipped),
            "skipped_examples": examples,
        },
        "detection": detection_fidelity(pairs, loaded, mapping, d),
        "segmentation": (
            segmentation_fidelity(pairs, Path(cfg.segmentation.model), d.device, d.batch)
            if cfg.segmentation.model
            else None
        ),
        "distribution": (
            distribution_distance(
                pairs, Path(cfg.distribution.features), cfg.distribution.dims, d.device, d.batch
            )
            if cfg.distribution.features
            else None
        ),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    json_path, md_path, png_path = out / "fidelity.json", out / "fidelity.md", out / "fidelity_per_class.png"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, markdown(result))
    plot(result, png_path)
    save_resolved_config(cfg, out / "config.resolved.yaml")
    print_summary(result, json_path, md_path, png_path)
    return 0


def metrics_classes(loaded, class_map, classes) -> tuple[dict[int, int], str]:
    from annotation.settings import resolve_class_map

    return resolve_class_map(loaded.names, class_map, list(classes) if classes else None)


def print_summary(result: dict[str, Any], json_path: Path, md_path: Path, png_path: Path) -> None:
    det, counts = result["detection"], result["counts"]
    g, r, q = det["generated"], det["real"], det["ratio"]
    print(
        f"fidelity: {counts['generations']} generations of {counts['source_frames']} source frames, "
        f"{g['gt_boxes']} layout boxes ({', '.join(result['classes'])})"
    )
    if counts["skipped"]:
        print("  skipped: " + "; ".join(f"{k}: {v}" for k, v in counts["skipped"].items()))
    print(f"  mAP50     generated {_f(g['map50'])}  real {_f(r['map50'])}  ratio {_f(q['map50'], 2)}")
    print(f"  mAP50-95  generated {_f(g['map'])}  real {_f(r['map'])}  ratio {_f(q['map'], 2)}")
    unknown = [c for c, v in r["per_class"].items() if v["map50"] == 0.0]
    if unknown:
        print(
            f"  note: real mAP50 is 0 for {', '.join(unknown)}: the detector does not find them in real frames "
            "either, so they only dilute the overall figures (--classes scores the classes it was trained on)"
        )
    seg = result.get("segmentation")
    if seg:
        print(
            f"  mask mIoU generated {_f(seg['miou_generated'])}  real {_f(seg['miou_real'])}  ratio {_f(seg['ratio'], 2)}"
        )
    dist = result.get("distribution")
    if dist:
        print(
            f"  FID {dist['fid']:.2f}, KID {dist['kid_mean']:.4f} ± {dist['kid_std']:.4f}"
            if "fid" in dist
            else f"  FID/KID: {dist['note']}"
        )
    print(f"  table: {md_path}\n  plot: {png_path}\n  all figures: {json_path}")


if __name__ == "__main__":
    sys.exit(run_main(main))
