"""Conditioning layouts: the kinds of label map a ControlNet can be asked to follow, in one table.

A layout is a map of ids, one per pixel, that says where which things are: BDD100K's segmentation masks (``seg``:
Cityscapes' 19 trainIds, 255 = ignore) or a frame's det_20 boxes drawn as a box layout (``boxes``: detection classes
0-9, outline 10, background 255; vocab/box_layout.py draws them). Every stage asks :data:`LAYOUTS` what it needs to
know about one (:class:`LayoutSpec`): its ids and their check, its colours (the ``palette`` encoding and previews),
its one-hot channels, how its files are marked, what a trained ControlNet records, where its files come from, and,
for a layout drawn from labels, its renderer. No code outside this module branches on a layout's name.

Files: the ids of different layouts overlap (2 is a building in a mask and a car in a box layout), so a file's layout
is never guessed from its pixels. Every layout but one marks its PNGs with a text chunk (``bdd_layout=boxes``, read
from the header by :func:`of_file`); an unmarked file is of :data:`UNMARKED` (``seg``: the masks BDD100K ships), and
so is a ControlNet whose config.json records no layout. Rendered files (:func:`png_bytes`) are mode ``P`` PNGs whose
palette *index* is the id, so viewers show the layout's colours.

To add a layout (depth bins, lanes, ...): write its renderer beside vocab/box_layout.py (or point at its files), add
one :class:`LayoutSpec` to :data:`LAYOUTS`; training, generation, stage 1's ControlNet CSV and the fidelity report
then take it by name.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, PngImagePlugin

from core.cli import UserError
from core.io import atomic_write_bytes
from vocab import bdd, box_layout

#: PNG text chunks of a marked layout file: its layout, the renderer's version, the key of what it was drawn from.
MARKER_KEY, VERSION_KEY, SOURCE_KEY = "bdd_layout", "bdd_layout_version", "bdd_layout_key"


class Drawing(Protocol):
    """What a renderer makes of one frame's labels: the ids, a key (equal keys draw equal layouts, so a rerun keeps
    a file whose key matches without decoding it), and how many objects were drawn or lay outside the frame."""

    key: str
    drawn: int
    left_out: int

    def ids(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Renderer:
    """Draws a layout from a frame's labels (det_20 ``Label`` objects or dicts, in the pixels of ``size``)."""

    draw: Callable[[Sequence[Any], tuple[int, int]], Drawing]
    version: str  # written into each file; a new version redraws every file
    objects: tuple[str, str]  # what it draws, one and many, in summaries: ("box", "boxes")
    folder: str  # stage 1 writes the files to <output_folder>/<folder>/<split>/


@dataclass(frozen=True, eq=False)  # one object per layout: compared and hashed by identity
class LayoutSpec:
    name: str  # controlnet.layout, the CSV script's --layout, every record
    what: str  # plural, in messages: "segmentation masks"
    one: str  # one file, in messages: "mask"
    short: str  # a ControlNet "trained on masks"
    ids_text: str  # the valid ids, in messages
    ids_are: str  # what the ids mean, in messages ("detection classes")
    example_id: str  # why the ids of two layouts must never meet ("2 is a building in a mask")
    one_hot_channels: int  # the one_hot encoding: one channel per id (the "nothing" id all zeros)
    palette: np.ndarray  # (256, 3) uint8: id -> colour (the palette encoding, previews, file palettes)
    check_ids: Callable[[np.ndarray, str | os.PathLike], None]
    file_forms: str  # what files of it may look like, in messages
    source: str  # where files of it come from, in messages
    csv_stem: str  # stage 1 writes bdd_hf_dataset_<csv_stem>_<split>.csv and unmatched_<csv_stem>_<split>.txt
    marker: str | None = None  # the MARKER_KEY value of its files (None: unmarked, the UNMARKED layout)
    rgb_to_ids: Callable[[np.ndarray, str], np.ndarray] | None = (
        None  # RGB renderings of the palette, read back
    )
    cityscapes_ids: bool = (
        False  # its ids are Cityscapes trainIds: a segmentation model's prediction scores them
    )
    renderer: Renderer | None = None  # drawn from labels here (None: its files come ready, read by ``read``)
    read: Callable[..., np.ndarray] | None = None  # (path, expected_size=None) -> checked ids, of ready files
    record: Mapping[str, Any] = field(
        default_factory=dict
    )  # what a trained ControlNet records besides the layout

    @property
    def marker_text(self) -> str:
        return f"{MARKER_KEY}={self.marker}"

    @property
    def a_one(self) -> str:
        return f"{'an' if self.one[0] in 'aeiou' else 'a'} {self.one}"

    def channels(self, kind: str) -> int:
        """Input channels of a ControlNet taking this layout as ``kind`` (palette: 3 colours; one_hot)."""
        if kind not in ENCODINGS:
            raise UserError(f"unknown conditioning kind {kind!r}; use one of {', '.join(ENCODINGS)}")
        return 3 if kind == "palette" else self.one_hot_channels

    def preview(self, ids) -> Image.Image:
        """An RGB rendering of ids for people (sheets): the layout's colours, its "nothing" id black."""
        arr = np.asarray(ids)
        if arr.ndim != 2:
            raise ValueError(f"layout ids must be HxW, got shape {arr.shape}")
        return Image.fromarray(self.palette[arr.astype(np.uint8, copy=False)])


