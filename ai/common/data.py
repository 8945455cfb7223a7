"""Training data for SDXL adapters: tables of (image, caption[, conditioning]), aspect buckets, crops, sampler.

Shared by the LoRA and ControlNet trainers. The pieces, top to bottom:

* :func:`load_rows` reads a CSV (``image,text`` columns; relative paths are relative to the CSV's folder) or a
  Hugging Face dataset (hub name on an online host, a ``save_to_disk`` folder, or a data folder) through
  ``datasets``, checks the columns, and reads every image's size from its header (unreadable images are skipped
  and listed, or fail the run, per ``on_bad_image``). Photos are used upright: an EXIF Orientation tag (a phone
  photo stored sideways) is applied by :func:`open_image`, and the sizes read from headers are the upright ones,
  so buckets and micro-conditioning match the pixels. Conditioning images (label maps) are used as stored.
* :func:`sdxl_buckets` is the standard SDXL bucket set (~1024^2 pixels, sides multiples of 64, aspect 1:4..4:1),
  scaled by a base resolution so tests can train at 128 px. A 1280x720 frame lands in the 1344x768 bucket.
* :func:`plan_crop` / :func:`apply_plan`: resize to cover the bucket, crop (center or random), optional
  horizontal flip (off by default: mirroring moves traffic to the other side of the road). The same plan is applied
  to a conditioning image (nearest-neighbour for label maps), so image and condition never drift apart.
* :class:`CropPlan.micro_conditioning` gives SDXL's true per-sample (original size, crop top-left, target size).
* :class:`BucketBatchSampler`: batches from one bucket each, shuffled deterministically from (seed, epoch),
  sharded across processes, resumable at an exact batch position mid-epoch.

All per-sample randomness (crop offset, flip) comes from (seed, epoch, row), never from global RNG state, so a
resumed run and a run with a different number of data workers see the same samples.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import ExifTags, Image

from core.cli import UserError

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) everywhere in this module
CropMode = Literal["center", "random"]


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One training example. ``image``/``conditioning`` are a file path or encoded image bytes.

    ``size`` is the image's upright (width, height): swapped for an EXIF orientation that turns it by 90 degrees.
    """

    index: int
    image: str | bytes
    text: str
    size: Size
    conditioning: str | bytes | None = None
    name: str = ""
    mask: str | bytes | None = None  # the loss mask (``loss.mask``), when the table names one

    def image_bytes(self) -> bytes:
        return _read_bytes(self.image)

    def conditioning_bytes(self) -> bytes:
        if self.conditioning is None:
            raise ValueError(f"row {self.index} has no conditioning image")
        return _read_bytes(self.conditioning)


def _read_bytes(src: str | bytes) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


#: EXIF Orientation -> the transpose that makes the stored pixels upright (the table of ``ImageOps.exif_transpose``).
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> int:
    """EXIF Orientation of an opened image (1 = stored upright, also when absent or malformed); decodes no pixels.

    Reads what parsing the header already found (JPEG/WebP EXIF, TIFF tags, XMP ``tiff:Orientation``, PNG chunks
    before the pixel data). The base class's ``getexif`` is called on purpose: PNG's own would decode the whole
    image to look for EXIF after the pixel data, which sizes read from headers must not do.
    """
    try:
        value = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # a broken EXIF block must not make a decodable photo unreadable
        logger.debug("ignoring unreadable EXIF (%s: %s)", type(exc).__name__, exc)
        return 1
    return value if isinstance(value, int) and value in EXIF_TRANSPOSE else 1


def open_image(src: str | bytes | Path, mode: str = "RGB", *, upright: bool = True) -> Image.Image:
    """Decode an image; ``upright`` applies its EXIF orientation (photos), ``upright=False`` keeps the stored
    pixels (label maps and other conditioning images). The size always agrees with :func:`_image_size`."""
    img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    orientation = exif_orientation(img) if upright else 1  # from the header, as _image_size reads it
    img.load()
    if orientation != 1:
        img = img.transpose(EXIF_TRANSPOSE[orientation])
    return img.convert(mode) if mode and img.mode != mode else img


@dataclass
class LoadReport:
    rows: list[Row]
    skipped: list[tuple[str, str]]  # (image, reason)


