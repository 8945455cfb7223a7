"""Masks in and out of ControlNet inference: the mask folder, each mask's caption, and mask | image sheets.

"Masks" here are the condition images of any layout (vocab/layouts.py): segmentation masks or box layouts.

* :func:`list_masks`: the folder's PNG masks with sizes and layouts (box layouts are marked) from their headers
  (no pixels read); unreadable files and unsupported modes are listed in one error before the model loads.
* :func:`check_mask_layouts`: every mask is of the layout the ControlNet was trained on, else one clear error.
* :func:`read_captions`: one :class:`~ai.common.generation.PromptEntry` per mask, matched by base name from a
  captions folder (``<mask name>.txt``), the stage 1 ControlNet CSV or the one ``prompt``; the entry's source
  carries what stage 4 needs (``mask_path``, ``source_frame``, ``source_size``, ``source_labels``).
* :func:`write_sheet` / :func:`fill_missing_sheets`: the ``side_by_side/`` sheets (mask preview | image).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ai.common.generation import (
    METADATA_FILE,
    PromptEntry,
    png_bytes,
    read_captions_csv,
    read_metadata_records,
)
from ai.controlnet.conditioning import ids_to_preview, read_ids, resize_ids, side_by_side
from ai.controlnet.infer_config import ControlNetInferConfig
from ai.controlnet.plans import plan_layout
from core.cli import UserError
from core.io import atomic_write_bytes
from vocab import bdd, layouts

#: Mask modes read as label ids (ai/controlnet/conditioning.read_ids); checked from headers before the model loads.
MASK_MODES = ("L", "P", "I;16", "I", "RGB", "RGBA")

logger = logging.getLogger("bdd-sdxl.controlnet_infer")  # the script's logger: same log lines as before


# ---------------------------------------------------------------------------------------------------------------
# Masks and captions
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mask:
    path: Path
    size: tuple[int, int]
    layout: str = layouts.UNMARKED  # what its PNG marker says (vocab/layouts.py)

    @property
    def name(self) -> str:
        return bdd.stem(self.path)


def list_masks(folder: str) -> list[Mask]:
    """The folder's PNG masks, sorted, with sizes from their headers; unreadable files or modes listed at once."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(
            f"masks folder not found: {root} (paths.masks_path: a folder of label-id PNGs such as "
            "bdd100k/labels/sem_seg/masks/val)"
        )
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not paths:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:5]) or "nothing"
        raise UserError(f"no .png masks in {root} (found: {found}); masks are PNG label maps")
    masks, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                mode, size, layout = im.mode, im.size, layouts.of_image(im).name
        except OSError as exc:
            bad.append(f"{path.name} ({exc})")
            continue
        if mode not in MASK_MODES:
            bad.append(f"{path.name} (mode {mode})")
        masks.append(Mask(path, size, layout))
    if bad:
        raise UserError(
            f"{len(bad)} file(s) in {root} are not readable label masks: {', '.join(bad[:10])}"
            + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            + "; masks are PNGs of trainIds (mode L), colormaps (mode P) or palette renderings (RGB)"
        )
    return masks


def check_mask_layouts(
    masks: Sequence[Mask], layout: str, controlnet_name: str, how: str, folder: str
) -> None:
    """Refuse masks of another layout than the ControlNet's (``how``: what it was trained on, in words): their
    ids overlap, so a box layout would steer a mask ControlNet as some other classes (and the other way round)."""
    other = [m for m in masks if m.layout != layout]
    if not other:
        return
    spec = layouts.get(layout)
    found = [layouts.get(name) for name in dict.fromkeys(m.layout for m in other)]
    described = " and ".join(
        f"{f.what} (marked {f.marker_text})"
        if f.marker
        else f"not {spec.what} (no {spec.marker_text} marker)"
        for f in found
    )
    names = [m.path.name for m in other]
    raise UserError(
        f"ControlNet {controlnet_name} was trained on {how}, but {len(other)} of {len(masks)} file(s) in "
        f"paths.masks_path {folder} are {described}: {', '.join(names[:5])}"
        + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        + f"; point paths.masks_path at {spec.what} ({spec.source}), or use a ControlNet trained on "
        f"{found[0].what}"
    )


