"""Object-weighted diffusion loss: a per-image weight map over the latent pixels (``loss.object_weight`` and co.).

The plain diffusion loss is a mean over every latent pixel, so road and sky dominate it while a detector cares about
a 12-pixel traffic light. GeoDiffusion (ICLR'24) re-weights the loss towards the pixels of labelled objects, more
for small ones; LoRA trainers' users ask for the general form (a user's own mask). The map here:

* starts at 1 (background);
* inside an object it is ``object_weight * (1 + min(small_object_cap, small_object_boost * (1 / sqrt(a) - 1)))``,
  ``a`` the object's share of the training crop's area (``1 / sqrt(a)``: how many times the object's side fits
  in the crop's side, 1 for an object that fills the crop). Where objects overlap the larger weight wins (the small
  object on top, as box layouts draw them);
* is multiplied by the row's own mask (``loss.mask``: a grayscale image, 255 = 1.0, 0 = ignore) when there is one;
* is built at the training crop's pixels, after the image's resize, crop and flip (the same :class:`CropPlan`),
  averaged over each latent pixel's ``f x f`` block (the VAE's downscale factor) and divided by its mean, so the
  loss's mean scale stays what it was (an all-zero map stays zero: that image then does not train).

Objects come from one of two sources:

* :class:`BoxObjects` (LoRA): det_20 or legacy boxes of a labels file (vocab/bdd.py reads it), matched to the rows
  by image file name (stem);
* :class:`LayoutObjects` (ControlNet): the row's own condition map after the crop (box layout or segmentation mask):
  every connected region of one object id is an object (a box layout's fill; its outlines are object pixels too;
  the "thing" classes of a mask: traffic light, sign, person, rider and the vehicles).

The map depends only on the row and its crop plan, so a dataset item with cached latents gets the same map as one
encoded from pixels (the plan is what the latent cache is keyed by).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ai.common.data import CropPlan, Row, apply_plan, open_image
from core.cli import UserError
from vocab import bdd, box_layout

logger = logging.getLogger(__name__)


class WeightSettings(Protocol):
    """The ``loss`` section's keys this module reads (ai/common/train_config.py's LossConfig)."""

    object_weight: float
    small_object_boost: float
    small_object_cap: float
    mask: str | None


def objects_weighted(loss: WeightSettings) -> bool:
    """Whether the object keys are set away from "off" (then the rows need labelled objects)."""
    return loss.object_weight != 1.0 or loss.small_object_boost > 0.0


def weighting_on(loss: WeightSettings) -> bool:
    """Whether any weight map is built at all: with every key at its default the loss is the plain mean."""
    return objects_weighted(loss) or loss.mask is not None


def object_pixel_weight(area_share: float, loss: WeightSettings) -> float:
    """The weight of an object's pixels, given the object's share of the crop's area (0 < area_share <= 1)."""
    extra = loss.small_object_boost * (1.0 / math.sqrt(area_share) - 1.0)
    return loss.object_weight * (1.0 + min(loss.small_object_cap, max(extra, 0.0)))


