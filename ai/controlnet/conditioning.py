"""ControlNet conditioning from BDD100K segmentation label maps, shared by ControlNet training and inference.

A label map (trainIds 0-18, 255 = ignore) becomes the ControlNet's input in one of two forms:

* ``palette``: the official BDD100K palette as RGB in [0, 1] (3 channels, the form most ControlNets use);
* ``one_hot``: one channel per class (19 channels): no two classes can be confused by colour.

The ignore value 255 is explicit in both: black in the palette form, all-zero in the one-hot form, so "no class
here" and "no condition at all" (:func:`blank_condition`, zeros everywhere) read the same to the network.

Masks are read as label ids (mode ``L``), palette images (mode ``P``: the palette *index* is the trainId, whatever
the palette holds: the official colours of the colormaps, the grey identity palette of some toolkit masks, any
other) or official-palette RGB renderings (stage 1's ``--palette_rgb``, mapped back by colour); anything else is a
clear error naming the file. A P image is never converted to RGB or luminance: a palette that is not the official
one (or the official colours at other indices) would give other ids. Resizing is left to the
caller and must be nearest-neighbour (training: ai/common/data.py's crop plan; inference: before
:func:`ids_to_tensor`), so no pixel ever gets a class that is not in the mask.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from ai.common.cli import UserError
from convert import bdd

ConditioningKind = Literal["palette", "one_hot"]
CONDITIONING_KINDS: tuple[str, ...] = ("palette", "one_hot")
_CHANNELS = {"palette": 3, "one_hot": bdd.NUM_SEG_CLASSES}


def channels_for(kind: str) -> int:
    """Input channels of a ControlNet for ``kind``: palette -> 3, one_hot -> 19."""
    try:
        return _CHANNELS[kind]
    except KeyError:
        raise UserError(
            f"unknown conditioning kind {kind!r}; use one of {', '.join(CONDITIONING_KINDS)}"
        ) from None


def kind_for_channels(channels: int, source: str | os.PathLike = "the ControlNet") -> str:
    """The conditioning kind a ControlNet with ``channels`` input channels takes (3 -> palette, 19 -> one_hot)."""
    for kind, n in _CHANNELS.items():
        if n == channels:
            return kind
    raise UserError(
        f"{source} has conditioning_channels={channels}; BDD100K label maps give 3 (palette) or "
        f"{bdd.NUM_SEG_CLASSES} (one_hot) channels"
    )


def read_ids(
    src: str | Path | bytes,
    expected_size: tuple[int, int] | None = None,
    name: str | None = None,
    image_name: str | None = None,
) -> Image.Image:
    """Read a segmentation mask as a mode ``L`` image of trainIds (0-18, 255 = ignore).

    Args:
        src: a PNG path or its bytes: a label-id mask (mode L), a palette image (mode P, index = trainId, any
            palette) or an official-palette RGB(A) rendering.
        expected_size: (width, height) the mask must have, e.g. its image's size.
        name: the mask's name in messages (default: the path, or ``<bytes>``).
        image_name: the image it belongs to, named in the size error.

    Raises:
        UserError: unreadable file, unsupported mode, RGB colours outside the palette, values outside 0-18/255,
            size different from ``expected_size``.
    """
    name = name or (str(src) if not isinstance(src, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode in ("L", "P", "I;16", "I"):
                arr = np.asarray(im)  # P: the indices, not the palette's colours
            elif mode in ("RGB", "RGBA"):
                arr = np.asarray(im.convert("RGB"))
            else:
                arr = None
    except FileNotFoundError:
        raise UserError(f"mask not found: {name}") from None
    except OSError as exc:  # includes PIL's UnidentifiedImageError
        raise UserError(f"cannot read mask {name}: {exc}") from None

    if arr is None:
        raise UserError(
            f"mask {name} is mode {mode}; expected a label-id PNG (mode L, values 0-{bdd.NUM_SEG_CLASSES - 1} "
            f"and {bdd.SEG_IGNORE_ID}), a colormap (mode P) or an official-palette RGB rendering"
        )
    if expected_size is not None and size != tuple(expected_size):
        of = f"its image {image_name}" if image_name else "its image"
        raise UserError(
            f"mask {name} is {size[0]}x{size[1]} but {of} is {expected_size[0]}x{expected_size[1]}; a mask must "
            "have its image's size (pair masks and images from the same BDD100K split)"
        )
    if arr.ndim == 3:
        arr = _palette_ids(arr, name, mode)
    elif arr.dtype != np.uint8:  # 16/32-bit grey PNGs: the same ids, wider type
        if arr.min() < 0:
            raise UserError(f"mask {name} has negative values; expected trainIds 0-18 and 255")
        bdd.check_label_ids(arr, name)
        arr = arr.astype(np.uint8)
    else:
        bdd.check_label_ids(arr, name)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))


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


def ids_to_tensor(ids, kind: str):
    """Label ids (PIL ``L`` image or uint8 HxW array) -> float32 (C, H, W) in [0, 1].

    palette: the official palette RGB / 255, ignore (255) black; one_hot: 19 channels, ignore all zeros.
    """
    import torch

    arr = _ids_array(ids)
    channels_for(kind)  # unknown kind -> clear error
    bdd.check_label_ids(arr)
    if kind == "palette":
        rgb = bdd.ids_to_palette_rgb(arr).astype(np.float32) / 255.0
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    classes = np.arange(bdd.NUM_SEG_CLASSES, dtype=np.uint8)[:, None, None]
    return torch.from_numpy((arr[None] == classes).astype(np.float32))


def blank_condition(kind: str, height: int, width: int):
    """The "no condition" input: zeros (C, H, W), what an all-ignore mask also gives."""
    import torch

    return torch.zeros(channels_for(kind), height, width, dtype=torch.float32)


def ids_to_preview(ids) -> Image.Image:
    """An RGB palette rendering of label ids for people (ignore = black)."""
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
