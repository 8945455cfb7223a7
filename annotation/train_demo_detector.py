"""Train a small demo detector on a (mini-)BDD100K, from scratch, on CPU and offline.

No YOLO weights can be downloaded on an offline machine, so the demo (and the annotation tests) make their own:
the ``yolov8n.yaml`` architecture trained from random weights on the det_20 boxes of a BDD100K folder (the
mini-BDD100K that ``convert/make_mini_bdd.py`` writes). It learns a few big classes of the drawn scenes well
enough to show real detections in a minute or two; it is NOT a usable BDD100K detector (train one for that, or
use COCO weights with the default class map).

Usage::

    python -m annotation.train_demo_detector --bdd_data_dir outputs/demo/bdd100k --out outputs/demo/detector/detector.pt
    python annotation/train_demo_detector.py --bdd_data_dir D --out F.pt [--epochs 40] [--classes car truck] \\
        [--imgsz 256] [--min_box_side 10] [--seed 0] [--force]
    python -m annotation.train_demo_detector --config config/demo/detector.yaml [--check] [key=value ...]
    python annotation/yolo_annotate_folders.py --input_folder G --output_folder A --model F.pt --imgsz 256

Settings come from a YAML config (config/demo/detector.yaml documents every key; :class:`DemoDetectorConfig` is its
schema), the flags (each another spelling of a key: ``--epochs`` is ``train.epochs``) and ``key=value`` overrides, in
that order.

What it does: det_20 boxes of the chosen classes (big enough, det_20's ignored categories left out) become a YOLO
training set (train frames with such boxes; all labelled val frames) in ``<out folder>/<out stem>_train/data``,
written by convert/bdd_to_yolo.py (images hard-linked; the same ids, names and box conversion); ultralytics
trains there (``.../runs/detector``: results.csv, args.yaml); the last weights are copied atomically to ``--out``
with ``<out stem>.json`` beside it (content key, settings, training time, val recall/precision). The weights carry
the 10 BDD100K class names, so the annotation script maps them by identity.

A rerun is instant when the weights at ``--out`` were trained on the same data and settings: the content key
hashes the det_20 files, the images, the settings and the ultralytics version. Training is seeded and
deterministic (torch deterministic algorithms; on CPU this costs little), so the same key gives the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from annotation.settings import check_bdd_class
from core.cli import UserError, run_main, setup_logging
from core.config import Section, add_config_arguments, flag_values, load_config
from core.io import atomic_write_text, link_or_copy
from vocab import bdd

log = logging.getLogger("bdd-sdxl.annotation")
SPLITS = ("train", "val")


class DetectorParams(Section):
    """Everything the weights depend on besides the data (all of it goes into the content key).

    The defaults suit the tests' 320x180 frames; the command line's (:data:`CLI_DEFAULTS`) suit 1280x720 ones.
    """

    classes: tuple[str, ...] = ("car",)
    min_box_side: float = Field(
        10.0, ge=0.0
    )  # source pixels: smaller boxes are left out of training and evaluation
    imgsz: int = Field(224, ge=1)
    epochs: int = Field(80, ge=1)
    batch: int = Field(2, ge=1)
    lr0: float = 0.002
    optimizer: str = "AdamW"
    warmup_epochs: float = 0.0
    fliplr: float = 0.5  # the only augmentation: without it the class logits overshoot into false positives
    class_prior: float | None = 0.01  # start value of the class probabilities (None: ultralytics' default)
    seed: int = 0

    @field_validator("classes")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(check_bdd_class(c, "--classes") for c in value))

    @field_validator("imgsz")
    @classmethod
    def _stride(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"--imgsz must be a multiple of 32 (YOLO's largest stride), got {value}")
        return value


#: Command-line defaults: BDD100K-sized frames (1280x720) need a larger training size than the tests' 320x180
#: ones, and with 20 frames of 83 cars 40 epochs are enough (about two minutes on two CPU cores).
CLI_DEFAULTS = DetectorParams(imgsz=256, epochs=40)


class DemoDetectorConfig(Section):
    """The schema of config/demo/detector.yaml (each flag is another spelling of one of its keys)."""

    bdd_data_dir: str  # BDD100K folder (images/100k, labels/det_20)
    out: str  # the weights file (.pt); <stem>.json is written beside it
    force: bool = False  # train even when the weights at out match the data and settings
    train: DetectorParams = CLI_DEFAULTS

    @field_validator("out")
    @classmethod
    def _weights_file(cls, value: str) -> str:
        if Path(value).suffix != ".pt":
            raise ValueError(f"--out must name a .pt file, got {value}")
        return value


# ---------------------------------------------------------------------------------------------------------------
# Training set and content key
# ---------------------------------------------------------------------------------------------------------------


def det20_file(bdd_root: Path, split: str) -> Path:
    path = bdd_root / "labels" / "det_20" / f"det_{split}.json"
    if not path.is_file():
        raise UserError(
            f"det_20 labels not found: {path}; --bdd_data_dir must be a BDD100K folder with "
            "labels/det_20/det_{train,val}.json and images/100k/{train,val}/ (e.g. from convert/make_mini_bdd.py)"
        )
    return path


def split_images(bdd_root: Path, split: str) -> list[Path]:
    return bdd.list_images(bdd_root / "images" / "100k" / split)


def training_boxes(
    frame: bdd.Frame, width: int, height: int, params: DetectorParams
) -> list[tuple[bdd.Label, tuple[int, bdd.Box2D]]]:
    """(label, (YOLO id, Box2D)) of the frame's boxes the detector is trained on (its classes, big enough)."""
    out = []
    for label in frame.label_list():
        cat = bdd.category_of(label)
        if label.box2d is None or cat.ignored or cat.det_class not in params.classes:
            continue
        x1, y1, x2, y2 = bdd.clip_box(label.box2d, width, height)
        if min(x2 - x1 + 1, y2 - y1 + 1) < params.min_box_side:
            continue
        out.append((label, (bdd.DET_CLASS_YOLO_ID[cat.det_class], label.box2d)))
    return out