class ObjectSource(Protocol):
    def __call__(self, row: Row, plan: CropPlan, loss: WeightSettings) -> np.ndarray:
        """Pixel weights of the crop (``plan.bucket``'s height x width, float32, 1 = background)."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Boxes of a labels file (LoRA)
# ---------------------------------------------------------------------------------------------------------------

Box = tuple[
    int, int, int, int
]  # inclusive pixel box (x1, y1, x2, y2) in the original image, det_20's convention


def box_in_crop(box: Box, plan: CropPlan) -> tuple[int, int, int, int] | None:
    """The crop pixels (rows r0..r1, columns c0..c1, inclusive) whose centres lie inside ``box`` after the plan's
    resize, crop and flip; None when no pixel does.

    The box's continuous extent is ``[x1, x2 + 1] x [y1, y2 + 1]`` (vocab/box_layout.py's rule); a resize by ``s``
    maps a continuous coordinate ``x`` to ``s * x`` (PIL maps pixel centres so), the crop shifts by (left, top) and
    the flip maps ``X`` to ``width - X``.
    """
    (ow, oh), (rw, rh), (bw, bh) = plan.original, plan.resized, plan.bucket
    sx, sy = rw / ow, rh / oh
    lo_x, hi_x = box[0] * sx - plan.left, (box[2] + 1) * sx - plan.left
    lo_y, hi_y = box[1] * sy - plan.top, (box[3] + 1) * sy - plan.top
    if plan.flip:
        lo_x, hi_x = bw - hi_x, bw - lo_x
    c0, c1 = max(math.ceil(lo_x - 0.5), 0), min(math.floor(hi_x - 0.5), bw - 1)
    r0, r1 = max(math.ceil(lo_y - 0.5), 0), min(math.floor(hi_y - 0.5), bh - 1)
    if c1 < c0 or r1 < r0:
        return None
    return r0, r1, c0, c1


def box_pixel_weights(boxes: Sequence[Box], plan: CropPlan, loss: WeightSettings) -> np.ndarray:
    """Pixel weights of the crop from boxes in the original image's pixels (see the module docstring)."""
    bw, bh = plan.bucket
    out = np.ones((bh, bw), dtype=np.float32)
    placed = []
    for box in boxes:
        span = box_in_crop(box, plan)
        if span is not None:
            r0, r1, c0, c1 = span
            placed.append((object_pixel_weight((r1 - r0 + 1) * (c1 - c0 + 1) / (bw * bh), loss), span))
    for weight, (r0, r1, c0, c1) in sorted(placed, key=lambda p: p[0]):  # heaviest last: it wins overlaps
        out[r0 : r1 + 1, c0 : c1 + 1] = weight
    return out


class BoxObjects:
    """Rows' det_20 boxes (picklable for data workers): ``boxes[row.index]``; rows without labels have none."""

    def __init__(self, boxes: dict[int, tuple[Box, ...]], matched: int, total: int, source: str):
        self.boxes, self.matched, self.total, self.source = boxes, matched, total, source

    @classmethod
    def from_labels_file(
        cls, path: str | Path, rows: Sequence[Row], key: str = "data.labels_file"
    ) -> BoxObjects:
        """Read a det_20 / legacy labels file (or a folder of per-image files) and match its frames to ``rows`` by
        image name (stem); the 10 detection classes' boxes, clipped to the image (vocab/box_layout.py's rules)."""
        if not Path(path).exists():
            raise UserError(f"{key}: not found: {path}")
        frames = {frame.stem: frame for frame in bdd.load_frames(path)}
        boxes: dict[int, tuple[Box, ...]] = {}
        for row in rows:
            frame = frames.get(bdd.stem(row.name)) if row.name else None
            if frame is not None:
                drawn = box_layout.layout_boxes(frame.labels or [], row.size)
                boxes[row.index] = tuple((b.x1, b.y1, b.x2, b.y2) for b in drawn)
        if not boxes:
            raise UserError(
                f"{key}={path}: none of the {len(rows)} training images has a frame in it (frames are matched by "
                "image file name); point it at the labels of these images (det_20 or the legacy labels JSON)"
            )
        if len(boxes) < len(rows):
            logger.warning(
                "%s: %d of %d training images have no frame in %s; their loss is unweighted",
                key, len(rows) - len(boxes), len(rows), path,
            )  # fmt: skip
        return cls(boxes, len(boxes), len(rows), str(path))

    def note(self) -> str:
        n_boxes = sum(len(b) for b in self.boxes.values())
        return f"{n_boxes} boxes of {self.matched}/{self.total} images from {self.source}"

    def __call__(self, row: Row, plan: CropPlan, loss: WeightSettings) -> np.ndarray:
        return box_pixel_weights(self.boxes.get(row.index, ()), plan, loss)


# ---------------------------------------------------------------------------------------------------------------
# Objects of a condition map (ControlNet)
# ---------------------------------------------------------------------------------------------------------------

#: The ids that are objects, per layout: a box layout's classes and outlines; a mask's "thing" trainIds.
OBJECT_IDS: dict[str, tuple[int, ...]] = {
    "boxes": (*range(box_layout.NUM_BOX_CLASSES), box_layout.BOUNDARY_ID),
    "seg": tuple(sorted(bdd.DET_CLASS_TO_SEG_ID.values())),
}


