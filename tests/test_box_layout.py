"""vocab/box_layout.py: ids at known pixels, drawing order, outlines between touching boxes, clipping, skipped
categories, mirrored layouts and their boxes, files and their marker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vocab import bdd, layouts
from vocab import box_layout as bl

CAR, PED, BUS, LIGHT = (bl.BOX_CLASS_ID[c] for c in ("car", "pedestrian", "bus", "traffic light"))
EDGE, BG = bl.BOUNDARY_ID, bl.BACKGROUND_ID


def box(category: str, x1: float, y1: float, x2: float, y2: float) -> dict:
    return {"category": category, "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}


def test_ids_classes_and_palette():
    assert bl.BOX_CLASSES == bdd.DET_CLASSES and len(bl.BOX_CLASSES) == 10
    assert (CAR, PED, EDGE, BG) == (2, 0, 10, 255)
    assert tuple(bl.LAYOUT_IDS) == (*range(10), 10, 255) and bl.NUM_ONE_HOT_CHANNELS == 11
    colours = {tuple(bl.BOX_PALETTE[i]) for i in bl.LAYOUT_IDS}
    assert len(colours) == len(bl.LAYOUT_IDS)  # every id its own colour
    assert tuple(bl.BOX_PALETTE[CAR]) == bdd.SEG_CLASSES[bdd.SEG_ID["car"]].rgb
    assert tuple(bl.BOX_PALETTE[EDGE]) == (255, 255, 255) and tuple(bl.BOX_PALETTE[BG]) == (0, 0, 0)


def test_boundary_width_scales_with_the_short_side():
    assert bl.boundary_width((1280, 720)) == 2
    assert bl.boundary_width((1920, 1080)) == 3
    assert bl.boundary_width((320, 180)) == 1 and bl.boundary_width((16, 9)) == 1
    assert bl.boundary_width((720, 1280)) == 2  # portrait: the short side too


def test_a_box_is_filled_outlined_and_inclusive():
    ids = bl.render_box_layout([box("car", 10, 20, 49, 39)], (100, 60), line_width=2)
    assert ids.dtype == np.uint8 and ids.shape == (60, 100)
    inner = ids[22:38, 12:48]
    assert (inner == CAR).all()
    for y, x in ((20, 10), (21, 11), (39, 49), (38, 48), (30, 10), (30, 49), (20, 30), (39, 30)):
        assert ids[y, x] == EDGE, (y, x)
    assert ids[22, 12] == CAR and ids[37, 47] == CAR  # outline exactly 2 px
    assert (
        ids[19, 30] == BG and ids[40, 30] == BG and ids[30, 9] == BG and ids[30, 50] == BG
    )  # x2, y2 inclusive
    assert set(np.unique(ids)) == {CAR, EDGE, BG}
    # the default outline width of a 100x60 image is 1 px
    default = bl.render_box_layout([box("car", 10, 20, 49, 39)], (100, 60))
    assert default[20, 10] == EDGE and default[21, 11] == CAR


def test_half_pixel_coordinates_follow_the_pixel_centre_rule():
    # continuous extent [x1, x2 + 1]: pixel i is inside when its centre i + 0.5 is, edges included
    ids = bl.render_box_layout([box("car", 2.5, 1.6, 5.4, 3.5)], (10, 8), line_width=0)
    cols = np.flatnonzero((ids == CAR).any(axis=0)).tolist()
    rows = np.flatnonzero((ids == CAR).any(axis=1)).tolist()
    assert cols == [2, 3, 4, 5] and rows == [2, 3, 4]


def test_smaller_boxes_are_painted_over_larger_ones_whatever_the_input_order():
    big, small = box("bus", 10, 10, 89, 59), box("pedestrian", 40, 20, 49, 49)
    a = bl.render_box_layout([small, big], (100, 70), line_width=2)
    b = bl.render_box_layout([big, small], (100, 70), line_width=2)
    assert np.array_equal(a, b)
    assert a[35, 45] == PED and a[35, 30] == BUS
    assert a[35, 40] == EDGE and a[35, 49] == EDGE  # the pedestrian's own outline inside the bus
    drawn = [(b.category, b.area) for b in bl.layout_boxes([small, big], (100, 70))]
    assert drawn == [("bus", 80 * 50), ("pedestrian", 10 * 30)]
    # equal areas: input order, later boxes on top
    left, right = box("car", 0, 0, 19, 19), box("bus", 10, 0, 29, 19)
    ids = bl.render_box_layout([left, right], (40, 20), line_width=1)
    assert ids[10, 15] == BUS
    ids = bl.render_box_layout([right, left], (40, 20), line_width=1)
    assert ids[10, 15] == CAR


def test_touching_and_overlapping_boxes_of_one_class_stay_separate():
    touching = [box("car", 0, 0, 49, 29), box("car", 50, 0, 99, 29)]  # share an edge: 49 | 50
    ids = bl.render_box_layout(touching, (100, 30), line_width=2)
    row = ids[15].tolist()
    assert row[46:54] == [CAR, CAR, EDGE, EDGE, EDGE, EDGE, CAR, CAR]
    overlapping = [box("car", 0, 0, 59, 29), box("car", 40, 5, 89, 24)]  # the smaller one on top
    ids = bl.render_box_layout(overlapping, (100, 30), line_width=1)
    assert ids[15].tolist()[37:43] == [CAR, CAR, CAR, EDGE, CAR, CAR]
    assert _components(ids == CAR) == 2


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean image (small images: a plain flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_tiny_boxes_keep_their_class():
    labels = [box("traffic light", 5, 5, 5, 5), box("traffic light", 10, 5, 11, 6), box("car", 20, 5, 22, 7)]
    ids = bl.render_box_layout(labels, (40, 20), line_width=3)
    assert ids[5, 5] == LIGHT and (ids[5:7, 10:12] == LIGHT).all()  # no outline under 3 px
    assert ids[6, 21] == CAR and ids[5, 20] == EDGE  # 3x3: a 1 px outline around one interior pixel


def test_boxes_are_clipped_and_cut_edges_get_no_outline():
    ids = bl.render_box_layout([box("car", -20, -10, 30, 20)], (60, 40), line_width=2)
    assert ids[0, 0] == CAR and ids[5, 0] == CAR and ids[0, 5] == CAR  # the image edge cut the box here
    assert ids[10, 30] == EDGE and ids[20, 10] == EDGE  # its own right and bottom edges
    assert ids[10, 31] == BG and ids[21, 10] == BG
    past = bl.render_box_layout([box("car", 50, 30, 80, 60)], (60, 40), line_width=2)
    assert past[35, 59] == CAR and past[39, 55] == CAR and past[30, 55] == EDGE
    outside = [box("car", 60, 0, 70, 10), box("car", -30, 0, -0.6, 10), box("bus", 0, 40, 10, 50)]
    assert (bl.render_box_layout(outside, (60, 40)) == BG).all()


def test_categories_outside_the_ten_and_bad_boxes_are_skipped():
    skipped = [
        box("other person", 0, 0, 9, 9),  # det_20's ignored categories
        box("other vehicle", 0, 0, 9, 9),
        box("trailer", 0, 0, 9, 9),
        box("lane/single white", 0, 0, 9, 9),
        box("area/drivable", 0, 0, 9, 9),
        box("drivable area", 0, 0, 9, 9),
        box("unicorn", 0, 0, 9, 9),
        {"category": None, "box2d": {"x1": 0, "y1": 0, "x2": 9, "y2": 9}},
        {"category": "car", "poly2d": [[0, 0, "L"]]},  # no box
        {"category": "car", "box2d": None},
        box("car", 9, 0, 0, 9),  # x2 < x1
        box("car", float("nan"), 0, 9, 9),
        {"category": "car", "box2d": {"x1": 0, "y1": 0, "x2": 9}},
    ]
    assert (bl.render_box_layout(skipped, (20, 20)) == BG).all()
    legacy = [box("person", 0, 0, 4, 4), box("bike", 5, 0, 9, 4), box("motor", 10, 0, 14, 4)]
    ids = bl.render_box_layout(legacy, (20, 10), line_width=0)
    assert ids[2, 2] == bl.BOX_CLASS_ID["pedestrian"] and ids[2, 7] == bl.BOX_CLASS_ID["bicycle"]
    assert ids[2, 12] == bl.BOX_CLASS_ID["motorcycle"]


def test_label_structs_of_every_format_render_like_dicts(mini_bdd: Path):
    """det_20 and the legacy file of the same frames give the same layouts (decoded structs and plain dicts)."""
    det = {f.stem: f for f in bdd.load_frames(mini_bdd / "labels/det_20/det_val.json")}
    legacy = {f.stem: f for f in bdd.load_frames(mini_bdd / "labels/bdd100k_labels_images_val.json")}
    raw = {f["name"]: f for f in json.loads((mini_bdd / "labels/det_20/det_val.json").read_text())}
    size = (320, 180)
    drawn = 0
    for name, frame in det.items():
        ids = bl.render_box_layout(frame.label_list(), size)
        assert np.array_equal(ids, bl.render_box_layout(legacy[name].label_list(), size)), name
        assert np.array_equal(ids, bl.render_box_layout(raw[frame.name].get("labels") or [], size)), name
        drawn += int((ids != BG).any())
    assert drawn >= len(det) - 1


@pytest.mark.parametrize("width", [64, 63])
def test_a_mirrored_layout_is_the_layout_of_the_mirrored_boxes(width):
    rng = np.random.default_rng(width)
    height = 40
    for trial in range(200):
        labels = []
        for i in range(int(rng.integers(1, 8))):
            x1 = float(rng.uniform(-10, width + 5))
            y1 = float(rng.uniform(-5, height))
            if trial % 2:  # half the trials on half-pixel ties, where rounding rules go asymmetric
                x1, y1 = round(x1) + 0.5, round(y1) + 0.5
            w, h = float(rng.choice([0, 0.5, 1, 2.5, rng.uniform(0, 30)])), float(rng.uniform(0, 20))
            labels.append(box(bl.BOX_CLASSES[i % 10], x1, y1, x1 + w, y1 + h))
        ids = bl.render_box_layout(labels, (width, height))
        mirrored = [{**lab, "box2d": bl.mirror_box(lab["box2d"], width)} for lab in labels]
        assert np.array_equal(np.fliplr(ids), bl.render_box_layout(mirrored, (width, height))), labels
    assert bl.mirror_box({"x1": 0, "y1": 1, "x2": 9, "y2": 5}, 100) == {"x1": 90, "y1": 1, "x2": 99, "y2": 5}


def test_mirrored_span_swaps_the_ends_and_mirroring_twice_is_the_identity():
    assert bl.mirrored_span(0, 9, 100) == (90, 99)
    assert bl.mirrored_span(10.25, 20.5, 64) == (42.5, 52.75)
    for x1, x2, width in [(0.0, 0.0, 1), (3.5, 7.0, 63), (-2.0, 70.0, 64)]:
        assert bl.mirrored_span(*bl.mirrored_span(x1, x2, width), width) == (x1, x2)


def test_files_are_marked_palette_pngs_that_read_back_as_the_ids(mini_bdd: Path, tmp_path: Path):
    ids = bl.render_box_layout([box("car", 10, 10, 40, 30), box("pedestrian", 20, 5, 25, 35)], (64, 40))
    path = layouts.save_png(ids, tmp_path / "a.png", "boxes", key="k1")
    with Image.open(path) as im:
        assert im.mode == "P" and im.size == (64, 40)
        assert np.array_equal(np.asarray(im), ids)  # the index is the id
        assert im.info[layouts.MARKER_KEY] == "boxes" and im.info[layouts.SOURCE_KEY] == "k1"
        assert np.array_equal(np.asarray(im.convert("RGB")), bl.BOX_PALETTE[ids])  # viewers see colours
    assert layouts.of_file(path).name == "boxes" and layouts.of_file(path.read_bytes()).name == "boxes"
    mask = sorted((mini_bdd / "labels/sem_seg/masks/val").glob("*.png"))[0]
    assert layouts.of_file(mask).name == "seg"
    assert not list(tmp_path.glob("*.tmp*"))
    preview = layouts.get("boxes").preview(ids)
    assert preview.mode == "RGB" and preview.getpixel((15, 20)) == bl.CLASS_COLORS["car"]
    assert preview.getpixel((0, 0)) == (0, 0, 0) and preview.getpixel((10, 10)) == (255, 255, 255)
    with pytest.raises(Exception, match=r"values \[40\] outside the layout ids"):
        layouts.png_bytes(np.full((4, 4), 40, np.uint8), "boxes")


def test_layout_key_follows_what_is_drawn():
    a = [box("car", 10, 10, 40, 30), box("other person", 0, 0, 5, 5)]
    assert bl.layout_key(a, (64, 40)) == bl.layout_key(a[:1], (64, 40))  # skipped labels change nothing
    assert bl.layout_key(a, (64, 40)) != bl.layout_key([box("car", 10, 10, 41, 30)], (64, 40))
    assert bl.layout_key(a, (64, 40)) != bl.layout_key([box("bus", 10, 10, 40, 30)], (64, 40))
    assert bl.layout_key(a, (64, 40)) != bl.layout_key(a, (64, 41))