def write_yolo_training_set(bdd_root: Path, out: Path, params: DetectorParams) -> tuple[Path, dict[str, int]]:
    """mini-BDD (images/100k + det_20) -> a YOLO dataset, written by stage 1's own command (convert/bdd_to_yolo.py);
    its data.yaml and counts.

    Only ``params.classes`` boxes with a side of at least ``params.min_box_side`` (the boxes of
    :func:`training_boxes`); train frames without such a box are left out (``--skip_empty``), val frames are all
    kept.
    """
    if out.exists():
        shutil.rmtree(out)  # ours alone; also drops ultralytics' stale labels/*.cache
    counts = {}
    for split in SPLITS:
        command = [
            sys.executable, "-m", "convert.bdd_to_yolo", "--split", split, "--out", str(out),
            "--labels_file", str(det20_file(bdd_root, split)), "--images_dir", str(bdd_root / "images" / "100k" / split),
            "--classes", *params.classes, "--min_box_side", f"{params.min_box_side:g}",
            *(["--skip_empty"] if split == "train" else []),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
            raise UserError(
                errors[-1].removeprefix("error: ")
                if errors
                else f"convert/bdd_to_yolo.py failed: {done.stderr}"
            )
        labels = sorted((out / "labels" / split).glob("*.txt"))
        counts[f"{split}_images"] = len(labels)
        counts[f"{split}_boxes"] = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in labels)
    return out / "data.yaml", counts


