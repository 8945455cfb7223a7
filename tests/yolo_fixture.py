"""A tiny real detector for the annotation tests: yolov8n.yaml trained on mini-BDD100K scenes, on CPU, offline.

The mini-BDD det_20 boxes become a YOLO training set (bdd.box_to_yolo) with the 10 BDD class names, labelled
only for a few big classes (the drawn vehicles) so that ~1 minute of CPU training learns them well enough for
"labels match the drawn boxes" checks on training-like frames. Augmentation is off and nbs equals the batch so
every batch is an optimizer step: the model is meant to memorise, not to generalise.

Trained weights are cached per test session and, across sessions, under ``$BDD_SDXL_TEST_CACHE`` (default
``<repo>/outputs/.test-cache``, git-ignored), keyed by a hash of the training images, labels and parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from convert import bdd

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DetectorParams:
    classes: tuple[str, ...] = ("car",)
    min_box_side: float = 10.0  # pixels: smaller boxes are left out of training (and of the agreement checks)
    imgsz: int = 224
    epochs: int = 80
    batch: int = 2
    lr0: float = 0.002
    optimizer: str = "AdamW"
    warmup_epochs: float = 0.0
    fliplr: float = 0.5  # the only augmentation: without it the class logits overshoot into false positives
    class_prior: float | None = 0.01  # start value of the class probabilities (None: ultralytics' default)
    seed: int = 0


def write_yolo_training_set(bdd_root: Path, out: Path, params: DetectorParams) -> Path:
    """mini-BDD (images/100k + det_20) -> YOLO folders + data.yaml; returns the data.yaml path."""
    from PIL import Image

    for split in ("train", "val"):
        frames = {f.name: f for f in bdd.load_frames(bdd_root / "labels" / "det_20" / f"det_{split}.json")}
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for image in bdd.list_images(bdd_root / "images" / "100k" / split):
            frame = frames.get(image.name)
            if frame is None:
                continue
            with Image.open(image) as im:
                width, height = im.size
            boxes = training_boxes(frame, width, height, params)
            if split == "train" and not boxes:
                continue  # frames without the learned classes only slow the memorising down
            lines = []
            for _label, (cls, box) in boxes:
                cx, cy, w, h = bdd.box_to_yolo(box, width, height)
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
            shutil.copyfile(image, out / "images" / split / image.name)
            (out / "labels" / split / f"{image.stem}.txt").write_text("".join(lines))
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(bdd.DET_CLASSES))
    data = out / "data.yaml"
    data.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def training_boxes(frame: bdd.Frame, width: int, height: int, params: DetectorParams):
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


def fixture_key(bdd_root: Path, params: DetectorParams) -> str:
    """Hash of everything the weights depend on: training images, det_20 labels, parameters, ultralytics version."""
    from annotation.yolo_runtime import import_ultralytics

    ultralytics = import_ultralytics()
    h = hashlib.sha256(json.dumps([asdict(params), ultralytics.__version__]).encode())
    for split in ("train", "val"):
        h.update((bdd_root / "labels" / "det_20" / f"det_{split}.json").read_bytes())
        for image in bdd.list_images(bdd_root / "images" / "100k" / split):
            h.update(image.name.encode() + image.read_bytes())
    return h.hexdigest()[:20]


def train_detector(bdd_root: Path, work: Path, params: DetectorParams) -> Path:
    """Train yolov8n.yaml from scratch on CPU; returns the last.pt path (names = the 10 BDD classes)."""
    import torch
    from ultralytics import YOLO

    data = write_yolo_training_set(bdd_root, work / "data", params)
    torch.manual_seed(params.seed)
    model = YOLO("yolov8n.yaml")
    if params.class_prior is not None:
        model.add_callback(
            "on_pretrain_routine_end", lambda trainer: _set_class_prior(trainer, params.class_prior)
        )
    model.train(
        data=str(data),
        epochs=params.epochs,
        imgsz=params.imgsz,
        batch=params.batch,
        nbs=params.batch,  # one optimizer step per batch (the default nbs=64 would accumulate 16 batches)
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
        deterministic=False,
        project=str((work / "runs").resolve()),
        name="detector",
        exist_ok=True,
        verbose=False,
    )
    return work / "runs" / "detector" / "weights" / "last.pt"


def _set_class_prior(trainer, prior: float) -> None:
    """Start the class logits at a prior of ~2% instead of ultralytics' 640-px/80-class ~0.01%.

    The default bias (about -9.6) needs thousands of steps (or the SGD warm-up's high bias learning rate) to
    reach useful confidences; a few hundred AdamW steps only move it by tenths.
    """
    import math

    head = trainer.model.model[-1]
    for branch in head.cv3:
        branch[-1].bias.data.fill_(math.log(prior / (1 - prior)))


def cached_detector(bdd_root: Path, work: Path, params: DetectorParams = DetectorParams()) -> Path:
    """The trained weights, from the cross-session cache when present, else trained now and cached."""
    cache_root = Path(os.environ.get("BDD_SDXL_TEST_CACHE", REPO_ROOT / "outputs" / ".test-cache"))
    cached = cache_root / "yolo_fixture" / fixture_key(bdd_root, params) / "detector.pt"
    if cached.is_file():
        return cached
    weights = train_detector(bdd_root, work, params)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".detector.pt.tmp{os.getpid()}")
        shutil.copyfile(weights, tmp)
        os.replace(tmp, cached)
        return cached
    except OSError:  # a read-only checkout: the session copy is enough
        return weights
