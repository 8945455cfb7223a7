"""Write the ControlNet training CSV (columns image,conditioning_image,text) from images, captions and the
conditions of a layout: segmentation masks, or box layouts drawn from the frames' labels.

Usage:
    python convert/controlnet_bdd_to_huggingface_csv.py --images_path bdd100k/images/10k/train \\
        --captions_path captions/train --conditions_path bdd100k/labels/sem_seg/masks/train \\
        --output_folder csv --split train [--relative_paths] [--palette_rgb] [--skip_mask_check] [--overwrite]
    python convert/controlnet_bdd_to_huggingface_csv.py --layout boxes --images_path bdd100k/images/100k/train \\
        --captions_path captions/train --labels_file bdd100k/labels/det_20/det_train.json \\
        --output_folder csv --split train [--relative_paths] [--overwrite]

``--layout`` names an entry of vocab/layouts.py's table, the same word and values as the ControlNet's
``controlnet.layout`` (``--conditions masks|boxes`` and ``--type`` are the old names of ``--layout seg|boxes`` and
``--split``: still accepted, with a warning). Writes ``<output_folder>/bdd_hf_dataset_<stem>_<split>.csv`` (rows
sorted by image name) and ``<output_folder>/unmatched_<stem>_<split>.txt`` (one '<reason>\\t<file>' line per file
without a row); ``<stem>`` is ``controlnet`` for masks and ``controlnet_boxes`` for box layouts. A row needs an
image and its ``<name>.txt`` caption, matched by base name, and its condition:

``--layout seg`` (default): the ``<name>.png`` mask from ``--conditions_path``. The 10K segmentation subset's names
differ from the 100K images', so a partial match is normal; zero rows is an error. ``conditioning_image`` is the
BDD100K label-id mask as it is (mode L, trainIds 0-18 and 255; training turns the ids into its conditioning input,
resizing with nearest neighbour). With --palette_rgb it instead points at official-palette RGB renderings written to
``<output_folder>/conditioning_rgb/<split>/<name>.png``, for tools that want RGB (a rerun skips renderings newer
than their mask). Every mask is checked against its image: mode (L or P; RGB colour renderings are refused), size
(read from the image's header, pixels are not decoded) and values (decoded; --skip_mask_check skips the values).

``--layout boxes``: box layouts instead of masks, for every labeled frame (the 100K set, not only the 10K masks).
Reads ``--labels_file`` (det_20, the legacy 2018 file, Scalabel exports or a folder of 2018 per-image files:
vocab/bdd.py reads them all), draws each image's frame at the image's size (read from its header) with
vocab/box_layout.py into ``<output_folder>/box_layouts/<split>/<name>.png`` (mode P, index = layout id, marked
``bdd_layout=boxes``). A row needs its frame in the labels file. A rerun redraws only layouts whose boxes, size or
drawing rules changed (a key in each PNG's header). Boxes wholly outside their frame are counted: many of them mean
the labels are not in the images' pixels.
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
from core.cli import UserError, run_main, warn_deprecated
from core.io import atomic_write_bytes
from vocab import bdd, layouts

COLUMNS = ("image", "conditioning_image", "text")
MAX_WORKERS = 8  # PIL decodes PNGs with the GIL released: threads scale to the cores
#: --conditions, the old name of --layout, and its values
OLD_CONDITIONS = {"masks": "seg", "boxes": "boxes"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hf_csv.add_common_args(parser)
    parser.add_argument(
        "--layout",
        choices=layouts.NAMES,
        help=f"{', '.join(f'{s.name}: {s.what}' for s in layouts.LAYOUTS.values())} (default: "
        f"{layouts.UNMARKED}); the value of the ControlNet's controlnet.layout",
    )
    parser.add_argument("--conditions", choices=tuple(OLD_CONDITIONS), help=argparse.SUPPRESS)  # old --layout
    parser.add_argument(
        "--conditions_path",
        help="(layouts read from files: seg) folder of <image name>.png label-id masks (labels/sem_seg/masks/<split>)",
    )
    parser.add_argument(
        "--labels_file",
        help="(layouts drawn from labels: boxes) the frames' labels: det_20 (labels/det_20/det_<split>.json), the "
        "legacy 2018 file, a Scalabel export or a folder of 2018 per-image JSONs, in the images' pixels",
    )
    parser.add_argument("--split", help="name in the output file names, e.g. train or val")
    parser.add_argument("--type", help=argparse.SUPPRESS)  # the old name of --split
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
    old_layout = OLD_CONDITIONS.get(args.conditions)
    args.layout = renamed(args.layout, old_layout, "--layout", f"--conditions {args.conditions}")
    args.layout = args.layout or layouts.UNMARKED
    args.split = renamed(args.split, args.type, "--split", f"--type {args.type}")
    if args.split is None:
        parser.error("the following arguments are required: --split")
    spec = layouts.get(args.layout)
    if spec.renderer is None:
        if not args.conditions_path:
            raise UserError(
                f"--conditions_path is required (the {spec.short} folder), or pass --layout boxes --labels_file F"
            )
        if args.labels_file:
            raise UserError(f"--labels_file is for layouts drawn from labels (--layout boxes); {spec.what} come "
                            "from --conditions_path")  # fmt: skip
    else:
        if not args.labels_file:
            raise UserError(
                f"--layout {spec.name} needs --labels_file (e.g. bdd100k/labels/det_20/det_train.json)"
            )
        files_only = [flag for flag, on in (
            ("--conditions_path", args.conditions_path), ("--palette_rgb", args.palette_rgb),
            ("--skip_mask_check", args.skip_mask_check),
        ) if on]  # fmt: skip
        if files_only:
            raise UserError(
                f"{', '.join(files_only)}: for layouts read from files (--layout seg) only; {spec.what} are drawn "
                "from --labels_file"
            )
    return args


def renamed(value: str | None, old_value: str | None, flag: str, old: str) -> str | None:
    """A flag's value, or the value its old spelling ``old`` gave (with a deprecation warning naming the new one);
    both with different values: an error."""
    if old_value is None:
        return value
    warn_deprecated(old, f"{flag} {old_value}")
    if value is not None and value != old_value:
        raise UserError(f"{flag} {value} and {old} (its old spelling) disagree; pass {flag} only")
    return old_value


def image_header(path: Path, what: str) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file's header; pixels are not decoded."""
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except OSError as exc:  # includes UnidentifiedImageError
        raise UserError(f"cannot read {what} {path}: {exc}") from None