def detector_key(bdd_root: Path, params: DetectorParams) -> str:
    """Hash of everything the weights depend on: det_20 labels, images, parameters, ultralytics version."""
    version = importlib.metadata.version("ultralytics")
    h = hashlib.sha256(json.dumps([params.model_dump(mode="json"), version]).encode())
    for split in SPLITS:
        h.update(det20_file(bdd_root, split).read_bytes())
        for image in split_images(bdd_root, split):
            h.update(image.name.encode() + image.read_bytes())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train_detector(
    bdd_root: Path, work: Path, params: DetectorParams, progress: bool = False, deterministic: bool = True
) -> Path:
    """Train yolov8n.yaml from scratch on CPU in ``work``; returns last.pt (names = the 10 BDD classes).

    The caller must have run :func:`annotation.yolo_runtime.prepare_offline` (or set the offline environment).
    """
    import torch
    from tqdm import tqdm

    from annotation.yolo_runtime import import_ultralytics

    data, counts = write_yolo_training_set(bdd_root, work / "data", params)
    log.info(
        "training set: %d train frames (%d boxes), %d val frames (%d boxes) in %s",
        counts["train_images"],
        counts["train_boxes"],
        counts["val_images"],
        counts["val_boxes"],
        data.parent,
    )
    import_ultralytics()
    from ultralytics import YOLO

    torch.manual_seed(params.seed)
    model = YOLO("yolov8n.yaml")
    if params.class_prior is not None:
        model.add_callback(
            "on_pretrain_routine_end", lambda trainer: _set_class_prior(trainer, params.class_prior)
        )
    bar = tqdm(total=params.epochs, desc="training detector", unit="epoch", disable=not progress)

    def epoch_done(trainer) -> None:
        if isinstance(trainer.tloss, dict):  # running mean of this epoch's losses by name (box, cls, dfl)
            bar.set_postfix(loss=f"{sum(float(v) for v in trainer.tloss.values()):.3f}")
        bar.update()

    model.add_callback("on_train_epoch_end", epoch_done)
    try:
        model.train(
            data=str(data),
            epochs=params.epochs,
            imgsz=params.imgsz,
            batch=params.batch,
            nbs=params.batch,  # one optimizer step per batch (the default nbs=64 would accumulate 32 batches)
            workers=0,
            device="cpu",
            amp=False,
            plots=False,
            val=False,
            optimizer=params.optimizer,
            lr0=params.lr0,
            lrf=1.0,
            warmup_epochs=params.warmup_epochs,
            mosaic=0.0,
            close_mosaic=0,
            hsv_h=0.0,
            hsv_s=0.0,
            hsv_v=0.0,
            translate=0.0,
            scale=0.0,
            fliplr=params.fliplr,
            seed=params.seed,
            deterministic=deterministic,
            project=str((work / "runs").resolve()),
            name="detector",
            exist_ok=True,
            verbose=False,
        )
    finally:
        bar.close()
    weights = work / "runs" / "detector" / "weights" / "last.pt"
    if not weights.is_file():
        raise RuntimeError(f"ultralytics finished without writing {weights}")
    return weights


def _set_class_prior(trainer, prior: float) -> None:
    """Start the class logits at ``prior`` instead of ultralytics' 640-px/80-class ~0.01%.

    The default bias (about -9.6) needs thousands of steps (or the SGD warm-up's high bias learning rate) to
    reach useful confidences; a few hundred AdamW steps only move it by tenths.
    """
    head = trainer.model.model[-1]
    for branch in head.cv3:
        branch[-1].bias.data.fill_(math.log(prior / (1 - prior)))