def region_pixel_weights(ids: np.ndarray, object_ids: Sequence[int], loss: WeightSettings) -> np.ndarray:
    """Pixel weights from an id map: each 4-connected region of one object id is an object."""
    import cv2  # opencv, an ultralytics dependency: connected components in C

    h, w = ids.shape
    counts = np.bincount(ids.ravel(), minlength=256)
    regions = np.zeros((h, w), dtype=np.int32)  # 0: background, else the region's index into `weights`
    weights = [1.0]
    for obj in object_ids:
        if not counts[obj]:
            continue
        inside = ids == obj
        n, labels = cv2.connectedComponents(inside.view(np.uint8), connectivity=4)
        areas = np.bincount(labels.ravel(), minlength=n)  # faster than cv2's stats
        np.add(regions, labels + (len(weights) - 1), out=regions, where=inside)
        weights += [object_pixel_weight(areas[i] / (h * w), loss) for i in range(1, n)]
    return np.asarray(weights, dtype=np.float32)[regions]


class LayoutObjects:
    """Objects of each row's condition map: ``read_ids(row, plan)`` gives the map after the crop (the ControlNet
    trainer's ``RowCondition.ids``); picklable when ``read_ids`` is."""

    def __init__(self, read_ids: Callable[[Row, CropPlan], Image.Image], layout: str):
        if layout not in OBJECT_IDS:
            raise UserError(f"the object-weighted loss knows no objects of layout {layout!r}")
        self.read_ids, self.layout = read_ids, layout

    def note(self) -> str:
        return f"objects of each {self.layout} condition map"

    def __call__(self, row: Row, plan: CropPlan, loss: WeightSettings) -> np.ndarray:
        ids = np.asarray(self.read_ids(row, plan))
        return region_pixel_weights(ids, OBJECT_IDS[self.layout], loss)


# ---------------------------------------------------------------------------------------------------------------
# The map a dataset item carries
# ---------------------------------------------------------------------------------------------------------------


def mask_pixel_weights(row: Row, plan: CropPlan) -> np.ndarray:
    """The row's own mask (grayscale, 255 = 1.0) after the plan, bilinear."""
    if row.mask is None or row.mask == "":
        raise RuntimeError(f"row {row.name or row.index} has no loss mask")
    img = open_image(row.mask, "L", upright=False)
    if img.size != plan.original:
        raise RuntimeError(
            f"loss mask {row.mask} is {img.size[0]}x{img.size[1]}, its image {row.name} is "
            f"{plan.original[0]}x{plan.original[1]}"
        )
    return np.asarray(apply_plan(img, plan, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def to_latent(weights: np.ndarray, factor: int):
    """Average over each latent pixel's ``factor x factor`` block, then divide by the mean (0 stays 0): a float32
    tensor (1, h / factor, w / factor)."""
    import torch

    # torch's pooling: ~10x faster than numpy's block mean at 1344x768
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(weights)[None], factor)
    mean = pooled.double().mean().item()
    return pooled / mean if mean > 0 else pooled


class WeightMap:
    """Dataset hook: (row, plan) -> ``loss_weight`` (1, H/f, W/f) float32, mean 1 (picklable for data workers)."""

    def __init__(self, loss: WeightSettings, objects: ObjectSource | None, factor: int):
        self.loss, self.objects, self.factor = loss, objects, factor
        self.use_mask = loss.mask is not None

    def __call__(self, row: Row, plan: CropPlan):
        bw, bh = plan.bucket
        weights = (
            self.objects(row, plan, self.loss) if self.objects is not None else np.ones((bh, bw), np.float32)
        )
        if self.use_mask:
            weights = weights * mask_pixel_weights(row, plan)
        return to_latent(np.ascontiguousarray(weights, dtype=np.float32), self.factor)


def check_masks(rows: Sequence[Row], column: str, limit: int = 10) -> None:
    """Every row's loss mask must exist and have its image's size (read from the headers, fast)."""
    bad = []
    for row in rows:
        if isinstance(row.mask, bytes):
            continue
        try:
            with Image.open(row.mask) as im:
                size = im.size
        except (OSError, ValueError) as exc:
            bad.append(f"{row.mask or '(empty)'}: unreadable ({type(exc).__name__}) (mask of {row.name})")
            continue
        if size != row.size:
            bad.append(f"{row.mask} is {size[0]}x{size[1]}, its image {row.name} {row.size[0]}x{row.size[1]}")
    if bad:
        more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        raise UserError(
            f"loss.mask={column}: {len(bad)} mask(s) unusable: {'; '.join(bad[:limit])}{more}. Each row's mask must "
            "be a grayscale image of its image's size (255 = full weight, 0 = ignored)"
        )
