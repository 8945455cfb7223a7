"""Write the ControlNet training CSV (columns image,conditioning_image,text) from images, captions and masks.

Usage:
    python convert/controlnet_bdd_to_huggingface_csv.py --images_path bdd100k/images/10k/train \\
        --captions_path captions/train --conditions_path bdd100k/labels/sem_seg/masks/train \\
        --output_folder csv --type train [--relative_paths] [--palette_rgb] [--skip_mask_check] [--overwrite]

Writes ``<output_folder>/bdd_hf_dataset_controlnet_<type>.csv`` (rows sorted by image name) and
``<output_folder>/unmatched_controlnet_<type>.txt`` (one '<reason>\\t<file>' line per file without a row).
A row needs an image, its ``<name>.txt`` caption and its ``<name>.png`` mask, matched by base name. The 10K
segmentation subset's names differ from the 100K images', so a partial match is normal; zero rows is an error.

``conditioning_image`` is the BDD100K label-id mask as it is (mode L, trainIds 0-18 and 255; training turns the
ids into its conditioning input, resizing with nearest neighbour). With --palette_rgb it instead points at
official-palette RGB renderings written to ``<output_folder>/conditioning_rgb/<type>/<name>.png``, for tools
that want RGB (a rerun skips renderings newer than their mask).

Every mask is checked against its image: mode (L or P; RGB colour renderings are refused), size (read from
the image's header, pixels are not decoded) and values (decoded; --skip_mask_check skips the values).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ai.common.cli import UserError, run_main
from ai.common.io import atomic_write_bytes
from convert import bdd, hf_csv

COLUMNS = ("image", "conditioning_image", "text")
MAX_WORKERS = 8  # PIL decodes PNGs with the GIL released: threads scale to the cores


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hf_csv.add_common_args(parser)
    parser.add_argument(
        "--conditions_path",
        required=True,
        help="folder of <image name>.png label-id masks (labels/sem_seg/masks/<split>)",
    )
    parser.add_argument("--type", required=True, help="name in the output file names, e.g. train or val")
    parser.add_argument(
        "--palette_rgb",
        action="store_true",
        help="point conditioning_image at official-palette RGB PNGs written under <output_folder>/conditioning_rgb/",
    )
    parser.add_argument(
        "--skip_mask_check",
        action="store_true",
        help="check masks' mode and size only (headers), not their values (faster on the full 7,000 masks)",
    )
    return parser.parse_args(argv)


def image_header(path: Path, what: str) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file's header; pixels are not decoded."""
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except OSError as exc:  # includes UnidentifiedImageError
        raise UserError(f"cannot read {what} {path}: {exc}") from None


def rgb_up_to_date(rgb_path: Path, mask: Path) -> bool:
    return rgb_path.is_file() and rgb_path.stat().st_mtime >= mask.stat().st_mtime


def check_mask(sample: hf_csv.Sample, check_values: bool, rgb_path: Path | None) -> None:
    """Check a mask against its image; write its palette rendering when asked and not up to date."""
    mask = sample.mask
    _, image_size = image_header(sample.image, "image")
    mode, mask_size = image_header(mask, "mask")
    if mode not in ("L", "P"):
        bdd.read_label_mask(mask)  # raises the mode error with its hint (nothing is decoded)
    if mask_size != image_size:
        raise UserError(
            f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {sample.image} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size"
        )
    write_rgb = rgb_path is not None and not rgb_up_to_date(rgb_path, mask)
    if not (check_values or write_rgb):
        return
    ids = bdd.read_label_mask(mask)  # decodes and checks values 0-18, 255
    if write_rgb:
        buf = io.BytesIO()
        # compress_level 3: half the encode time of PIL's default 6 for ~3x bigger (still small) files
        Image.fromarray(bdd.ids_to_palette_rgb(ids)).save(buf, format="PNG", compress_level=3)
        atomic_write_bytes(rgb_path, buf.getvalue())


def check_masks(
    samples: Sequence[hf_csv.Sample], check_values: bool, rgb_paths: Sequence[Path | None]
) -> None:
    """All masks in parallel; the first bad one (in row order) stops the run with its error."""
    workers = min(MAX_WORKERS, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        jobs = pool.map(check_mask, samples, [check_values] * len(samples), rgb_paths)
        for _ in tqdm(jobs, total=len(samples), desc="masks", unit="mask"):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kind = hf_csv.check_output_name(args.type, "--type")

    # Inputs, matched by base name; captions read and checked.
    images = bdd.list_images(args.images_path)
    captions = hf_csv.list_captions(args.captions_path)
    masks = hf_csv.list_masks(args.conditions_path)
    result = hf_csv.match_samples(images, captions, masks)
    hf_csv.attach_captions(result)
    folders = {"images": args.images_path, "captions": args.captions_path, "masks": args.conditions_path}
    hf_csv.require_rows(result, folders)

    # CSV text first, so that a refusal to overwrite happens before anything is written.
    out = hf_csv.prepare_output(args.output_folder)
    csv_path = out / f"bdd_hf_dataset_controlnet_{kind}.csv"
    rgb_dir = out / "conditioning_rgb" / kind
    rgb_paths = [rgb_dir / f"{bdd.stem(s.image)}.png" if args.palette_rgb else None for s in result.samples]
    rows = [
        (
            hf_csv.csv_path_value(s.image, out, args.relative_paths),
            hf_csv.csv_path_value(rgb or s.mask, out, args.relative_paths),
            s.caption,
        )
        for s, rgb in zip(result.samples, rgb_paths, strict=True)
    ]
    text = hf_csv.csv_text(COLUMNS, rows)
    needs_write = hf_csv.csv_needs_write(csv_path, text, args.overwrite)

    # Masks: mode and size always, values unless skipped; palette renderings written on the way.
    if args.palette_rgb:
        rgb_dir.mkdir(parents=True, exist_ok=True)
    check_masks(result.samples, not args.skip_mask_check, rgb_paths)

    hf_csv.finish(csv_path, text, needs_write, result, out / f"unmatched_controlnet_{kind}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
