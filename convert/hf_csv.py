"""Shared steps of the two CSV scripts: list inputs, match them by base name, read captions, write CSV + report.

``lora_bdd_to_huggingface_csv.py`` (image,text) and ``controlnet_bdd_to_huggingface_csv.py``
(image,conditioning_image,text) differ only in the conditions (a folder of masks, or the labeled frames a layout is
drawn from); everything else lives here once:

* matching by :func:`vocab.bdd.stem` (``x.jpg`` pairs with ``x.txt`` and ``x.png``), with every file left
  out listed with its reason (partial matches are normal: the 10K segmentation names differ from the 100K's);
* captions read as strict UTF-8 (an invalid byte is an error naming the file and byte position; an empty
  caption skips its row and is listed);
* the CSV built in memory (UTF-8, ``csv`` quoting since captions hold commas), rows sorted by image name, then
  written atomically; an existing CSV with other content is refused unless ``--overwrite``, an identical one
  is left untouched (a rerun is a no-op).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from core.cli import UserError
from core.io import atomic_write_text
from vocab import bdd

# Reasons a file gets no row (the first words of each line of the unmatched list); those of the ControlNet
# condition are built from its name (MatchResult.condition): "image without mask", "mask without image", ...
IMAGE_WITHOUT_CAPTION = "image without caption"
CAPTION_WITHOUT_IMAGE = "caption without image"
EMPTY_CAPTION = "empty caption"
DUPLICATE_IMAGE = "duplicate image name"
DUPLICATE_CAPTION = "duplicate caption name"

SHOWN_PER_REASON = 5  # names printed per reason; the unmatched file has them all
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------------------------
# Arguments both scripts take
# ---------------------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images_path", required=True, help="folder of images (jpg, jpeg, png, webp)")
    parser.add_argument("--captions_path", required=True, help="folder of <image name>.txt captions (UTF-8)")
    parser.add_argument("--output_folder", required=True, help="where the CSV and the unmatched list go")
    parser.add_argument(
        "--relative_paths",
        action="store_true",
        help="write paths relative to the CSV's folder (default: absolute paths)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing CSV whose content differs (an identical one is always left as it is)",
    )


def check_output_name(value: str, flag: str) -> str:
    """``--split``/``--type`` become part of file names: plain names only."""
    if not _SAFE_NAME.match(value):
        raise UserError(f"{flag} {value!r}: use letters, digits, '.', '_' or '-' only (e.g. train, val)")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Inputs and matching
# ---------------------------------------------------------------------------------------------------------------


def list_files(folder: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Files of ``folder`` whose suffix is in ``suffixes`` (case-insensitive), sorted; error if no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def list_captions(folder: str | os.PathLike) -> list[Path]:
    return list_files(folder, (".txt",), "caption")


def list_masks(folder: str | os.PathLike) -> list[Path]:
    """Label-id masks are PNGs (lossless); other files in the folder are not masks."""
    return list_files(folder, (".png",), "mask")


@dataclass(frozen=True)
class Sample:
    """One future CSV row: an image, its caption file and (ControlNet) its mask or its labels' entry."""

    image: Path
    caption_file: Path
    mask: Path | None = None
    caption: str = ""


@dataclass
class MatchResult:
    samples: list[Sample]
    unmatched: list[tuple[str, Path]] = field(default_factory=list)  # (reason, file)
    counts: dict[str, int] = field(default_factory=dict)  # files found per kind: images, captions, masks
    condition: str = "mask"  # what the third input is called in reasons: "mask" or "labels"


def _drop_duplicates(paths: Sequence[Path], reason: str, unmatched: list[tuple[str, Path]]) -> list[Path]:
    """Keep the first file per base name (sorted order); list the others (e.g. x.jpg next to x.png)."""
    seen: set[str] = set()
    kept = []
    for p in paths:
        key = bdd.stem(p)
        if key in seen:
            unmatched.append((reason, p))
        else:
            seen.add(key)
            kept.append(p)
    return kept


def match_samples(
    images: Sequence[Path],
    captions: Sequence[Path],
    masks: Sequence[Path] | None = None,
    condition: str = "mask",
    counted: str = "masks",
) -> MatchResult:
    """Pair images with captions (and masks) by base name; rows sorted by image name.

    Every file without a row is listed with its reason; duplicate base names keep the first file.
    ``condition`` names the third input in the reasons and ``counted`` in the counts (``labels`` and ``labeled
    frames``: ``masks`` are one entry per labeled frame, e.g. ``<labels file>/<frame's base name>.jpg``, as the CSV of
    a layout drawn from labels passes them).
    """
    unmatched: list[tuple[str, Path]] = []
    counts = {"images": len(images), "captions": len(captions)}
    images = _drop_duplicates(images, DUPLICATE_IMAGE, unmatched)
    captions = _drop_duplicates(captions, DUPLICATE_CAPTION, unmatched)
    with_caption = bdd.match_by_stem(images, captions)
    caption_of = {bdd.stem(img): cap for img, cap in with_caption.pairs}
    unmatched += [(CAPTION_WITHOUT_IMAGE, p) for p in with_caption.right_only]

    mask_of: dict[str, Path] | None = None
    if masks is not None:
        counts[counted] = len(masks)
        masks = _drop_duplicates(masks, f"duplicate {condition} name", unmatched)
        with_mask = bdd.match_by_stem(images, masks)
        mask_of = {bdd.stem(img): mask for img, mask in with_mask.pairs}
        unmatched += [(f"{condition} without image", p) for p in with_mask.right_only]

    samples = []
    for image in images:
        key = bdd.stem(image)
        caption = caption_of.get(key)
        mask = mask_of.get(key) if mask_of is not None else None
        missing = []
        if caption is None:
            missing.append("caption")
        if mask_of is not None and mask is None:
            missing.append(condition)
        if missing:  # "image without caption", "... without mask", "... without caption and mask"
            unmatched.append((f"image without {' and '.join(missing)}", image))
            continue
        samples.append(Sample(image, caption, mask))
    samples.sort(key=lambda s: s.image.name)
    return MatchResult(samples, unmatched, counts, condition)


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------