#: How a ControlNet takes a layout: its colours (3 channels, what most ControlNets use) or one channel per id.
ENCODINGS: tuple[str, ...] = ("palette", "one_hot")
Encoding = Literal[ENCODINGS]


def _seg_palette() -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)
    for c in bdd.SEG_CLASSES:
        lut[c.train_id] = c.rgb
    return lut


LAYOUTS: dict[str, LayoutSpec] = {
    spec.name: spec
    for spec in (
        LayoutSpec(
            name="seg",
            what="segmentation masks",
            one="mask",
            short="masks",
            ids_text=f"trainIds 0-{bdd.NUM_SEG_CLASSES - 1}, {bdd.SEG_IGNORE_ID} = ignore",
            ids_are="Cityscapes' 19 trainIds",
            example_id="a building in a mask",
            one_hot_channels=bdd.NUM_SEG_CLASSES,
            palette=_seg_palette(),
            check_ids=bdd.check_label_ids,
            file_forms=f"a label-id PNG (mode L, values 0-{bdd.NUM_SEG_CLASSES - 1} and {bdd.SEG_IGNORE_ID}), a "
            "colormap (mode P) or an official-palette RGB rendering",
            source="labels/sem_seg/masks/<split>",
            csv_stem="controlnet",
            rgb_to_ids=bdd.palette_rgb_to_ids,
            cityscapes_ids=True,
            read=bdd.read_label_mask,
        ),
        LayoutSpec(
            name="boxes",
            what="box layouts",
            one="box layout",
            short="box layouts",
            ids_text=f"layout ids 0-{box_layout.NUM_BOX_CLASSES - 1} (classes), {box_layout.BOUNDARY_ID} = outline, "
            f"{box_layout.BACKGROUND_ID} = background",
            ids_are="detection classes",
            example_id="a car in a box layout",
            one_hot_channels=box_layout.NUM_ONE_HOT_CHANNELS,
            palette=box_layout.BOX_PALETTE,
            check_ids=box_layout.check_layout_ids,
            file_forms="a box layout PNG (mode P or L, as vocab/box_layout.py draws and vocab/layouts.py writes)",
            source="convert/controlnet_bdd_to_huggingface_csv.py --layout boxes writes them to "
            "<output_folder>/box_layouts/<split>/",
            csv_stem="controlnet_boxes",
            marker="boxes",
            renderer=Renderer(box_layout.prepare, box_layout.RENDER_VERSION, ("box", "boxes"), "box_layouts"),
            record={
                "classes": list(box_layout.BOX_CLASSES),
                "ids": {"boundary": box_layout.BOUNDARY_ID, "background": box_layout.BACKGROUND_ID},
                "render_version": box_layout.RENDER_VERSION,
            },
        ),
    )
}
#: The layout names, for schemas (``Literal[NAMES]``) and flags.
NAMES: tuple[str, ...] = tuple(LAYOUTS)
LayoutName = Literal[NAMES]
#: The layout of unmarked files and of ControlNets that record none: the masks BDD100K ships.
UNMARKED = next(spec.name for spec in LAYOUTS.values() if spec.marker is None)
_BY_MARKER = {spec.marker: spec for spec in LAYOUTS.values() if spec.marker is not None}