def save_weights(weights: Path, out: Path) -> None:
    """Copy the trained weights to ``out`` atomically (a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(weights, out, hardlink=False)


def info_path(out: Path) -> Path:
    return out.with_suffix(".json")


def reusable(out: Path, key: str) -> bool:
    """True when ``out`` exists and its info file says it was trained under ``key``."""
    try:
        return out.is_file() and json.loads(info_path(out).read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on the val frames (for the summary)
# ---------------------------------------------------------------------------------------------------------------


def evaluate(weights: Path, bdd_root: Path, params: DetectorParams, conf: float = 0.25) -> dict[str, Any]:
    """Recall and precision at IoU 0.5 of the detector on the val frames, over the trained classes' boxes."""
    from PIL import Image

    from annotation import yolo_runtime
    from annotation.layout import match_boxes

    frames = {f.name: f for f in bdd.load_frames(det20_file(bdd_root, "val"))}
    images = [p.resolve() for p in split_images(bdd_root, "val") if p.name in frames]
    if not images:
        return {"val_images": 0}
    loaded = yolo_runtime.load_model(str(weights))
    wanted = [bdd.DET_CLASS_YOLO_ID[c] for c in params.classes]
    matched = n_source = n_detected = 0
    with tempfile.TemporaryDirectory(prefix="detector-eval-") as tmp:
        results = yolo_runtime.stream_predictions(
            loaded, images, Path(tmp) / "val_sources.txt", conf=conf, iou=0.7, imgsz=params.imgsz, batch=8,
            device="cpu", max_det=100, classes=wanted,
        )  # fmt: skip
        for r in results:
            frame = frames[Path(r.path).name]
            with Image.open(r.path) as im:
                width, height = im.size
            sources = [
                (cls, [b.x1, b.y1, b.x2 + 1, b.y2 + 1])
                for _, (cls, b) in training_boxes(frame, width, height, params)
            ]
            dets = [(d.model_class, d.confidence, list(d.xyxy)) for d in r.detections]
            m = match_boxes(dets, sources, 0.5)
            matched, n_source, n_detected = (
                matched + m.matched,
                n_source + m.n_source,
                n_detected + m.n_detected,
            )
    return {
        "val_images": len(images),
        "conf": conf,
        "val_boxes": n_source,
        "detections": n_detected,
        "matched": matched,
        "recall": round(matched / n_source, 4) if n_source else None,
        "precision": round(matched / n_detected, 4) if n_detected else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = CLI_DEFAULTS
    p = argparse.ArgumentParser(
        description="Train a small demo YOLO detector (yolov8n.yaml from scratch) on a mini-BDD100K, on CPU, "
        "offline; a rerun with the same data and settings reuses the weights. Every key is documented in "
        "config/demo/detector.yaml; each flag is another spelling of one.",
    )
    add_config_arguments(p, None, "validate the config and the BDD100K folder, then exit")
    p.add_argument("--bdd_data_dir", help="BDD100K folder (images/100k, labels/det_20)")
    p.add_argument("--out", help="weights file to write (.pt); <stem>.json is written beside it")
    p.add_argument("--epochs", dest="train.epochs", type=int, help=f"training epochs ({d.epochs})")
    p.add_argument(
        "--classes", dest="train.classes", nargs="+", help=f"BDD100K classes to learn ({d.classes})"
    )
    p.add_argument(
        "--imgsz", dest="train.imgsz", type=int, help=f"training and inference size ({d.imgsz} px)"
    )
    p.add_argument(
        "--min_box_side",
        dest="train.min_box_side",
        type=float,
        help=f"leave out smaller boxes ({d.min_box_side} px)",
    )
    p.add_argument("--batch", dest="train.batch", type=int, help=f"images per optimizer step ({d.batch})")
    p.add_argument("--seed", dest="train.seed", type=int, help=f"training seed ({d.seed})")
    p.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="train even when --out matches the data and settings",
    )
    p.add_argument("--log_level", default=None, help="DEBUG, INFO, WARNING")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    cfg = load_config(
        DemoDetectorConfig, args.config, args.overrides, flags=flag_values(args, exclude=("log_level",))
    )
    params, bdd_root, out = cfg.train, Path(cfg.bdd_data_dir), Path(cfg.out)
    if not bdd_root.is_dir():
        raise UserError(
            f"BDD100K folder not found: {bdd_root} (make one with python -m convert.make_mini_bdd)"
        )
    for split in SPLITS:
        det20_file(bdd_root, split)
    if args.check:
        print(f"{args.config or 'flags'}: ok ({bdd_root} -> {out})")
        return 0

    # --- reuse: same data and settings -> the weights already at --out ------------------------------------------
    key = detector_key(bdd_root, params)
    if reusable(out, key) and not cfg.force:
        info = json.loads(info_path(out).read_text())
        print(f"detector: reusing {out} (same data and settings, key {key}; --force retrains)")
        print_summary(out, info)
        return 0

    # --- setup: offline ultralytics, work folder ---------------------------------------------------------------
    from annotation import yolo_runtime

    work = out.parent / f"{out.stem}_train"
    yolo_runtime.prepare_offline(out.parent / ".ultralytics")
    log.info("training yolov8n.yaml on %s: %s", bdd_root, params.model_dump())

    # --- train, evaluate, save ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    weights = train_detector(bdd_root, work, params, progress=True)
    seconds = time.perf_counter() - t0
    save_weights(weights, out)
    metrics = evaluate(out, bdd_root, params)
    info = {
        "key": key,
        "params": params.model_dump(mode="json"),
        "ultralytics": importlib.metadata.version("ultralytics"),
        "bdd_data_dir": str(bdd_root.resolve()),
        "train_seconds": round(seconds, 1),
        "work_dir": str(work),
        "val": metrics,
    }
    atomic_write_text(info_path(out), json.dumps(info, indent=2) + "\n")
    print_summary(out, info)
    return 0


def print_summary(out: Path, info: dict[str, Any]) -> None:
    params, val = info["params"], info["val"]
    print(
        f"detector: {out} (yolov8n, {params['epochs']} epochs at {params['imgsz']} px on "
        f"{', '.join(params['classes'])}; trained in {info['train_seconds']} s)"
    )
    if val.get("val_boxes"):
        print(
            f"val frames: found {val['matched']} of {val['val_boxes']} {'/'.join(params['classes'])} boxes "
            f"(recall {val['recall']:.2f}); {val['detections']} detections at conf >= {val['conf']}"
            + (f", precision {val['precision']:.2f}" if val["precision"] is not None else "")
        )
    print(f"use it: python annotation/yolo_annotate_folders.py ... --model {out} --imgsz {params['imgsz']}")


if __name__ == "__main__":
    sys.exit(run_main(main))