def read_caption(path: str | os.PathLike) -> str:
    """A caption file's text, stripped; strict UTF-8 (a leading BOM is dropped)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"caption {path} is not valid UTF-8: byte 0x{data[exc.start]:02x} at position {exc.start} "
            f"({exc.reason}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff").strip()


def attach_captions(result: MatchResult) -> None:
    """Read every matched caption into its sample; empty captions drop their row and are listed."""
    kept = []
    for sample in tqdm(
        result.samples, desc="captions", unit="file", leave=False, disable=len(result.samples) < 1000
    ):
        text = read_caption(sample.caption_file)
        if not text:
            result.unmatched.append((EMPTY_CAPTION, sample.caption_file))
            continue
        kept.append(Sample(sample.image, sample.caption_file, sample.mask, text))
    result.samples = kept


def require_rows(result: MatchResult, folders: dict[str, Path]) -> None:
    """Zero rows is an error that says why: counts per input and a few names of each side."""
    if result.samples:
        return
    by_reason = Counter(reason for reason, _ in result.unmatched)
    found = ", ".join(f"{n} {kind} in {folders[kind]}" for kind, n in result.counts.items())
    if by_reason[EMPTY_CAPTION]:  # everything that matched had an empty caption
        raise UserError(f"no rows: all {by_reason[EMPTY_CAPTION]} matched captions are empty ({found})")
    examples = []
    c = result.condition
    reasons = (f"image without caption and {c}", IMAGE_WITHOUT_CAPTION, f"image without {c}")
    for reason in (*reasons, CAPTION_WITHOUT_IMAGE, f"{c} without image"):
        names = [p.name for r, p in result.unmatched if r == reason][:3]
        if names:
            examples.append(f"{reason}: {', '.join(names)}")
    hint = "; ".join(examples) if examples else "a folder is empty"
    raise UserError(
        f"no rows: no image has a matching {'caption and ' + c if len(result.counts) > 2 else 'caption'} "
        f"by base name ({found}). {hint}. Check that the folders belong to the same split; note that the 10K "
        "segmentation images (and their masks) only partly share names with the 100K images"
    )


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def csv_path_value(path: Path, csv_dir: Path, relative: bool) -> str:
    """The path as the CSV stores it: absolute, or relative to the CSV's folder (forward slashes)."""
    absolute = os.path.abspath(path)
    if not relative:
        return absolute
    return Path(os.path.relpath(absolute, os.path.abspath(csv_dir))).as_posix()


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """CSV with a header, minimal quoting (fields with commas, quotes or newlines are quoted), '\\n' line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def prepare_output(output_folder: str | os.PathLike) -> Path:
    out = Path(output_folder)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_folder {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def csv_needs_write(csv_path: Path, text: str, overwrite: bool) -> bool:
    """False if ``csv_path`` already holds ``text``; refuse to replace other content without ``overwrite``."""
    if not csv_path.exists():
        return True
    if csv_path.read_bytes() == text.encode("utf-8"):
        return False
    if not overwrite:
        raise UserError(
            f"{csv_path} already exists with different content; pass --overwrite to replace it "
            "or choose another --output_folder"
        )
    return True


def unmatched_text(unmatched: Sequence[tuple[str, Path]]) -> str:
    """One '<reason>\\t<absolute path>' line per file, grouped by reason, then by name."""
    lines = sorted((reason, str(Path(p).absolute())) for reason, p in unmatched)
    return "".join(f"{reason}\t{path}\n" for reason, path in lines)


def write_if_changed(path: Path, text: str) -> bool:
    """Atomic write unless the file already holds ``text`` (keeps reruns from touching files)."""
    if path.exists() and path.read_bytes() == text.encode("utf-8"):
        return False
    atomic_write_text(path, text)
    return True


def report_lines(result: MatchResult, unmatched_path: Path) -> list[str]:
    """The on-screen report: counts, and the first few names per reason."""
    found = ", ".join(f"{n} {kind}" for kind, n in result.counts.items())
    lines = [f"found {found}; matched {len(result.samples)} rows"]
    by_reason: dict[str, list[Path]] = {}
    for reason, p in sorted(result.unmatched, key=lambda rp: (rp[0], rp[1].name)):
        by_reason.setdefault(reason, []).append(p)
    if not by_reason:
        lines.append("unmatched: none")
        return lines
    lines.append(f"unmatched: {len(result.unmatched)} files (full list: {unmatched_path})")
    for reason, paths in by_reason.items():
        shown = ", ".join(p.name for p in paths[:SHOWN_PER_REASON])
        more = f" ... and {len(paths) - SHOWN_PER_REASON} more" if len(paths) > SHOWN_PER_REASON else ""
        lines.append(f"  {reason}: {len(paths)} ({shown}{more})")
    return lines


def finish(csv_path: Path, text: str, needs_write: bool, result: MatchResult, unmatched_path: Path) -> None:
    """Write the CSV (if it changed) and the unmatched list, then print the report and summary."""
    if needs_write:
        atomic_write_text(csv_path, text)
    write_if_changed(unmatched_path, unmatched_text(result.unmatched))
    for line in report_lines(result, unmatched_path):
        print(line)
    state = "wrote" if needs_write else "unchanged (identical to the existing file)"
    print(f"{state}: {csv_path} ({len(result.samples)} rows)")
