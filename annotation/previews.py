"""Review images: each image with its boxes, class names and confidences, and a contact sheet of a run's batch.

Drawn with PIL and matplotlib's DejaVuSans (bundled), so no font lookup ever goes online. Kept detections are
drawn in their class's BDD100K palette colour, detections under the confidence threshold thin and grey, and
the source frame's boxes (when layout was checked) thin and white. A banner says accepted/split or why rejected.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ai.common.io import atomic_write_bytes
from annotation.yolo_runtime import dejavu_font
from convert import bdd

CLASS_RGB: dict[str, tuple[int, int, int]] = {
    name: bdd.SEG_CLASSES[seg_id].rgb for name, seg_id in bdd.DET_CLASS_TO_SEG_ID.items()
}
ACCEPT_RGB, REJECT_RGB = (40, 170, 60), (210, 40, 40)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(dejavu_font()), size)


def draw_preview(
    record: dict[str, Any],
    min_confidence: float,
    max_side: int,
    source_boxes: Sequence[tuple[int, Sequence[float]]] | None = None,
) -> Image.Image:
    with Image.open(record["source"]) as im:
        image = im.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, round(image.height / 36)))
    width = max(1, round(image.height / 240))
    for _cls, box in source_boxes or ():
        draw.rectangle([v * scale for v in box], outline=(255, 255, 255), width=1)
    for d in sorted(record["detections"], key=lambda d: d["confidence"]):
        box = [v * scale for v in d["box_xyxy"]]
        if d["confidence"] < min_confidence:
            draw.rectangle(box, outline=(150, 150, 150), width=1)
            continue
        colour = CLASS_RGB[d["class"]]
        draw.rectangle(box, outline=colour, width=width + 1)
        text = f"{d['class']} {d['confidence']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        y = box[1] - bottom - 2 if box[1] - bottom - 2 >= 0 else box[1]  # above the box, else inside it
        x = max(0, min(box[0], image.width - (right - left) - 4))  # keep the caption inside the image
        draw.rectangle([x, y, x + right - left + 4, y + bottom + 2], fill=colour)
        draw.text((x + 2, y), text, fill=(255, 255, 255), font=font)
    _banner(draw, image.width, record, font)
    return image


def _banner(draw: ImageDraw.ImageDraw, width: int, record: dict[str, Any], font) -> None:
    if record.get("status") == "accepted":
        text, colour = f"accepted ({record.get('split')})", ACCEPT_RGB
    else:
        text, colour = "rejected: " + ", ".join(record.get("reasons") or ["?"]), REJECT_RGB
    layout = record.get("layout")
    if layout:
        text += f"  layout R={layout['recall']:.2f} P={layout['precision']:.2f}"
    box = draw.textbbox((0, 0), text, font=font)
    draw.rectangle([0, 0, min(width, box[2] + 8), box[3] + 6], fill=colour)
    draw.text((4, 2), text, fill=(255, 255, 255), font=font)


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
