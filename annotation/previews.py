"""Review images: each image with its boxes, class names and confidences, and a contact sheet of a run's batch.

Drawn with PIL and matplotlib's DejaVuSans (bundled), so no font lookup ever goes online. Labels are drawn thick
with their class and confidence ("layout" for a label from the layout alone): by provenance for an image with a
source layout (green confirmed, orange layout-only, magenta detector-only; disagreements that became no label
thin, a legend with the counts at the bottom), else in their class's BDD100K palette colour. Detections under the
confidence threshold are thin and grey. A banner says accepted/split or why rejected, and where labels came from.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from annotation.yolo_runtime import dejavu_font
from core.io import atomic_write_bytes
from vocab import bdd

CLASS_RGB: dict[str, tuple[int, int, int]] = {
    name: bdd.SEG_CLASSES[seg_id].rgb for name, seg_id in bdd.DET_CLASS_TO_SEG_ID.items()
}
ACCEPT_RGB, REJECT_RGB = (40, 170, 60), (210, 40, 40)
#: box colours of an image with a layout, by provenance (annotation/consensus.py)
PROVENANCE_RGB: dict[str, tuple[int, int, int]] = {
    "confirmed": (20, 160, 70),
    "layout_only": (235, 140, 0),
    "detector_only": (200, 40, 200),
}


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(dejavu_font()), size)


def draw_preview(
    record: dict[str, Any],
    min_confidence: float,
    max_side: int,
) -> Image.Image:
    """The image with its labels (thick, captioned) and the boxes that are no label (thin).

    An image with a layout is coloured by provenance (:data:`PROVENANCE_RGB`: confirmed, layout-only,
    detector-only, with a legend); one without by class.
    """
    with Image.open(record["source"]) as im:
        image = im.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, round(image.height / 36)))
    width = max(1, round(image.height / 240))
    provenance = record.get("provenance")
    in_pairs = {tuple(b["detector_xyxy"]) for b in provenance or () if b["detector_xyxy"] is not None}
    for d in record["detections"]:  # near-misses: returned by the detector, no label, no part of a pair
        if d["confidence"] < min_confidence and tuple(d["box_xyxy"]) not in in_pairs:
            draw.rectangle([v * scale for v in d["box_xyxy"]], outline=(150, 150, 150), width=1)
    for b in provenance or ():  # disagreements handled by dropping them (and unlabelled pairs): thin
        if not b.get("label"):
            box = b["layout_xyxy"] if b["layout_xyxy"] is not None else b["detector_xyxy"]
            draw.rectangle([v * scale for v in box], outline=PROVENANCE_RGB[b["provenance"]], width=1)
    labels = record.get("labels") or []
    for label in sorted(labels, key=lambda x: -1.0 if x["confidence"] is None else x["confidence"]):
        box = [v * scale for v in label["box_xyxy"]]
        colour = PROVENANCE_RGB.get(label["provenance"]) or CLASS_RGB[label["class"]]
        draw.rectangle(box, outline=colour, width=width + 1)
        conf = "layout" if label["confidence"] is None else f"{label['confidence']:.2f}"
        text = f"{label['class']} {conf}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        y = box[1] - bottom - 2 if box[1] - bottom - 2 >= 0 else box[1]  # above the box, else inside it
        x = max(0, min(box[0], image.width - (right - left) - 4))  # keep the caption inside the image
        draw.rectangle([x, y, x + right - left + 4, y + bottom + 2], fill=colour)
        draw.text((x + 2, y), text, fill=(255, 255, 255), font=font)
    _banner(draw, image.width, record, font)
    if provenance is not None:
        _legend(draw, image.height, record, font)
    return image


def _banner(draw: ImageDraw.ImageDraw, width: int, record: dict[str, Any], font) -> None:
    if record.get("status") == "accepted":
        text, colour = f"accepted ({record.get('split')})", ACCEPT_RGB
    else:
        text, colour = "rejected: " + ", ".join(record.get("reasons") or ["?"]), REJECT_RGB
    layout = record.get("layout")
    if layout:
        text += f"  layout R={layout['recall']:.2f} P={layout['precision']:.2f}"
    if record.get("labels_source"):
        text += f"  labels: {record['labels_source']}"
    box = draw.textbbox((0, 0), text, font=font)
    draw.rectangle([0, 0, min(width, box[2] + 8), box[3] + 6], fill=colour)
    draw.text((4, 2), text, fill=(255, 255, 255), font=font)


def _legend(draw: ImageDraw.ImageDraw, height: int, record: dict[str, Any], font) -> None:
    """Bottom-left chips: how many boxes of each provenance, in their colours (thick: label, thin: dropped)."""
    counts = {p: 0 for p in PROVENANCE_RGB}
    for b in record.get("provenance") or ():
        counts[b["provenance"]] += 1
    x = 0
    for name, colour in PROVENANCE_RGB.items():
        text = f"{name.replace('_', '-')} {counts[name]}"
        box = draw.textbbox((0, 0), text, font=font)
        y = height - box[3] - 6
        draw.rectangle([x, y, x + box[2] + 8, height], fill=colour)
        draw.text((x + 4, y + 2), text, fill=(255, 255, 255), font=font)
        x += box[2] + 10


def save_jpeg(image: Image.Image, path: Path, quality: int = 88) -> None:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    atomic_write_bytes(path, buf.getvalue())


def contact_sheet(previews: Sequence[tuple[Path, dict[str, Any]]], thumb: int) -> Image.Image:
    """A grid of preview thumbnails, framed green (accepted) or red (rejected), captioned with the key."""
    cols = max(1, math.ceil(math.sqrt(len(previews))))
    rows = math.ceil(len(previews) / cols)
    cell_h = thumb * 9 // 16 + 22
    sheet = Image.new("RGB", (cols * (thumb + 6), rows * (cell_h + 6)), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for i, (path, record) in enumerate(previews):
        x, y = (i % cols) * (thumb + 6) + 3, (i // cols) * (cell_h + 6) + 3
        with Image.open(path) as im:
            tile = im.convert("RGB")
        tile.thumbnail((thumb, cell_h - 22))
        colour = ACCEPT_RGB if record.get("status") == "accepted" else REJECT_RGB
        draw.rectangle([x - 2, y - 2, x + thumb + 1, y + cell_h + 1], outline=colour, width=2)
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y))
        draw.text((x + 2, y + cell_h - 18), record["key"][-40:], fill=(230, 230, 230), font=font)
    return sheet