def map_rows(fn: Callable[..., Any], desc: str, unit: str, *columns: Sequence[Any]) -> list[Any]:
    """``fn`` over the rows' columns in threads (PIL decodes and encodes PNGs with the GIL released), results in
    row order; the first error (in row order) stops the run, the rows not started are cancelled."""
    workers = min(MAX_WORKERS, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(tqdm(pool.map(fn, *columns), total=len(columns[0]), desc=desc, unit=unit))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# Where conditions come from: files (masks) or a drawing from each frame's labels (box layouts)
# ---------------------------------------------------------------------------------------------------------------


class ConditionFiles:
    """A layout whose files come ready (segmentation masks): ``--conditions_path``, checked against their images,
    optionally rendered in the layout's colours (``--palette_rgb``)."""

    def __init__(self, args: argparse.Namespace, spec: layouts.LayoutSpec):
        self.args, self.spec = args, spec
        self.condition, self.counted, self.folder = spec.one, spec.short, args.conditions_path

    def entries(self) -> list[Path]:
        return hf_csv.list_masks(self.args.conditions_path)

    def files(self, samples: Sequence[hf_csv.Sample], out: Path, split: str) -> list[Path]:
        """What each row's conditioning_image names: the file itself, or its palette rendering."""
        if not self.args.palette_rgb:
            return [s.mask for s in samples]
        return [out / "conditioning_rgb" / split / f"{bdd.stem(s.image)}.png" for s in samples]

    def prepare(self, samples: Sequence[hf_csv.Sample], files: Sequence[Path]) -> None:
        """Every file checked against its image in parallel (the first bad one stops the run with its error),
        palette renderings written on the way."""
        if self.args.palette_rgb:
            files[0].parent.mkdir(parents=True, exist_ok=True)
        rgb = files if self.args.palette_rgb else [None] * len(samples)
        map_rows(self.check, self.counted, self.condition, samples, rgb)

    def check(self, sample: hf_csv.Sample, rgb_path: Path | None) -> None:
        """Mode and size always (headers), values unless --skip_mask_check; the palette rendering if not up to
        date."""
        mask, spec = sample.mask, self.spec
        _, image_size = image_header(sample.image, "image")
        mode, mask_size = image_header(mask, spec.one)
        if mode not in ("L", "P"):
            spec.read(mask)  # raises the mode error with its hint (nothing is decoded)
        if mask_size != image_size:
            raise UserError(
                f"{spec.one} {mask} is {mask_size[0]}x{mask_size[1]} but its image {sample.image} is "
                f"{image_size[0]}x{image_size[1]}; a {spec.one} must have its image's size"
            )
        up_to_date = (
            rgb_path is None or rgb_path.is_file() and rgb_path.stat().st_mtime >= mask.stat().st_mtime
        )
        if self.args.skip_mask_check and up_to_date:
            return
        ids = spec.read(mask)  # decodes and checks the values
        if not up_to_date:
            buf = io.BytesIO()
            # compress_level 3: half the encode time of PIL's default 6 for ~3x bigger (still small) files
            Image.fromarray(spec.palette[ids]).save(buf, format="PNG", compress_level=3)
            atomic_write_bytes(rgb_path, buf.getvalue())

    def report(self, done: Any) -> None:
        pass


@dataclass
class Drawn:
    written: bool
    drawn: int  # objects on the layout
    left_out: int  # objects of the drawn classes wholly outside the frame (or invalid)


class ConditionDrawings:
    """A layout drawn from each frame's labels (box layouts) into ``<output_folder>/<folder>/<split>/``; a rerun
    redraws only files whose key (what the drawing depends on) changed."""

    condition, counted = "labels", "labeled frames"

    def __init__(self, args: argparse.Namespace, spec: layouts.LayoutSpec):
        self.args, self.spec, self.folder = args, spec, args.labels_file
        self.frames: dict[str, bdd.Frame] = {}

    def entries(self) -> list[Path]:
        """One pseudo path per frame, ``<labels file>/<base name><extension>`` (``.json`` for the 2018 per-image
        files' extensionless names): matched by base name, listed so in the unmatched report. Built from the
        frame's own base name, so it matches as the frame does (a URL's decoded file name, as its caption is
        named), whatever the name's folders, query or escapes. The first of duplicate frames is kept."""
        entries = []
        root = Path(self.args.labels_file).absolute()
        for frame in bdd.load_frames(self.args.labels_file):
            self.frames.setdefault(frame.stem, frame)
            entries.append(root / f"{frame.stem}{os.path.splitext(frame.name)[1] or '.json'}")
        return entries

    def files(self, samples: Sequence[hf_csv.Sample], out: Path, split: str) -> list[Path]:
        self.out_dir = out / self.spec.renderer.folder / split
        return [self.out_dir / f"{bdd.stem(s.image)}.png" for s in samples]

    def prepare(self, samples: Sequence[hf_csv.Sample], files: Sequence[Path]) -> list[Drawn]:
        """Every drawing in parallel; the first error (in row order) stops the run."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        frames = [self.frames[bdd.stem(s.image)] for s in samples]
        return map_rows(self.draw, self.spec.what, "frame", samples, frames, files)

    def draw(self, sample: hf_csv.Sample, frame: bdd.Frame, path: Path) -> Drawn:
        """One frame's layout at its image's size into ``path``, unless the file there has the same key."""
        _, size = image_header(sample.image, "image")
        drawing = self.spec.renderer.draw(frame.label_list(), size)
        result = Drawn(False, drawing.drawn, drawing.left_out)
        if path.is_file():
            try:
                with Image.open(path) as im:
                    if im.info.get(layouts.SOURCE_KEY) == drawing.key and im.size == size:
                        return result  # up to date: the same labels, size and drawing rules
            except OSError:
                pass  # unreadable: drawn again
        layouts.save_png(drawing.ids(), path, self.spec.name, key=drawing.key)
        result.written = True
        return result

    def report(self, done: list[Drawn]) -> None:
        one, many = self.spec.renderer.objects
        written = sum(r.written for r in done)
        drawn, outside = sum(r.drawn for r in done), sum(r.left_out for r in done)
        empty = sum(r.drawn == 0 for r in done)
        print(
            f"{self.spec.what}: {written} written, {len(done) - written} up to date in {self.out_dir}; {drawn} "
            f"{many} drawn, {empty} frame(s) without a {one}"
        )
        if outside:
            print(
                f"warning: {outside} {one}(es) lie wholly outside their frames and were left out; many of them mean "
                f"{self.args.labels_file} is not in the pixels of the images in {self.args.images_path}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    split = hf_csv.check_output_name(args.split, "--split")
    spec = layouts.get(args.layout)
    conditions = ConditionFiles(args, spec) if spec.renderer is None else ConditionDrawings(args, spec)

    # Inputs, matched by base name; captions read and checked.
    images = bdd.list_images(args.images_path)
    captions = hf_csv.list_captions(args.captions_path)
    result = hf_csv.match_samples(
        images, captions, conditions.entries(), conditions.condition, conditions.counted
    )
    hf_csv.attach_captions(result)
    folders = {
        "images": args.images_path,
        "captions": args.captions_path,
        conditions.counted: conditions.folder,
    }
    hf_csv.require_rows(result, folders)

    # CSV text first, so that a refusal to overwrite happens before anything is written.
    out = hf_csv.prepare_output(args.output_folder)
    csv_path = out / f"bdd_hf_dataset_{spec.csv_stem}_{split}.csv"
    files = conditions.files(result.samples, out, split)
    rows = [
        (
            hf_csv.csv_path_value(s.image, out, args.relative_paths),
            hf_csv.csv_path_value(f, out, args.relative_paths),
            s.caption,
        )
        for s, f in zip(result.samples, files, strict=True)
    ]
    text = hf_csv.csv_text(COLUMNS, rows)
    needs_write = hf_csv.csv_needs_write(csv_path, text, args.overwrite)

    # Conditions: masks checked (and rendered), or layouts drawn; then the CSV and the report.
    done = conditions.prepare(result.samples, files)
    hf_csv.finish(csv_path, text, needs_write, result, out / f"unmatched_{spec.csv_stem}_{split}.txt")
    conditions.report(done)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
