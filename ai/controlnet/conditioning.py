"""ControlNet conditioning from BDD100K label maps (segmentation masks or box layouts), shared by ControlNet
training and inference.

Two layouts (``layout``), each in two encodings (``kind``):

* ``seg``: segmentation trainIds (0-18, 255 = ignore), the 10K subset's masks;
* ``boxes``: box layouts (vocab/box_layout.py: detection classes 0-9, outline 10, background 255), rendered
  from the det_20 boxes of any labeled frame.

* ``palette``: colours as RGB in [0, 1] (3 channels, the form most ControlNets use): the official BDD100K
  palette for masks, :data:`vocab.box_layout.BOX_PALETTE` for box layouts;
* ``one_hot``: one channel per id (19 for masks; 11 for box layouts: 10 classes and the outlines): no two ids
  can be confused by colour.

The "nothing here" id (255: ignore, background) is explicit in both: black in the palette form, all-zero in the
one-hot form, so "no class here" and "no condition at all" (:func:`blank_condition`, zeros everywhere) read the
same to the network.

The ids of the two layouts overlap numerically (a box layout's 2 = car, a mask's 2 = building), so a file's
layout is never guessed from its pixels: box layout PNGs carry a ``bdd_layout=boxes`` text chunk
(:func:`vocab.box_layout.file_layout`, header only), :func:`read_ids` refuses a file of the other layout, and a
trained ControlNet records its layout (ai/controlnet/architecture.py).

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
from typing import Literal

import numpy as np
from PIL import Image

from ai.controlnet.architecture import LAYOUT_SOURCES as LAYOUT_NAMES  # what each layout is, in messages
from core.cli import UserError
from vocab import bdd, box_layout

ConditioningKind = Literal["palette", "one_hot"]
CONDITIONING_KINDS: tuple[str, ...] = ("palette", "one_hot")
Layout = Literal["seg", "boxes"]
LAYOUTS: tuple[str, ...] = ("seg", "boxes")
_CHANNELS = {
    "seg": {"palette": 3, "one_hot": bdd.NUM_SEG_CLASSES},
    "boxes": {"palette": 3, "one_hot": box_layout.NUM_ONE_HOT_CHANNELS},
}


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return layout


def channels_for(kind: str, layout: str = "seg") -> int:
    """Input channels of a ControlNet for ``kind``: palette -> 3; one_hot -> 19 (seg) or 11 (boxes)."""
    try:
        return _CHANNELS[_check_layout(layout)][kind]
    except KeyError:
        raise UserError(
            f"unknown conditioning kind {kind!r}; use one of {', '.join(CONDITIONING_KINDS)}"
        ) from None


def kind_for_channels(
    channels: int, source: str | os.PathLike = "the ControlNet", layout: str = "seg"
) -> str:
    """The conditioning kind a ControlNet with ``channels`` input channels takes (3 -> palette, 19 or 11 ->
    one_hot for masks or box layouts)."""
    for kind, n in _CHANNELS[_check_layout(layout)].items():
        if n == channels:
            return kind
    what = "BDD100K label maps" if layout == "seg" else "box layouts"
    raise UserError(
        f"{source} has conditioning_channels={channels}; {what} give 3 (palette) or "
        f"{_CHANNELS[layout]['one_hot']} (one_hot) channels"
    )


def file_layout(src: str | Path | bytes) -> str:
    """``boxes`` for a marked box layout PNG, ``seg`` for anything else; reads the header only."""
    return box_layout.file_layout(src)


def image_layout(im: Image.Image) -> str:
    """``boxes`` for an opened image marked as a box layout, ``seg`` for anything else (:func:`file_layout` where
    the file is open anyway, for its size or pixels)."""
    return "boxes" if im.info.get(box_layout.MARKER_KEY) == box_layout.MARKER_VALUE else "seg"


def layout_mismatch(name: str, found: str, expected: str) -> str:
    """The message for a condition file of the other layout."""
    if found == "boxes":
        return (
            f"{name} is a box layout (its PNG says bdd_layout=boxes; vocab/box_layout.py), but {LAYOUT_NAMES[expected]} "
            "were expected: the ids of the two overlap (2 is a car in a box layout, a building in a mask), so "
            "a box layout is never read as a mask; use a box-layout ControlNet (layout boxes) or segmentation masks"
        )
    return (
        f"{name} is not a box layout (no bdd_layout=boxes marker in the PNG: a segmentation mask or another "
        "label map), but box layouts were expected; render them with convert/controlnet_bdd_to_huggingface_csv.py "
        "--conditions boxes (or vocab.box_layout.save_layout), or use a ControlNet trained on masks (layout seg)"
    )


def training_layout_error(other: list[str], total: int, layout: str, limit: int = 10) -> UserError:
    """Training rows whose condition files are of the other layout than ``controlnet.layout``."""
    found = "boxes" if layout == "seg" else "seg"
    more = f" (and {len(other) - limit} more)" if len(other) > limit else ""
    hint = (
        "set controlnet.layout=boxes to train on box layouts"
        if found == "boxes"
        else "point data.train_csv at a box-layout CSV (convert/controlnet_bdd_to_huggingface_csv.py "
        "--conditions boxes writes bdd_hf_dataset_controlnet_boxes_<type>.csv), or set controlnet.layout=seg"
    )
    return UserError(
        f"{len(other)} of {total} conditioning image(s) are {LAYOUT_NAMES[found]} (by their PNG marker), but "
        f"controlnet.layout={layout} trains on {LAYOUT_NAMES[layout]}{more}: "
        + ", ".join(other[:limit])
        + f"; {hint}. The ids of the two overlap, so one is never read as the other"
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
            if file_layout(path) != layout:
                other.append(str(path))
        except OSError:
            continue  # missing or unreadable files are reported with their rows
    if other:
        raise training_layout_error(other, len(paths), layout)


def read_ids(
    src: str | Path | bytes,
    expected_size: tuple[int, int] | None = None,
    name: str | None = None,
    image_name: str | None = None,
    layout: str = "seg",
) -> Image.Image:
    """Read a label map as a mode ``L`` image of ids: trainIds (0-18, 255 = ignore) or box layout ids.

    Args:
        src: a PNG path or its bytes. Masks (``layout="seg"``): a label-id mask (mode L), a palette image (mode P,
            index = trainId, any palette) or an official-palette RGB(A) rendering. Box layouts (``"boxes"``): a
            marked layout PNG (mode P or L, index = id).
        expected_size: (width, height) the map must have, e.g. its image's size.
        name: the file's name in messages (default: the path, or ``<bytes>``).
        image_name: the image it belongs to, named in the size error.
        layout: ``seg`` or ``boxes``; a file of the other layout is refused.

    Raises:
        UserError: unreadable file, unsupported mode, a file of the other layout, RGB colours outside the palette,
            values outside the layout's ids, size different from ``expected_size``.
    """
    what = "mask" if _check_layout(layout) == "seg" else "box layout"
    name = name or (str(src) if not isinstance(src, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            found = image_layout(im)
            if found != layout:
                raise UserError(layout_mismatch(name, found, layout))
            im.load()
            mode, size = im.mode, im.size
            if mode in ("L", "P", "I;16", "I"):
                arr = np.asarray(im)  # P: the indices, not the palette's colours
            elif mode in ("RGB", "RGBA") and layout == "seg":
                arr = np.asarray(im.convert("RGB"))
            else:
                arr = None
    except FileNotFoundError:
        raise UserError(f"{what} not found: {name}") from None
    except OSError as exc:  # includes PIL's UnidentifiedImageError
        raise UserError(f"cannot read {what} {name}: {exc}") from None

    if arr is None:
        expected = (
            f"a label-id PNG (mode L, values 0-{bdd.NUM_SEG_CLASSES - 1} and {bdd.SEG_IGNORE_ID}), a colormap "
            "(mode P) or an official-palette RGB rendering"
            if layout == "seg"
            else "a box layout PNG (mode P or L, as vocab/box_layout.py writes)"
        )
        raise UserError(f"{what} {name} is mode {mode}; expected {expected}")
    if expected_size is not None and size != tuple(expected_size):
        of = f"its image {image_name}" if image_name else "its image"
        raise UserError(
            f"{what} {name} is {size[0]}x{size[1]} but {of} is {expected_size[0]}x{expected_size[1]}; a {what} "
            "must have its image's size (pair masks and images from the same BDD100K split)"
        )
    check = _check_ids(layout)
    if arr.ndim == 3:
        arr = _palette_ids(arr, name, mode)
    elif arr.dtype != np.uint8:  # 16/32-bit grey PNGs: the same ids, wider type
        if arr.min() < 0:
            raise UserError(f"mask {name} has negative values; expected trainIds 0-18 and 255")
        check(arr, name)
        arr = arr.astype(np.uint8)
    else:
        check(arr, name)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))


def _check_ids(layout: str):
    return bdd.check_label_ids if layout == "seg" else box_layout.check_layout_ids


def _palette_ids(rgb: np.ndarray, name: str, mode: str) -> np.ndarray:
    """Official-palette RGB -> ids; any other colour means the file is not what the user thinks it is."""
    try:
        return bdd.palette_rgb_to_ids(rgb, name)
    except UserError as exc:
        grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        hint = (
            "it looks like label ids saved as grey RGB: save it as a one-channel PNG (mode L)"
            if grey
            else "use the label-id masks (labels/sem_seg/masks, mode L) or the colormaps (mode P)"
        )
        raise UserError(
            f"mask {name} is {mode} and not an official BDD100K palette rendering ({exc}); label ids were "
            f"expected (trainIds 0-{bdd.NUM_SEG_CLASSES - 1}, {bdd.SEG_IGNORE_ID} = ignore): {hint}"
        ) from None


def _ids_array(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 2:
        raise ValueError(f"label ids must be HxW, got shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def ids_to_tensor(ids, kind: str, layout: str = "seg"):
    """Label ids (PIL ``L`` image or uint8 HxW array) -> float32 (C, H, W) in [0, 1]: the ControlNet's input.

    seg: palette = the official palette RGB / 255, ignore (255) black; one_hot = 19 channels, ignore all zeros.
    boxes: palette = :data:`vocab.box_layout.BOX_PALETTE` / 255 (outlines white, background black); one_hot =
    11 channels (classes 0-9, outline 10), background all zeros.
    """
    import torch

    arr = _ids_array(ids)
    channels = channels_for(kind, layout)  # unknown kind or layout -> clear error
    _check_ids(layout)(arr)
    if kind == "palette":
        lut = bdd.ids_to_palette_rgb if layout == "seg" else box_layout.layout_to_palette_rgb
        rgb = lut(arr).astype(np.float32) / 255.0
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    classes = np.arange(channels, dtype=np.uint8)[:, None, None]
    return torch.from_numpy((arr[None] == classes).astype(np.float32))


def blank_condition(kind: str, height: int, width: int, layout: str = "seg"):
    """The "no condition" input: zeros (C, H, W), what an all-ignore mask (an empty box layout) also gives."""
    import torch

    return torch.zeros(channels_for(kind, layout), height, width, dtype=torch.float32)


def ids_to_preview(ids, layout: str = "seg") -> Image.Image:
    """An RGB rendering of label ids for people: the palette of ``layout`` (ignore / background black)."""
    if _check_layout(layout) == "boxes":
        return box_layout.layout_to_preview(_ids_array(ids))
    return Image.fromarray(bdd.ids_to_palette_rgb(_ids_array(ids)))


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
