"""Write the ControlNet training CSV (columns image,conditioning_image,text) from images, captions and masks
or boxes.

Usage:
    python convert/controlnet_bdd_to_huggingface_csv.py --images_path bdd100k/images/10k/train \\
        --captions_path captions/train --conditions_path bdd100k/labels/sem_seg/masks/train \\
        --output_folder csv --type train [--relative_paths] [--palette_rgb] [--skip_mask_check] [--overwrite]
    python convert/controlnet_bdd_to_huggingface_csv.py --conditions boxes --images_path bdd100k/images/100k/train \\
        --captions_path captions/train --labels_file bdd100k/labels/det_20/det_train.json \\
        --output_folder csv --type train [--relative_paths] [--overwrite]

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

``--conditions boxes``: box layouts instead of masks, for every labeled frame (the 100K set, not only the 10K
masks). Reads ``--labels_file`` (det_20, the legacy 2018 file, Scalabel exports or a folder of 2018 per-image
files: vocab/bdd.py reads them all), renders each image's frame at the image's size (read from its header) with
vocab/box_layout.py into ``<output_folder>/box_layouts/<type>/<name>.png`` (mode P, index = layout id, marked
``bdd_layout=boxes``) and writes ``<output_folder>/bdd_hf_dataset_controlnet_boxes_<type>.csv`` and
``unmatched_controlnet_boxes_<type>.txt``. A row needs an image, its caption and its frame in the labels file. A
rerun rewrites only layouts whose boxes, size or rendering rules changed (a key in each PNG's header). Boxes
wholly outside their frame are counted: many of them mean the labels are not in the images' pixels.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from convert import hf_csv
from core.cli import UserError, run_main
from core.io import atomic_write_bytes
from vocab import bdd, box_layout

COLUMNS = ("image", "conditioning_image", "text")
MAX_WORKERS = 8  # PIL decodes PNGs with the GIL released: threads scale to the cores


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hf_csv.add_common_args(parser)
    parser.add_argument(
        "--conditions",
        choices=("masks", "boxes"),
        default="masks",
        help="masks: segmentation masks from --conditions_path (default); boxes: box layouts rendered from "
        "--labels_file",
    )
    parser.add_argument(
        "--conditions_path",
        help="(masks) folder of <image name>.png label-id masks (labels/sem_seg/masks/<split>)",
    )
    parser.add_argument(
        "--labels_file",
        help="(boxes) the frames' labels: det_20 (labels/det_20/det_<split>.json), the legacy 2018 file, a Scalabel "
        "export or a folder of 2018 per-image JSONs, in the images' pixels",
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
    args = parser.parse_args(argv)
    if args.conditions == "masks":
        if not args.conditions_path:
            raise UserError(
                "--conditions_path is required (the masks folder), or pass --conditions boxes --labels_file F"
            )
        if args.labels_file:
            raise UserError("--labels_file is for --conditions boxes; masks come from --conditions_path")
    else:
        if not args.labels_file:
            raise UserError(
                "--conditions boxes needs --labels_file (e.g. bdd100k/labels/det_20/det_train.json)"
            )
        masks_only = [flag for flag, on in (
            ("--conditions_path", args.conditions_path), ("--palette_rgb", args.palette_rgb),
            ("--skip_mask_check", args.skip_mask_check),
        ) if on]  # fmt: skip
        if masks_only:
            raise UserError(
                f"{', '.join(masks_only)}: for --conditions masks only; box layouts are rendered from --labels_file"
            )
    return args


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


def map_rows(fn: Callable[..., Any], desc: str, unit: str, *columns: Sequence[Any]) -> list[Any]:
    """``fn`` over the rows' columns in threads (PIL decodes and encodes PNGs with the GIL released), results in
    row order; the first error (in row order) stops the run, the rows not started are cancelled."""
    workers = min(MAX_WORKERS, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(tqdm(pool.map(fn, *columns), total=len(columns[0]), desc=desc, unit=unit))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_masks(
    samples: Sequence[hf_csv.Sample], check_values: bool, rgb_paths: Sequence[Path | None]
) -> None:
    """All masks in parallel; the first bad one (in row order) stops the run with its error."""
    map_rows(check_mask, "masks", "mask", samples, [check_values] * len(samples), rgb_paths)


# ---------------------------------------------------------------------------------------------------------------
# Box layouts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LayoutResult:
    written: bool
    drawn: int  # boxes on the layout
    outside: int  # boxes of the 10 classes that lie wholly outside the frame (or are invalid)


def write_layout(sample: hf_csv.Sample, frame: bdd.Frame, path: Path) -> LayoutResult:
    """Render one frame's boxes at its image's size into ``path``, unless the file there has the same key."""
    _, size = image_header(sample.image, "image")
    labels = frame.label_list()
    boxes = box_layout.layout_boxes(labels, size)
    candidates = sum(
        1
        for label in labels
        if label.box2d is not None
        and (cat := bdd.category_of(label)).det_class is not None
        and not cat.ignored
    )
    key = box_layout.boxes_key(boxes, size)
    result = LayoutResult(False, len(boxes), candidates - len(boxes))
    if path.is_file():
        try:
            with Image.open(path) as im:
                if im.info.get(box_layout.SOURCE_KEY) == key and im.size == size:
                    return result  # up to date: the same boxes, size and rendering rules
        except OSError:
            pass  # unreadable: rendered again
    box_layout.save_layout(box_layout.draw_layout(boxes, size), path, key=key)
    result.written = True
    return result


def write_layouts(
    samples: Sequence[hf_csv.Sample], frames: dict[str, bdd.Frame], paths: Sequence[Path]
) -> list[LayoutResult]:
    """All layouts in parallel; the first error (in row order) stops the run."""
    row_frames = [frames[bdd.stem(s.image)] for s in samples]
    return map_rows(write_layout, "box layouts", "frame", samples, row_frames, paths)


def index_frames(labels_file: str) -> tuple[dict[str, bdd.Frame], list[Path]]:
    """Frames by base name (the first of duplicates) and one pseudo path per frame, ``<labels file>/<base
    name><extension>`` (``.json`` for the 2018 per-image files' extensionless names): matched by base name, listed
    so in the unmatched report. Built from the frame's own base name, so it matches as the frame does (a URL's
    decoded file name, as its caption is named), whatever the name's folders, query or escapes."""
    frames: dict[str, bdd.Frame] = {}
    entries = []
    root = Path(labels_file).absolute()
    for frame in bdd.load_frames(labels_file):
        frames.setdefault(frame.stem, frame)
        entries.append(root / f"{frame.stem}{os.path.splitext(frame.name)[1] or '.json'}")
    return frames, entries