def get(name: str) -> LayoutSpec:
    """The spec of ``name``; an unknown name is a clear error listing the known ones."""
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown layout {name!r}; use one of {', '.join(NAMES)}") from None


def of_info(info: Mapping[str, Any]) -> LayoutSpec:
    """The layout a PNG's text chunks mark (none, or a marker no layout has: :data:`UNMARKED`)."""
    return _BY_MARKER.get(info.get(MARKER_KEY), LAYOUTS[UNMARKED])


def of_image(im: Image.Image) -> LayoutSpec:
    """The layout of an opened image (its header's marker), where the file is open anyway for its size or pixels."""
    return of_info(im.info)


def of_file(src: str | os.PathLike | bytes) -> LayoutSpec:
    """The layout of a file from its header alone (no pixels decoded)."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        return of_info(im.info)


def mismatch(name: str, found: LayoutSpec, expected: LayoutSpec) -> str:
    """The message for a file of ``found``'s layout where ``expected``'s was asked for."""
    if found.marker is not None:
        what = f"{found.a_one} (its PNG says {found.marker_text})"
    else:
        what = f"not {expected.a_one} (no {expected.marker_text} marker in the PNG: {found.a_one} or another label map)"
    return (
        f"{name} is {what}, but {expected.what} were expected: the ids of layouts overlap (2 is "
        f"{found.example_id}, {expected.example_id}), so one is never read as another; use {expected.what} "
        f"({expected.source}), or a ControlNet trained on {found.what} (layout {found.name})"
    )


def encode(ids, layout: str, kind: str) -> np.ndarray:
    """Ids (PIL ``L`` image or uint8 HxW array) as a float32 (C, H, W) array in [0, 1], a ControlNet's input:
    ``palette``: the layout's colours / 255 (its "nothing" id black); ``one_hot``: one channel per id, the "nothing"
    id (255) all zeros, like a blank condition."""
    spec = get(layout)
    channels = spec.channels(kind)
    arr = np.asarray(ids)
    if arr.ndim != 2:
        raise ValueError(f"label ids must be HxW, got shape {arr.shape}")
    arr = arr.astype(np.uint8, copy=False)
    spec.check_ids(arr, "<array>")
    if kind == "palette":
        return np.ascontiguousarray((spec.palette[arr].astype(np.float32) / 255.0).transpose(2, 0, 1))
    return (arr[None] == np.arange(channels, dtype=np.uint8)[:, None, None]).astype(np.float32)


def png_bytes(ids: np.ndarray, layout: str, key: str | None = None, compress_level: int = 3) -> bytes:
    """A mode P PNG of a layout's ids (index = id, the layout's colours), marked with its layout, its renderer's
    version and (``key``) what it was drawn from."""
    spec = get(layout)
    arr = np.ascontiguousarray(ids, dtype=np.uint8)
    spec.check_ids(arr, "<array>")
    image = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
    image.putpalette(spec.palette.tobytes())
    info = PngImagePlugin.PngInfo()
    if spec.marker is not None:
        info.add_text(MARKER_KEY, spec.marker)
    if spec.renderer is not None:
        info.add_text(VERSION_KEY, spec.renderer.version)
    if key is not None:
        info.add_text(SOURCE_KEY, key)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def save_png(ids: np.ndarray, path: str | os.PathLike, layout: str, key: str | None = None) -> Path:
    """Write :func:`png_bytes` atomically; returns the path."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(ids, layout, key))
    return path