def read_captions(cfg: ControlNetInferConfig, masks: Sequence[Mask]) -> tuple[list[PromptEntry], list[str]]:
    """One entry per mask that has a caption (captions folder, stage 1 CSV or the one prompt) and the masks without."""
    captions_path = cfg.paths.captions_path
    if captions_path and cfg.prompt:
        raise UserError(
            "set either paths.captions_path (captions per mask) or prompt (one prompt for all masks), not both; "
            "clear one with paths.captions_path=null or prompt=null"
        )
    if not captions_path and not cfg.prompt:
        raise UserError(
            "no prompts: set paths.captions_path (a folder of <mask name>.txt captions or the stage 1 CSV) "
            "or prompt (one prompt for all masks)"
        )
    found: dict[str, tuple[str, str]] = {}  # mask name -> (caption, where it came from)
    if captions_path is None:
        found = {m.name: (cfg.prompt, "prompt") for m in masks}
    elif Path(captions_path).is_file():
        for entry in read_captions_csv(Path(captions_path), cfg.captions_column, cfg.on_error):
            key = entry.source.get("mask_path") or entry.source.get("source_frame")
            if key is None:
                raise UserError(
                    f"{captions_path} has no image or conditioning_image column to match captions to masks by name"
                )
            found.setdefault(bdd.stem(key), (entry.text, entry.source["prompt_source"]))
    elif Path(captions_path).is_dir():
        for mask in masks:
            path = Path(captions_path) / f"{mask.name}.txt"
            if path.is_file():
                text = path.read_text(encoding="utf-8-sig").strip()
                if text:
                    found[mask.name] = (text, str(path))
    else:
        raise UserError(
            f"captions not found: {captions_path} (paths.captions_path: a folder of <mask name>.txt captions or "
            "the stage 1 ControlNet CSV)"
        )

    labels = str(Path(cfg.paths.source_labels).resolve()) if cfg.paths.source_labels else None
    entries, missing = [], []
    for mask in masks:
        if mask.name not in found:
            missing.append(mask.path.name)
            continue
        text, origin = found[mask.name]
        source = {
            "mask_path": str(mask.path.resolve()),  # absolute: stage 4 resolves relative paths elsewhere
            "source_frame": f"{mask.name}.jpg",  # BDD100K images are <name>.jpg
            "source_size": list(mask.size),
            "source_labels": labels,
            "prompt_source": origin,
        }
        entries.append(PromptEntry(text, source, name=mask.name))
    if missing:
        message = (
            f"{len(missing)} of {len(masks)} mask(s) have no caption in {captions_path}: "
            + ", ".join(missing[:10])
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )
        if cfg.on_error == "stop":
            raise UserError(
                f"{message}; add <mask name>.txt captions, or set on_error=skip to leave them out"
            )
        logger.warning("%s; left out (on_error=skip)", message)
    if not entries:
        raise UserError(f"no mask in {cfg.paths.masks_path} has a caption in {captions_path}")
    if cfg.max_prompts is not None:
        entries = entries[: cfg.max_prompts]
    return entries, missing


# ---------------------------------------------------------------------------------------------------------------
# Side-by-side sheets (mask | image)
# ---------------------------------------------------------------------------------------------------------------


def write_sheet(folder: Path, file: str, ids, image, layout: str = layouts.UNMARKED) -> None:
    """``folder/file``: the mask's (or box layout's) palette preview | the generated image, written atomically."""
    atomic_write_bytes(folder / file, png_bytes(side_by_side(ids_to_preview(ids, layout), image)))


def fill_missing_sheets(out_dir: Path, sheets_dir: Path) -> int:
    """Sheets for finished images that lack one (e.g. made before side_by_side was switched on)."""
    made = 0
    path = out_dir / METADATA_FILE
    for record in read_metadata_records(path) if path.is_file() else []:
        image_path = out_dir / record["file"]
        planned = record.get("plan_id") is not None and record.get("labels") is not None  # a plan's scene
        if (sheets_dir / record["file"]).is_file() or not image_path.is_file():
            continue
        if not record.get("mask_path") and not planned:
            continue
        layout = record.get("layout", layouts.UNMARKED)  # records before box layouts: masks
        try:
            ids = plan_layout(record, layout) if planned else read_ids(record["mask_path"], layout=layout)
        except UserError as exc:
            logger.warning("no side-by-side sheet for %s: %s", record["file"], exc)
            continue
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        write_sheet(sheets_dir, record["file"], resize_ids(ids, image.size), image, layout)
        made += 1
    return made