def main_boxes(args: argparse.Namespace, kind: str) -> int:
    images = bdd.list_images(args.images_path)
    captions = hf_csv.list_captions(args.captions_path)
    frames, entries = index_frames(args.labels_file)
    result = hf_csv.match_samples(images, captions, entries, condition="labels")
    hf_csv.attach_captions(result)
    folders = {"images": args.images_path, "captions": args.captions_path, "labeled frames": args.labels_file}
    hf_csv.require_rows(result, folders)

    out = hf_csv.prepare_output(args.output_folder)
    csv_path = out / f"bdd_hf_dataset_controlnet_boxes_{kind}.csv"
    layout_dir = out / "box_layouts" / kind
    paths = [layout_dir / f"{bdd.stem(s.image)}.png" for s in result.samples]
    rows = [
        (
            hf_csv.csv_path_value(s.image, out, args.relative_paths),
            hf_csv.csv_path_value(p, out, args.relative_paths),
            s.caption,
        )
        for s, p in zip(result.samples, paths, strict=True)
    ]
    text = hf_csv.csv_text(COLUMNS, rows)
    needs_write = hf_csv.csv_needs_write(csv_path, text, args.overwrite)  # refused before anything is written

    layout_dir.mkdir(parents=True, exist_ok=True)
    done = write_layouts(result.samples, frames, paths)
    hf_csv.finish(csv_path, text, needs_write, result, out / f"unmatched_controlnet_boxes_{kind}.txt")
    written = sum(r.written for r in done)
    drawn, outside = sum(r.drawn for r in done), sum(r.outside for r in done)
    empty = sum(r.drawn == 0 for r in done)
    print(
        f"box layouts: {written} written, {len(done) - written} up to date in {layout_dir}; {drawn} boxes drawn, "
        f"{empty} frame(s) without a box"
    )
    if outside:
        print(
            f"warning: {outside} box(es) lie wholly outside their frames and were left out; many of them mean "
            f"{args.labels_file} is not in the pixels of the images in {args.images_path}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kind = hf_csv.check_output_name(args.type, "--type")
    if args.conditions == "boxes":
        return main_boxes(args, kind)

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
