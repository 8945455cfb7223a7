"""vocab/bdd.py: decoding both label formats, categories, attributes, masks, names, boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.cli import UserError
from vocab import bdd

DET20_FRAME = {
    "name": "b1c66a42-6f7d68ca.jpg",
    "attributes": {"weather": "overcast", "timeofday": "daytime", "scene": "city street"},
    "timestamp": 10000,
    "labels": [
        {
            "id": "0",
            "attributes": {"occluded": False, "truncated": False, "trafficLightColor": "NA"},
            "category": "traffic sign",
            "box2d": {"x1": 1000.698742, "y1": 281.992415, "x2": 1040.626872, "y2": 326.91156},
        },
        {
            "id": "71849",
            "attributes": {"occluded": True, "truncated": False, "trafficLightColor": "G"},
            "category": "traffic light",
            "box2d": {"x1": 555.6, "y1": 304.2, "x2": 574.0, "y2": 316.4},
        },
        {
            "id": "7",
            "attributes": {},
            "category": "other person",
            "box2d": {"x1": 1, "y1": 2, "x2": 3, "y2": 4},
        },
    ],
}
LEGACY_FRAME = {
    "name": "b1c66a42-6f7d68ca.jpg",
    "attributes": {"weather": "overcast", "scene": "city street", "timeofday": "daytime"},
    "timestamp": 10000,
    "labels": [
        {
            "category": "person",
            "attributes": {"occluded": False, "truncated": False, "trafficLightColor": "none"},
            "manualShape": True,
            "manualAttributes": True,
            "box2d": {"x1": 10, "y1": 20, "x2": 30, "y2": 80},
            "id": 0,
        },
        {
            "category": "drivable area",
            "attributes": {"areaType": "direct"},
            "manualShape": True,
            "manualAttributes": True,
            "poly2d": [
                {
                    "vertices": [[241.14, 697.92], [541.53, 380.56], [700.1, 380.2]],
                    "types": "LLL",
                    "closed": True,
                }
            ],
            "id": 34,
        },
        {
            "category": "traffic light",
            "attributes": {"occluded": False, "truncated": False, "trafficLightColor": "red"},
            "box2d": {"x1": 1, "y1": 1, "x2": 5, "y2": 9},
            "id": 35,
        },
    ],
}


def test_decode_det20_frame_fields():
    (frame,) = bdd.decode_frames(json.dumps([DET20_FRAME]).encode())
    assert frame.name == "b1c66a42-6f7d68ca.jpg" and frame.stem == "b1c66a42-6f7d68ca"
    assert (frame.weather, frame.scene, frame.timeofday) == ("overcast", "city street", "daytime")
    assert frame.labels_state == "ok"
    sign, light, other = frame.label_list()
    assert sign.id == "0" and sign.box2d.x2 == pytest.approx(1040.626872)
    assert bdd.light_color(sign) is None and bdd.light_color(light) == "green"
    assert bdd.category_of(other) == bdd.Category("pedestrian", ignored=True, known=True)
    assert bdd.detect_format([frame]) == "det_20"


def test_crowd_regions_ignored_categories_and_crowd_attributes_in_either_spelling():
    def label(category: str, attributes: dict | None) -> dict:
        return {"category": category, "attributes": attributes, "box2d": {"x1": 0, "y1": 0, "x2": 9, "y2": 9}}

    labels = [
        label("car", {"crowd": True}),  # tracking exports
        label("pedestrian", {"Crowd": True, "Occluded": True}),  # a Scalabel export's capitalised keys
        label("truck", {"ignored": True}),  # what the toolkit sets on det_20's ignored categories
        label("trailer", {}),
        label("car", {"crowd": False, "Crowd": None}),
        label("car", None),
        label("car", {"occluded": True}),
    ]
    frames = bdd.decode_frames(json.dumps({"frames": [{"name": "a.jpg", "labels": labels}]}).encode())
    crowd = [bdd.is_crowd_region(x) for x in frames[0].label_list()]
    assert crowd == [True, True, True, True, False, False, False]


def test_decode_legacy_frame_maps_names_and_skips_polygons():
    frames = bdd.decode_frames(json.dumps([LEGACY_FRAME]).encode())
    assert bdd.detect_format(frames) == "legacy"
    person, area, light = frames[0].label_list()
    assert bdd.category_of(person).det_class == "pedestrian"
    assert bdd.category_of(area) == bdd.Category(None, ignored=False, known=True)
    assert area.has_polygon and area.box2d is None and not person.has_polygon
    assert bdd.light_color(light) == "red"


def test_frames_wrapper_and_missing_labels_states():
    frames = [
        {"name": "a.jpg", "attributes": {}},
        {"name": "b.jpg", "labels": None},
        {"name": "c.jpg", "labels": []},
    ]
    decoded = bdd.decode_frames(json.dumps({"frames": frames}).encode())
    assert [f.labels_state for f in decoded] == ["absent", "null", "empty"]
    assert all(f.label_list() == [] for f in decoded)
    assert decoded[0].weather == "undefined" and decoded[1].scene == "undefined"


def test_malformed_json_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "det_train.json"
    path.write_text('[\n  {"name": "a.jpg",\n   "labels": [}\n]')
    with pytest.raises(UserError, match=r"det_train\.json: malformed JSON: .* at line 3, column 15"):
        bdd.load_frames(path)


def test_wrong_type_error_names_json_path(tmp_path):
    path = tmp_path / "det.json"
    path.write_text(json.dumps([{"name": "a.jpg", "labels": [{"category": "car", "box2d": {"x1": "x"}}]}]))
    with pytest.raises(
        UserError, match=r"det\.json: not a BDD100K label file: .*\$\[0\]\.labels\[0\]\.box2d"
    ):
        bdd.load_frames(path)


def test_missing_file_error(tmp_path):
    with pytest.raises(UserError, match="labels file not found"):
        bdd.load_frames(tmp_path / "nope.json")


def test_label_report_counts_unknowns_without_crashing():
    frame = dict(DET20_FRAME, attributes={"weather": "sunny", "scene": "city street", "timeofday": "daytime"})
    frame["labels"] = frame["labels"] + [
        {"id": "9", "category": "spaceship", "attributes": {"trafficLightColor": "B"}}
    ]
    (decoded,) = bdd.decode_frames(json.dumps([frame]).encode())
    report = bdd.LabelReport()
    report.check_frame(decoded)
    assert report.unknown_categories == {"spaceship": 1}
    assert report.unknown_attributes == {"weather=sunny": 1}
    assert report.unknown_light_colors == {"B": 1}
    assert any("spaceship" in line for line in report.lines())


def test_category_tables_match_the_official_toolkit():
    assert len(bdd.DET20_CATEGORIES) == 13
    assert bdd.DET_CLASS_OFFICIAL_ID["pedestrian"] == 1 and bdd.DET_CLASS_OFFICIAL_ID["traffic sign"] == 10
    assert bdd.DET_CLASS_YOLO_ID["car"] == 2
    assert {bdd.canonical_category(c).det_class for c in bdd.LEGACY_BOX_CATEGORIES} == set(bdd.DET_CLASSES)


def test_palette_matches_label_py_not_sem_seg_toml():
    pal = bdd.seg_palette()
    assert len(pal) == 768
    assert pal[3 * 3 : 3 * 3 + 3] == [102, 102, 156]  # wall (sem_seg.toml has it swapped with fence)
    assert pal[3 * 4 : 3 * 4 + 3] == [190, 153, 153]  # fence
    assert pal[3 * 255 : 3 * 256] == [0, 0, 0]


def test_mask_roundtrip_palette_and_validation(tmp_path):
    ids = np.array([[0, 13, 255], [18, 10, 11]], dtype=np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "m.png")
    assert np.array_equal(bdd.read_label_mask(tmp_path / "m.png", expected_size=(3, 2)), ids)
    rgb = bdd.ids_to_palette_rgb(ids)
    assert tuple(rgb[0, 1]) == (0, 0, 142) and tuple(rgb[0, 2]) == (0, 0, 0)
    assert np.array_equal(bdd.palette_rgb_to_ids(rgb), ids)
    colormap = Image.fromarray(ids, mode="L").convert("P")
    colormap.putpalette(bdd.seg_palette())
    colormap.save(tmp_path / "c.png")
    assert np.array_equal(bdd.read_label_mask(tmp_path / "c.png"), ids)


def test_mask_errors(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match="mode RGB.*colormaps"):
        bdd.read_label_mask(tmp_path / "rgb.png")
    Image.fromarray(np.full((2, 2), 40, np.uint8), mode="L").save(tmp_path / "bad.png")
    with pytest.raises(UserError, match=r"values \[40\] outside"):
        bdd.read_label_mask(tmp_path / "bad.png")
    Image.fromarray(np.zeros((2, 4), np.uint8), mode="L").save(tmp_path / "size.png")
    with pytest.raises(UserError, match="is 4x2 but its image is 1280x720"):
        bdd.read_label_mask(tmp_path / "size.png", expected_size=(1280, 720))
    with pytest.raises(UserError, match="not in the BDD100K segmentation palette"):
        bdd.palette_rgb_to_ids(np.full((1, 1, 3), 7, np.uint8))


def test_stem_and_match_by_stem(tmp_path):
    assert bdd.stem("/x/y/0000f77c-6257be58.jpg") == "0000f77c-6257be58"
    assert bdd.stem("0000f77c-6257be58_train_id.png") == "0000f77c-6257be58"
    images = [tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.png"]
    masks = [tmp_path / "b.png", tmp_path / "a_train_id.png", tmp_path / "z.png"]
    match = bdd.match_by_stem(images, masks)
    assert [(i.name, m.name) for i, m in match.pairs] == [("a.jpg", "a_train_id.png"), ("b.jpg", "b.png")]
    assert [p.name for p in match.left_only] == ["c.png"] and [p.name for p in match.right_only] == ["z.png"]


def test_find_label_file_prefers_det20_then_legacy_then_per_image_folder(tmp_path):
    (tmp_path / "labels" / "det_20").mkdir(parents=True)
    per_image = tmp_path / "labels" / "100k" / "val"
    per_image.mkdir(parents=True)  # empty: not a labels folder
    with pytest.raises(
        UserError,
        match=r"looked for labels/det_20/det_val.json, labels/bdd100k_labels_images_val.json and "
        r"labels/100k/val/\*.json",
    ):
        bdd.find_label_file(tmp_path, "val")
    (per_image / "b1c66a42-6f7d68ca.json").write_text("{}")
    assert bdd.find_label_file(tmp_path, "val") == per_image
    legacy = tmp_path / "labels" / "bdd100k_labels_images_val.json"
    legacy.write_text("[]")
    assert bdd.find_label_file(tmp_path, "val") == legacy
    det = tmp_path / "labels" / "det_20" / "det_val.json"
    det.write_text("[]")
    assert bdd.find_label_file(tmp_path, "val") == det
    with pytest.raises(UserError, match="BDD100K folder not found"):
        bdd.find_label_file(tmp_path / "missing", "val")


def test_boxes_inclusive_to_yolo_and_iou():
    box = bdd.Box2D(x1=0, y1=0, x2=1279, y2=719)
    assert bdd.box_to_yolo(box) == pytest.approx((0.5, 0.5, 1.0, 1.0))
    clipped = bdd.clip_box(bdd.Box2D(x1=-5, y1=10, x2=2000, y2=20))
    assert clipped == (0.0, 10.0, 1279.0, 20.0)
    assert bdd.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert bdd.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
