"""ControlNet conditioning from label maps (segmentation masks, box layouts, any layout of vocab/layouts.py's table),
shared by ControlNet training and inference.

A layout (``layout``: ``seg``, ``boxes``, ...) is what the map's ids mean; vocab/layouts.py holds one entry per
layout with everything this module asks of it. Each layout reaches the ControlNet in one of two encodings (``kind``):

* ``palette``: the layout's colours as RGB in [0, 1] (3 channels, the form most ControlNets use): the official
  BDD100K palette for masks, :data:`vocab.box_layout.BOX_PALETTE` for box layouts;
* ``one_hot``: one channel per id (19 for masks; 11 for box layouts: 10 classes and the outlines): no two ids
  can be confused by colour.

The "nothing here" id (255: ignore, background) is explicit in both: black in the palette form, all-zero in the
one-hot form, so "no class here" and "no condition at all" (:func:`blank_condition`, zeros everywhere) read the
same to the network.

The ids of different layouts overlap numerically (a box layout's 2 = car, a mask's 2 = building), so a file's layout
is never guessed from its pixels: marked PNGs say theirs (:func:`vocab.layouts.of_file`, header only),
:func:`read_ids` refuses a file of another layout, and a trained ControlNet records its layout
(ai/controlnet/architecture.py).

Masks are read as label ids (mode ``L``), palette images (mode ``P``: the palette *index* is the trainId, whatever
the palette holds: the official colours of the colormaps, the grey identity palette of some toolkit masks, any
other) or official-palette RGB renderings (stage 1's ``--palette_rgb``, mapped back by colour); anything else is a
clear error naming the file. A P image is never converted to RGB or luminance: a palette that is not the official
one (or the official colours at other indices) would give other ids. Box layouts are read as ids (mode ``L`` or
``P``, index = id). Resizing is left to the caller and must be nearest-neighbour (training: ai/common/data.py's
crop plan; inference: before :func:`ids_to_tensor`), so no pixel ever gets a class that is not in the map.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from core.cli import UserError
from vocab import layouts


def channels_for(kind: str, layout: str = layouts.UNMARKED) -> int:
    """Input channels of a ControlNet for ``kind``: palette -> 3; one_hot -> one per id (19 for masks, 11 for box
    layouts)."""
    return layouts.get(layout).channels(kind)


def kind_for_channels(
    channels: int, source: str | os.PathLike = "the ControlNet", layout: str = layouts.UNMARKED
) -> str:
    """The conditioning kind a ControlNet with ``channels`` input channels takes (3 -> palette, 19 or 11 ->
    one_hot for masks or box layouts)."""
    spec = layouts.get(layout)
    for kind in layouts.ENCODINGS:
        if spec.channels(kind) == channels:
            return kind
    raise UserError(
        f"{source} has conditioning_channels={channels}; {spec.what} give 3 (palette) or "
        f"{spec.one_hot_channels} (one_hot) channels"
    )


def training_layout_error(
    other: list[tuple[str, str]], total: int, layout: str, limit: int = 10
) -> UserError:
    """Training rows whose condition files (``(path, found layout)``) are of another layout than
    ``controlnet.layout``."""
    spec = layouts.get(layout)
    found = [layouts.get(name) for name in dict.fromkeys(name for _, name in other)]
    what = " and ".join(f.what for f in found)
    more = f" (and {len(other) - limit} more)" if len(other) > limit else ""
    csv_name = f"bdd_hf_dataset_{spec.csv_stem}_<split>.csv"
    hint = (
        f"set controlnet.layout={found[0].name} to train on {found[0].what}, or point data.train_csv at a CSV of "
        f"{spec.what} (convert/controlnet_bdd_to_huggingface_csv.py --layout {spec.name} writes {csv_name})"
    )
    return UserError(
        f"{len(other)} of {total} conditioning image(s) are {what} (by their PNG marker), but "
        f"controlnet.layout={layout} trains on {spec.what}{more}: "
        + ", ".join(path for path, _ in other[:limit])
        + f"; {hint}. The ids of different layouts overlap, so one is never read as another"
    )


def check_csv_layout(csv_path: str | Path, column: str, layout: str, rows: int = 8) -> None:
    """The first ``rows`` condition files of a training CSV are of ``layout`` (headers only; the launcher's fast
    check, before accelerate starts: training checks every row again)."""
    import csv

    csv_path = Path(csv_path)
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or column not in reader.fieldnames:
            return  # the missing column is reported when the rows are loaded
        paths = []
        for record in reader:
            value = (record.get(column) or "").strip()
            if value:
                path = Path(value)
                paths.append(path if path.is_absolute() else csv_path.parent / path)
            if len(paths) >= rows:
                break
    other = []
    for path in paths:
        try:
            found = layouts.of_file(path).name
        except OSError:
            continue  # missing or unreadable files are reported with their rows
        if found != layout:
            other.append((str(path), found))
    if other:
        raise training_layout_error(other, len(paths), layout)


def read_ids(
    src: str | Path | bytes,
    expected_size: tuple[int, int] | None = None,
    name: str | None = None,
    image_name: str | None = None,
    layout: str = layouts.UNMARKED,
) -> Image.Image:
    """Read a label map as a mode ``L`` image of ids: trainIds (0-18, 255 = ignore) or box layout ids.

    Args:
        src: a PNG path or its bytes. Masks (``layout="seg"``): a label-id mask (mode L), a palette image (mode P,
            index = trainId, any palette) or an official-palette RGB(A) rendering. Box layouts (``"boxes"``): a
            marked layout PNG (mode P or L, index = id).
        expected_size: (width, height) the map must have, e.g. its image's size.
        name: the file's name in messages (default: the path, or ``<bytes>``).
        image_name: the image it belongs to, named in the size error.
        layout: a name of vocab/layouts.py's table; a file of another layout is refused.

    Raises:
        UserError: unreadable file, unsupported mode, a file of another layout, RGB colours outside the palette,
            values outside the layout's ids, size different from ``expected_size``.
    """
    spec = layouts.get(layout)
    what = spec.one
    name = name or (str(src) if not isinstance(src, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            found = layouts.of_image(im)
            if found is not spec:
                raise UserError(layouts.mismatch(name, found, spec))
            im.load()
            mode, size = im.mode, im.size
            if mode in ("L", "P", "I;16", "I"):
                arr = np.asarray(im)  # P: the indices, not the palette's colours
            elif mode in ("RGB", "RGBA") and spec.rgb_to_ids is not None:
                arr = np.asarray(im.convert("RGB"))
            else:
                arr = None
    except FileNotFoundError:
        raise UserError(f"{what} not found: {name}") from None
    except OSError as exc:  # includes PIL's UnidentifiedImageError
        raise UserError(f"cannot read {what} {name}: {exc}") from None

    if arr is None:
        raise UserError(f"{what} {name} is mode {mode}; expected {spec.file_forms}")
    if expected_size is not None and size != tuple(expected_size):
        of = f"its image {image_name}" if image_name else "its image"
        raise UserError(
            f"{what} {name} is {size[0]}x{size[1]} but {of} is {expected_size[0]}x{expected_size[1]}; a {what} "
            "must have its image's size (pair masks and images from the same BDD100K split)"
        )
    if arr.ndim == 3:
        arr = _palette_ids(spec, arr, name, mode)
    elif arr.dtype != np.uint8:  # 16/32-bit grey PNGs: the same ids, wider type
        if arr.min() < 0:
            raise UserError(f"{what} {name} has negative values; expected {spec.ids_text}")
        spec.check_ids(arr, name)
        arr = arr.astype(np.uint8)
    else:
        spec.check_ids(arr, name)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))


def _palette_ids(spec: layouts.LayoutSpec, rgb: np.ndarray, name: str, mode: str) -> np.ndarray:
    """Palette RGB -> ids; any other colour means the file is not what the user thinks it is."""
    try:
        return spec.rgb_to_ids(rgb, name)
    except UserError as exc:
        grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        hint = (
            "it looks like label ids saved as grey RGB: save it as a one-channel PNG (mode L)"
            if grey
            else f"use the label-id {spec.short} ({spec.source}, mode L) or the colormaps (mode P)"
        )
        raise UserError(
            f"{spec.one} {name} is {mode} and not an official BDD100K palette rendering ({exc}); label ids were "
            f"expected ({spec.ids_text}): {hint}"
        ) from None


def ids_to_tensor(ids, kind: str, layout: str = layouts.UNMARKED):
    """Label ids (PIL ``L`` image or uint8 HxW array) -> float32 (C, H, W) in [0, 1]: the ControlNet's input.

    palette: the layout's colours / 255 (seg: the official palette; boxes: :data:`vocab.box_layout.BOX_PALETTE`,
    outlines white), the "nothing" id 255 black; one_hot: one channel per id (seg 19, boxes 11), 255 all zeros.
    """
    import torch

    return torch.from_numpy(layouts.encode(ids, layout, kind))


def blank_condition(kind: str, height: int, width: int, layout: str = layouts.UNMARKED):
    """The "no condition" input: zeros (C, H, W), what an all-ignore mask (an empty box layout) also gives."""
    import torch

    return torch.zeros(channels_for(kind, layout), height, width, dtype=torch.float32)


def ids_to_preview(ids, layout: str = layouts.UNMARKED) -> Image.Image:
    """An RGB rendering of label ids for people: the palette of ``layout`` (ignore / background black)."""
    return layouts.get(layout).preview(ids)


def side_by_side(mask_preview: Image.Image, generated: Image.Image) -> Image.Image:
    """One sheet: the mask preview | the generated image, the preview scaled (nearest) to the image's height."""
    height = generated.height
    if mask_preview.height != height:
        width = max(1, round(mask_preview.width * height / mask_preview.height))
        mask_preview = mask_preview.resize((width, height), Image.Resampling.NEAREST)
    sheet = Image.new("RGB", (mask_preview.width + generated.width, height))
    sheet.paste(mask_preview.convert("RGB"), (0, 0))
    sheet.paste(generated.convert("RGB"), (mask_preview.width, 0))
    return sheet


# ---------------------------------------------------------------------------------------------------------------
# Resizing label ids (inference: each mask to its output size)
# ---------------------------------------------------------------------------------------------------------------


def resize_ids(ids, size: tuple[int, int]):
    """Label ids to (width, height), nearest neighbour only: no pixel gets a class the mask does not have."""
    return ids if ids.size == tuple(size) else ids.resize(size, Image.Resampling.NEAREST)
