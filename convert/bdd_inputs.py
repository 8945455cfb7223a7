"""Where a stage 1 script's BDD100K inputs are: the data root, the labels file and the pixel size of the boxes.

The caption script (generate_bdd_captions.py), the planner (plan_generation.py) and the YOLO export (bdd_to_yolo.py)
take the same flags for them:
``--bdd_data_dir`` (a BDD100K root), ``--split``, ``--labels_file`` (read instead of the labels found under the
root) and ``--image_size WxH`` (default: the first image's size under ``images/``, else BDD100K's 1280x720). This
module resolves them once, with the same messages for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.cli import UserError
from vocab import bdd


@dataclass(frozen=True)
class BddInputs:
    root: Path | None  # the BDD100K root, when one was given
    labels_file: Path  # a label file or a folder of per-image files (read by bdd.load_frames)
    image_size: tuple[int, int]  # (width, height): the pixel space of the labels' boxes


def resolve_bdd_inputs(
    bdd_data_dir: str | os.PathLike | None,
    split: str,
    labels_file: str | os.PathLike | None,
    image_size: str | None,
) -> BddInputs:
    """The inputs that the flags name, checked in this order: the root exists, the labels are found
    (``--labels_file`` or :func:`vocab.bdd.find_label_file`), ``--image_size`` parses. The labels are not read."""
    root, labels = find_labels(bdd_data_dir, split, labels_file)
    size = parse_image_size(image_size) if image_size else detect_image_size(root, split)
    return BddInputs(root, labels, tuple(size or (bdd.IMAGE_WIDTH, bdd.IMAGE_HEIGHT)))


def find_labels(
    bdd_data_dir: str | os.PathLike | None, split: str, labels_file: str | os.PathLike | None
) -> tuple[Path | None, Path]:
    """(the BDD100K root or None, the labels): the root must exist; ``--labels_file``, else
    :func:`vocab.bdd.find_label_file` under the root. The labels are not read."""
    root = Path(bdd_data_dir) if bdd_data_dir else None
    if root is not None and not root.is_dir():
        raise UserError(f"BDD100K folder not found: {root} (expected images/ and labels/ inside)")
    return root, Path(labels_file) if labels_file else bdd.find_label_file(root, split)


def parse_image_size(text: str) -> tuple[int, int]:
    """``--image_size`` ``WxH`` as (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--image_size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--image_size {text!r}: width and height must be positive")
    return w, h


def detect_image_size(bdd_data_dir: Path | None, split: str) -> tuple[int, int] | None:
    """The size of the first image (by name) under images/100k/<split> or images/10k/<split>."""
    if bdd_data_dir is None:
        return None
    for sub in ("100k", "10k"):
        folder = bdd_data_dir / "images" / sub / split
        if folder.is_dir():
            names = [n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in bdd.IMAGE_EXTENSIONS]
            if names:
                from PIL import Image

                with Image.open(folder / min(names)) as im:
                    return im.size
    return None