def load_rows(
    csv_path: str | Path | None = None,
    dataset: str | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    conditioning_column: str | None = None,
    on_bad_image: Literal["skip", "fail"] = "fail",
    max_rows: int | None = None,
    mask_column: str | None = None,
) -> LoadReport:
    """Read the table and every image's size.

    Args:
        csv_path: CSV file with a header row; relative image paths are taken relative to its folder.
        dataset: instead of a CSV, a Hugging Face dataset name, ``save_to_disk`` folder or data folder.
        split: the dataset split (ignored for CSV).
        image_column / caption_column / conditioning_column: column names.
        on_bad_image: ``skip`` drops rows whose image is missing or unreadable and lists them; ``fail`` raises.
        max_rows: keep only the first N rows (debugging).
        mask_column: a column of per-image loss masks (``loss.mask``), read into ``Row.mask``.

    Returns:
        The rows (``index`` = position in the table) and the skipped images with reasons.
    """
    if (csv_path is None) == (dataset is None):
        raise UserError("give exactly one of data.train_csv or data.dataset")
    wanted = [image_column, caption_column] + [c for c in (conditioning_column, mask_column) if c]
    if csv_path is not None:
        table, base, source = _read_csv_table(Path(csv_path), wanted), Path(csv_path).parent, str(csv_path)
    else:
        table, base, source = _read_hf_table(dataset, split, wanted), _local_dir(dataset), dataset
    n = len(table) if max_rows is None else min(len(table), max_rows)
    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    for i in range(n):
        rec = table[i]
        image = _resolve(rec[image_column], base)
        cond = _resolve(rec[conditioning_column], base) if conditioning_column else None
        label = image if isinstance(image, str) else f"{source}[{i}]"
        try:
            size = _image_size(image)
            if cond is not None:
                _image_size(cond, upright=False)
        except (OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            if on_bad_image == "fail":
                raise UserError(
                    f"{source}: row {i}: cannot read image {label} ({reason}); fix or remove the row, or set "
                    "data.on_bad_image=skip to skip unreadable images"
                ) from None
            skipped.append((label, reason))
            continue
        text = rec[caption_column]
        mask = _resolve(rec[mask_column], base) if mask_column else None
        rows.append(Row(i, image, "" if text is None else str(text), size, cond, Path(label).name, mask))
    if skipped:
        shown = "; ".join(f"{img} ({why})" for img, why in skipped[:5])
        logger.warning(
            "skipped %d unreadable image(s): %s%s", len(skipped), shown, " ..." if len(skipped) > 5 else ""
        )
    if not rows:
        raise UserError(f"{source}: no usable rows (read {n}, skipped {len(skipped)})")
    return LoadReport(rows, skipped)


def _read_csv_table(path: Path, wanted: list[str]):
    from datasets import Features, Value, load_dataset

    if not path.is_file():
        raise UserError(f"training CSV not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(header) or 'nothing'}. "
            "Set data.image_column / data.caption_column to the CSV's names"
        )
    # every column read as text: a caption like "123" stays a string, an empty one stays ""
    features = Features({name: Value("string") for name in header})
    return load_dataset("csv", data_files=str(path), split="train", features=features, keep_default_na=False)


def _read_hf_table(name: str, split: str, wanted: list[str]):
    import datasets

    local = Path(name)
    try:
        if local.is_dir() and (local / "dataset_dict.json").is_file():
            table = datasets.load_from_disk(str(local))[split]
        elif local.is_dir() and (local / "state.json").is_file():
            table = datasets.load_from_disk(str(local))
        else:
            table = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as exc:
        raise UserError(f"cannot load dataset {name!r} split {split!r}: {exc}".replace("\n", " ")) from None
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise UserError(
            f"dataset {name!r}: missing column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}"
        )
    for col in wanted:  # keep encoded bytes: hashing for caches and lazy decoding in workers
        if isinstance(table.features[col], datasets.Image):
            table = table.cast_column(col, datasets.Image(decode=False))
    return table


def _local_dir(name: str) -> Path:
    p = Path(name)
    return p if p.is_dir() else Path.cwd()


def _resolve(value: Any, base: Path) -> str | bytes:
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if value is None or value == "":
        return ""
    p = Path(str(value))
    return str(p if p.is_absolute() else base / p)


def _image_size(src: str | bytes, *, upright: bool = True) -> Size:
    """(width, height) from the header alone; ``upright``: as :func:`open_image` returns it (EXIF orientation)."""
    if src == "":
        raise ValueError("empty image path")
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
        width, height = img.size
        turned = upright and exif_orientation(img) in (5, 6, 7, 8)  # the orientations that turn by 90 degrees
    return (height, width) if turned else (width, height)


def holdout_split(rows: Sequence[Row], n_holdout: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministically hold out ``n_holdout`` rows (for validation loss); returns (train, held_out)."""
    if n_holdout <= 0:
        return list(rows), []
    if n_holdout >= len(rows):
        raise UserError(
            f"validation.loss_rows={n_holdout} leaves no training rows (the table has {len(rows)} usable rows); "
            f"set validation.loss_rows={max(1, len(rows) // 5) if len(rows) >= 2 else 0} or fewer"
        )
    picked = set(random.Random(seed).sample(range(len(rows)), n_holdout))
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


# ---------------------------------------------------------------------------------------------------------------
# Buckets and crops
# ---------------------------------------------------------------------------------------------------------------


def sdxl_buckets(base_resolution: int = 1024, step: int = 64, max_aspect: float = 4.0) -> list[Size]:
    """SDXL's aspect buckets: every (width, height) in multiples of ``step`` whose area is 90-100 % of
    base_resolution^2, aspect within 1:max_aspect..max_aspect:1. At 1024/64 this is exactly the 41-bucket set of
    the SDXL paper (1024x1024, 1152x896, ..., 1344x768, ..., 2048x512); at 128/16 a small version for tests."""
    if base_resolution % step:
        raise UserError(f"data.resolution={base_resolution} must be a multiple of data.bucket_step={step}")
    area = base_resolution * base_resolution
    sides = range(step, int(base_resolution * math.sqrt(max_aspect)) + 1, step)
    out = [
        (w, h)
        for w in sides
        for h in sides
        if 0.9 * area <= w * h <= area and 1 / max_aspect <= w / h <= max_aspect
    ]
    return sorted(out, key=lambda s: s[0] / s[1])


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket with the closest aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


@dataclass(frozen=True)
class CropPlan:
    """Resize ``original`` to ``resized`` (covering the bucket), crop ``bucket`` at (top, left), then flip."""

    original: Size
    resized: Size
    bucket: Size
    top: int
    left: int
    flip: bool

    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the (possibly mirrored) resized image, as SDXL was trained."""
        left = self.resized[0] - self.left - self.bucket[0] if self.flip else self.left
        return self.top, left

    def micro_conditioning(self) -> tuple[int, int, int, int, int, int]:
        """SDXL ``add_time_ids`` numbers: original (h, w), crop top-left (top, left), target (h, w)."""
        top, left = self.crop_top_left()
        return (self.original[1], self.original[0], top, left, self.bucket[1], self.bucket[0])

    def key(self) -> dict[str, Any]:
        """What the pixels depend on, for cache keys."""
        return {
            "resized": self.resized,
            "bucket": self.bucket,
            "top": self.top,
            "left": self.left,
            "flip": self.flip,
        }


def plan_crop(
    original: Size, bucket: Size, crop: CropMode, flip: bool, rng: random.Random | None = None
) -> CropPlan:
    scale = max(bucket[0] / original[0], bucket[1] / original[1])
    resized = (max(bucket[0], round(original[0] * scale)), max(bucket[1], round(original[1] * scale)))
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if crop == "random":
        rng = rng or random.Random(0)
        top, left = rng.randint(0, spare_h), rng.randint(0, spare_w)
    else:
        top, left = spare_h // 2, spare_w // 2
    return CropPlan(original, resized, bucket, top, left, flip)


def apply_plan(
    img: Image.Image, plan: CropPlan, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Apply a crop plan; use ``Image.Resampling.NEAREST`` for label maps (no invented class ids)."""
    if img.size != plan.original:
        raise ValueError(f"image is {img.size[0]}x{img.size[1]}, the plan was made for {plan.original}")
    if img.size != plan.resized:
        img = img.resize(plan.resized, resample=resample)
    img = img.crop((plan.left, plan.top, plan.left + plan.bucket[0], plan.top + plan.bucket[1]))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else img


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-sample RNG from (seed, epoch, row): independent of workers, processes and resume."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------------------------------------
# Dataset and sampler
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How rows become training crops (one object shared by the dataset, the caches and validation)."""

    buckets: tuple[Size, ...]
    crop: CropMode = "center"
    random_flip: bool = False
    seed: int = 0

    def bucket_of(self, row: Row) -> Size:
        return nearest_bucket(row.size, self.buckets)

    def plan(self, row: Row, epoch: int) -> CropPlan:
        rng = sample_rng(self.seed, epoch, row.index)
        flip = self.random_flip and rng.random() < 0.5
        return plan_crop(row.size, self.bucket_of(row), self.crop, flip, rng)

    def possible_plans(self, row: Row) -> list[CropPlan]:
        """Every plan a center-crop geometry can produce for ``row`` (for latent caching)."""
        if self.crop != "center":
            raise ValueError("only center crops have a finite set of plans")
        flips = (False, True) if self.random_flip else (False,)
        return [plan_crop(row.size, self.bucket_of(row), "center", f) for f in flips]


def to_tensor(img: Image.Image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class BucketBatchSampler:
    """Yields lists of (row position, epoch); every batch comes from one bucket.

    The order is a pure function of (seed, epoch): buckets are shuffled within, cut into batches, the batches
    shuffled, then dealt round-robin to processes (each gets the same count, so DDP ranks stay in step).
    ``set_position(epoch, batch)`` resumes exactly where a checkpoint stopped.
    """

    def __init__(
        self,
        buckets_of_rows: Sequence[Size],
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        self.buckets_of_rows = list(buckets_of_rows)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise UserError(
                f"{len(self.buckets_of_rows)} rows make no full batch of {batch_size} per process x {num_replicas} "
                "process(es); lower train.batch_size or add data"
            )

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches for ``epoch`` (row positions)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict[Size, list[int]] = {}
        for pos, bucket in enumerate(self.buckets_of_rows):
            groups.setdefault(bucket, []).append(pos)
        all_batches: list[list[int]] = []
        for bucket in sorted(groups):
            members = groups[bucket]
            rng.shuffle(members)
            for i in range(0, len(members), self.batch_size):
                chunk = members[i : i + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    all_batches.append(chunk)
        rng.shuffle(all_batches)
        per_rank = len(all_batches) // self.num_replicas
        return all_batches[self.rank : per_rank * self.num_replicas : self.num_replicas]

    def __len__(self) -> int:
        return len(self.batches(0))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0  # only the first pass after a resume skips
        for batch in self.batches(epoch)[start:]:
            yield [(pos, epoch) for pos in batch]


class SDXLDataset:
    """Map-style dataset over rows; items are keyed by (row position, epoch) from :class:`BucketBatchSampler`.

    Without caches an item holds ``pixel_values``; with a latent cache it holds the cached latent ``mean``/``std``
    instead, and with a text cache the prompt embeddings of the caption. ``conditioning`` (ControlNet) is cropped
    with the same plan as the image, resampled with ``conditioning_resample``. ``loss_weight`` (object-weighted
    loss) is the map of ``loss_weight_fn`` for the same plan.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        geometry: Geometry,
        latent_lookup=None,
        text_lookup=None,
        conditioning_mode: str = "RGB",
        conditioning_resample: Image.Resampling = Image.Resampling.NEAREST,
        conditioning_fn: Callable[[Row, CropPlan], Any] | None = None,
        loss_weight_fn: Callable[[Row, CropPlan], Any] | None = None,
    ):
        self.rows, self.geometry = list(rows), geometry
        self.latent_lookup, self.text_lookup = latent_lookup, text_lookup
        self.conditioning_mode, self.conditioning_resample = conditioning_mode, conditioning_resample
        self.conditioning_fn = conditioning_fn  # (row, plan) -> tensor; must be picklable for data workers
        # (row, plan) -> the loss weight map (ai/common/loss_weights.py); from the plan alone, so cached latents
        # get the map of the crop they were encoded from
        self.loss_weight_fn = loss_weight_fn

    def __len__(self) -> int:
        return len(self.rows)

    def buckets(self) -> list[Size]:
        return [self.geometry.bucket_of(r) for r in self.rows]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        import torch

        pos, epoch = key
        row = self.rows[pos]
        plan = self.geometry.plan(row, epoch)
        item: dict[str, Any] = {
            "row": row.index,
            "text": row.text,
            "time_ids": torch.tensor(plan.micro_conditioning(), dtype=torch.float32),
        }
        if self.latent_lookup is not None:
            item.update(self.latent_lookup(pos, plan))
        else:
            try:
                item["pixel_values"] = to_tensor(apply_plan(open_image(row.image), plan))
            except OSError as exc:
                raise RuntimeError(f"cannot decode image {row.name or row.index}: {exc}") from exc
        if self.text_lookup is not None:
            item.update(self.text_lookup(row.text))
        if row.conditioning is not None and self.conditioning_fn is not None:
            item["conditioning"] = self.conditioning_fn(row, plan)
        elif row.conditioning is not None:
            cond = apply_plan(
                open_image(row.conditioning, self.conditioning_mode, upright=False),
                plan,
                self.conditioning_resample,
            )
            item["conditioning"] = cond
        if self.loss_weight_fn is not None:
            item["loss_weight"] = self.loss_weight_fn(row, plan)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
