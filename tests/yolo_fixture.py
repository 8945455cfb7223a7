"""A tiny real detector for the annotation tests, via the same code as the demo (annotation/train_demo_detector.py).

yolov8n.yaml trained on the mini-BDD100K scenes on CPU, offline, labelled only for a few big classes (the drawn
vehicles) so that ~1 minute of training learns them well enough for "labels match the drawn boxes" checks on
training-like frames. Augmentation is off and nbs equals the batch so every batch is an optimizer step: the model
is meant to memorise, not to generalise.

Trained weights are cached across sessions under ``$BDD_SDXL_TEST_CACHE`` (default ``<repo>/outputs/.test-cache``,
git-ignored) in ``yolo_fixture/<content key>/detector.pt``, the key hashing the training images, labels,
parameters and ultralytics version (:func:`annotation.train_demo_detector.detector_key`).
"""

from __future__ import annotations

import os
from pathlib import Path

from annotation.train_demo_detector import (
    DetectorParams,
    detector_key,
    save_weights,
    train_detector,
    training_boxes,
)

__all__ = ["DetectorParams", "cached_detector", "training_boxes"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def cached_detector(bdd_root: Path, work: Path, params: DetectorParams | None = None) -> Path:
    """The trained weights, from the cross-session cache when present, else trained now (in ``work``) and cached."""
    params = params or DetectorParams()
    cache_root = Path(os.environ.get("BDD_SDXL_TEST_CACHE", REPO_ROOT / "outputs" / ".test-cache"))
    cached = cache_root / "yolo_fixture" / detector_key(bdd_root, params) / "detector.pt"
    if cached.is_file():
        return cached
    weights = train_detector(bdd_root, work, params)
    try:
        save_weights(weights, cached)
        return cached
    except OSError:  # a read-only checkout: the session copy is enough
        return weights
