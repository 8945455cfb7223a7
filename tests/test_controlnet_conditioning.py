"""ai/controlnet/conditioning.py: label maps -> ControlNet inputs, every accepted mask form, every bad mask."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ai.controlnet import conditioning as cond
from core.cli import UserError
from vocab import bdd, layouts

ROAD, CAR, IGNORE = bdd.SEG_ID["road"], bdd.SEG_ID["car"], bdd.SEG_IGNORE_ID


def three_class_ids() -> np.ndarray:
    """A 4x6 map: road on the left, a car block, ignore on the bottom row."""
    ids = np.full((4, 6), ROAD, dtype=np.uint8)
    ids[0:3, 3:6] = CAR
    ids[3, :] = IGNORE
    return ids


def save(path: Path, im: Image.Image) -> Path:
    im.save(path)
    return path


def test_channels_and_kinds():
    assert cond.channels_for("palette") == 3
    assert cond.channels_for("one_hot") == bdd.NUM_SEG_CLASSES == 19
    assert cond.kind_for_channels(3) == "palette" and cond.kind_for_channels(19) == "one_hot"
    with pytest.raises(UserError, match="unknown conditioning kind 'rgb'; use one of palette, one_hot"):
        cond.channels_for("rgb")
    with pytest.raises(UserError, match="cn has conditioning_channels=4; segmentation masks give 3"):
        cond.kind_for_channels(4, "cn")


def test_palette_tensor_is_the_official_palette_and_ignore_is_black():
    ids = three_class_ids()
    for src in (ids, Image.fromarray(ids)):
        t = cond.ids_to_tensor(src, "palette")
        assert t.dtype == torch.float32 and t.shape == (3, 4, 6)
        road = torch.tensor(bdd.SEG_CLASSES[ROAD].rgb, dtype=torch.float32) / 255
        car = torch.tensor(bdd.SEG_CLASSES[CAR].rgb, dtype=torch.float32) / 255
        assert torch.equal(t[:, 0, 0], road) and torch.equal(t[:, 1, 4], car)
        assert torch.equal(t[:, 3, :], torch.zeros(3, 6))  # ignore row
        assert torch.equal(t[:, 2, 1], torch.tensor([128, 64, 128]) / 255.0)  # road's published colour
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def test_one_hot_sums_to_one_except_ignore_and_argmax_is_the_id():
    ids = three_class_ids()
    t = cond.ids_to_tensor(Image.fromarray(ids), "one_hot")
    assert t.dtype == torch.float32 and t.shape == (19, 4, 6)
    sums = t.sum(0)
    assert torch.equal(sums[:3], torch.ones(3, 6)) and torch.equal(sums[3], torch.zeros(6))
    assert torch.equal(t[:, :3].argmax(0), torch.from_numpy(ids[:3].astype(np.int64)))
    assert set(torch.unique(t).tolist()) == {0.0, 1.0}


def test_blank_condition_is_zeros_and_equals_an_all_ignore_mask():
    for kind, channels in (("palette", 3), ("one_hot", 19)):
        blank = cond.blank_condition(kind, 8, 16)
        assert blank.shape == (channels, 8, 16) and blank.dtype == torch.float32 and not blank.any()
        assert torch.equal(cond.ids_to_tensor(np.full((8, 16), IGNORE, np.uint8), kind), blank)


def test_mask_colormap_and_palette_rgb_read_as_the_same_ids(mini_bdd: Path, tmp_path: Path):
    masks = sorted((mini_bdd / "labels/sem_seg/masks/val").glob("*.png"))
    assert masks
    for mask_path in masks[:3]:
        ids = cond.read_ids(mask_path)
        with Image.open(mask_path) as im:
            assert im.mode == "L"
            expected = np.asarray(im)
        assert ids.mode == "L" and np.array_equal(np.asarray(ids), expected)
        assert len(np.unique(expected)) >= 3  # a real scene, not a flat map
        colormap = mini_bdd / "labels/sem_seg/colormaps/val" / mask_path.name
        assert np.array_equal(np.asarray(cond.read_ids(colormap)), expected)
        rgb = save(tmp_path / f"{mask_path.stem}_rgb.png", cond.ids_to_preview(expected))
        assert np.array_equal(np.asarray(cond.read_ids(rgb)), expected)
        rgba = save(tmp_path / f"{mask_path.stem}_rgba.png", cond.ids_to_preview(expected).convert("RGBA"))
        assert np.array_equal(np.asarray(cond.read_ids(rgba)), expected)
        assert np.array_equal(np.asarray(cond.read_ids(mask_path.read_bytes())), expected)
        with Image.open(mini_bdd / "images/10k/val" / f"{mask_path.stem}.jpg") as image:
            cond.read_ids(mask_path, expected_size=image.size)  # masks have their frame's size


def test_16_bit_masks_read_as_ids(tmp_path: Path):
    ids = three_class_ids()
    path = save(tmp_path / "m16.png", Image.fromarray(ids.astype(np.uint16)))
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    assert np.array_equal(np.asarray(cond.read_ids(path)), ids)
    bad = ids.astype(np.uint16)
    bad[0, 0] = 300
    with pytest.raises(UserError, match=r"has values \[300\] outside"):
        cond.read_ids(save(tmp_path / "bad16.png", Image.fromarray(bad)))


def test_bad_masks_give_messages_naming_the_file(tmp_path: Path):
    ids = three_class_ids()
    out_of_range = ids.copy()
    out_of_range[0, 0], out_of_range[1, 1] = 19, 40
    path = save(tmp_path / "bad_values.png", Image.fromarray(out_of_range))
    with pytest.raises(UserError) as err:
        cond.read_ids(path)
    assert str(err.value) == (
        f"mask {path} has values [19, 40] outside the BDD100K trainIds 0-18 and 255 (ignore)"
    )

    colours = np.zeros((4, 6, 3), np.uint8)
    colours[..., 0] = 10  # (10, 0, 0): not in the palette
    path = save(tmp_path / "photo.png", Image.fromarray(colours))
    with pytest.raises(UserError) as err:
        cond.read_ids(path)
    message = str(err.value)
    assert message.startswith(f"mask {path} is RGB and not an official BDD100K palette rendering")
    assert "colours [(10, 0, 0)] are not in the BDD100K segmentation palette" in message
    assert "label ids were expected (trainIds 0-18, 255 = ignore)" in message
    assert "labels/sem_seg/masks" in message

    grey = np.repeat(ids[..., None], 3, axis=2)  # ids written as an RGB file
    path = save(tmp_path / "grey.png", Image.fromarray(grey))
    with pytest.raises(
        UserError, match="looks like label ids saved as grey RGB: save it as a one-channel PNG"
    ):
        cond.read_ids(path)

    path = save(tmp_path / "small.png", Image.fromarray(ids))
    with pytest.raises(UserError) as err:
        cond.read_ids(path, expected_size=(12, 8), name="masks/a.png", image_name="images/a.jpg")
    assert str(err.value).startswith("mask masks/a.png is 6x4 but its image images/a.jpg is 12x8")

    with pytest.raises(UserError, match=f"mask not found: {tmp_path / 'nope.png'}"):
        cond.read_ids(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=f"cannot read mask {tmp_path / 'junk.png'}"):
        cond.read_ids(tmp_path / "junk.png")
    path = save(tmp_path / "float.tiff", Image.fromarray(ids.astype(np.float32)))
    with pytest.raises(UserError, match=f"mask {path} is mode F; expected a label-id PNG"):
        cond.read_ids(path)
    buf = io.BytesIO()
    Image.fromarray(out_of_range).save(buf, format="PNG")
    with pytest.raises(UserError, match=r"mask row 3 has values \[19, 40\]"):
        cond.read_ids(buf.getvalue(), name="row 3")
    with pytest.raises(UserError, match=r"has values \[40\] outside"):
        cond.ids_to_tensor(np.full((2, 2), 40, np.uint8), "palette")


def test_preview_and_side_by_side():
    ids = three_class_ids()
    preview = cond.ids_to_preview(ids)
    assert preview.mode == "RGB" and preview.size == (6, 4)
    assert preview.getpixel((0, 0)) == bdd.SEG_CLASSES[ROAD].rgb and preview.getpixel((0, 3)) == (0, 0, 0)
    generated = Image.new("RGB", (24, 8), (1, 2, 3))
    sheet = cond.side_by_side(preview, generated)
    assert sheet.size == (12 + 24, 8)  # preview scaled to the image's height, aspect kept
    assert sheet.getpixel((0, 0)) == bdd.SEG_CLASSES[ROAD].rgb and sheet.getpixel((11, 0)) == (0, 0, 142)
    assert sheet.getpixel((0, 7)) == (0, 0, 0) and sheet.getpixel((12, 0)) == (1, 2, 3)
    assert np.array_equal(np.asarray(sheet)[:, 12:], np.asarray(generated))


def test_resize_ids_is_nearest_neighbour_and_keeps_only_the_masks_classes():
    ids = Image.fromarray(three_class_ids())
    assert cond.resize_ids(ids, (6, 4)) is ids  # already the size: untouched
    doubled = cond.resize_ids(ids, (12, 8))
    assert doubled.mode == "L" and doubled.size == (12, 8)
    assert np.array_equal(np.asarray(doubled), three_class_ids().repeat(2, axis=0).repeat(2, axis=1))
    odd = np.asarray(cond.resize_ids(ids, (5, 7)))  # non-integer factors: no blended ids at class borders
    assert odd.shape == (7, 5) and set(np.unique(odd)) == {ROAD, CAR, IGNORE}


# --- box layouts ------------------------------------------------------------------------------------------------


def box_ids() -> np.ndarray:
    """A 6x8 box layout: a car (outlined) on background, a pedestrian on top of it."""
    from vocab import box_layout

    labels = [
        {"category": "car", "box2d": {"x1": 0, "y1": 0, "x2": 5, "y2": 4}},
        {"category": "pedestrian", "box2d": {"x1": 6, "y1": 1, "x2": 6, "y2": 3}},
    ]
    return box_layout.render_box_layout(labels, (8, 6), line_width=1)


def test_box_layout_channels_and_kinds():
    assert cond.channels_for("palette", "boxes") == 3 and cond.channels_for("one_hot", "boxes") == 11
    assert cond.kind_for_channels(11, layout="boxes") == "one_hot" and cond.kind_for_channels(
        3, layout="boxes"
    )
    with pytest.raises(UserError, match="cn has conditioning_channels=19; box layouts give 3 .* or 11"):
        cond.kind_for_channels(19, "cn", layout="boxes")
    with pytest.raises(UserError, match="unknown layout 'bbox'; use one of seg, boxes"):
        cond.channels_for("palette", "bbox")


def test_box_layout_tensors_palette_one_hot_and_blank():
    from vocab import box_layout

    ids = box_ids()
    car, ped = box_layout.BOX_CLASS_ID["car"], box_layout.BOX_CLASS_ID["pedestrian"]
    assert ids[2, 2] == car and ids[0, 0] == box_layout.BOUNDARY_ID and ids[2, 6] == ped and ids[5, 7] == 255
    t = cond.ids_to_tensor(Image.fromarray(ids), "palette", "boxes")
    assert t.shape == (3, 6, 8) and t.dtype == torch.float32
    assert torch.equal(t[:, 2, 2], torch.tensor(box_layout.CLASS_COLORS["car"]) / 255.0)
    assert torch.equal(t[:, 0, 0], torch.ones(3)) and torch.equal(
        t[:, 5, 7], torch.zeros(3)
    )  # outline, background
    one_hot = cond.ids_to_tensor(ids, "one_hot", "boxes")
    assert one_hot.shape == (11, 6, 8) and set(torch.unique(one_hot).tolist()) == {0.0, 1.0}
    drawn = torch.from_numpy(ids != 255)
    assert torch.equal(one_hot.sum(0), drawn.float())  # one channel per drawn pixel, background all zeros
    assert torch.equal(one_hot.argmax(0)[drawn], torch.from_numpy(ids.astype(np.int64))[drawn])
    empty = np.full((6, 8), 255, np.uint8)  # a frame without boxes is the blank condition
    for kind in ("palette", "one_hot"):
        assert torch.equal(
            cond.ids_to_tensor(empty, kind, "boxes"), cond.blank_condition(kind, 6, 8, "boxes")
        )
    # the mask palette would give these ids other colours: the layout decides the colours
    assert not torch.equal(t, cond.ids_to_tensor(np.where(ids == 10, 0, ids), "palette"))
    preview = cond.ids_to_preview(ids, "boxes")
    assert (
        preview.getpixel((2, 2)) == box_layout.CLASS_COLORS["car"] and preview.getpixel((0, 0)) == (255,) * 3
    )


def test_a_box_layout_is_never_read_as_a_mask_nor_a_mask_as_a_box_layout(mini_bdd: Path, tmp_path: Path):
    """The ids overlap (2: car / building): only the PNG marker tells them apart, and the other layout is refused."""

    ids = box_ids()
    bdd.check_label_ids(ids)  # numerically a valid segmentation mask: values alone cannot tell
    layout = layouts.save_png(ids, tmp_path / "layout.png", "boxes")
    assert np.array_equal(np.asarray(cond.read_ids(layout, layout="boxes")), ids)
    assert np.array_equal(np.asarray(cond.read_ids(layout.read_bytes(), layout="boxes")), ids)
    with pytest.raises(UserError) as err:
        cond.read_ids(layout)  # the default: a mask
    assert str(err.value).startswith(f"{layout} is a box layout (its PNG says bdd_layout=boxes")
    assert "segmentation masks were expected" in str(err.value)
    mask = sorted((mini_bdd / "labels/sem_seg/masks/val").glob("*.png"))[0]
    with pytest.raises(UserError, match=r"is not a box layout \(no bdd_layout=boxes marker"):
        cond.read_ids(mask, layout="boxes")
    unmarked = save(tmp_path / "unmarked.png", Image.fromarray(ids))  # the same ids without the marker
    with pytest.raises(UserError, match="but box layouts were expected"):
        cond.read_ids(unmarked, layout="boxes")
    assert layouts.of_file(layout).name == "boxes" and layouts.of_file(mask).name == "seg"

    arr = ids.copy()
    arr[0, 0] = 12  # marked, but not a layout id
    path = tmp_path / "bad.png"
    info = PngInfo()
    info.add_text("bdd_layout", "boxes")
    Image.fromarray(arr).save(path, pnginfo=info)
    with pytest.raises(UserError, match=rf"box layout {path} has values \[12\] outside the layout ids"):
        cond.read_ids(path, layout="boxes")
    with pytest.raises(UserError, match=r"box layout .* is 8x6 but its image a.jpg is 16x12"):
        cond.read_ids(layout, expected_size=(16, 12), image_name="a.jpg", layout="boxes")
