"""Real BDD100K files beyond the format notes: the 2018 per-image labels, Scalabel exports, palette-mode masks.

Small hand-written fixtures mimic what public copies of the official files hold (the research note, part C):
each reads, captions exactly like the det_20 file of the same scene, and names still match the images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert import generate_bdd_captions as gen
from convert.captions import CaptionBuilder, TokenCounter, load_templates
from core.cli import UserError, run_main
from vocab import bdd

NAME = "b1c66a42-6f7d68ca"
OTHER = "cabc30fc-e7726578"
ATTRS = {"weather": "clear", "scene": "city street", "timeofday": "night"}

# One scene, (x1, y1, x2, y2) boxes: det_20 category, legacy/2018 category, light colour as det_20 | 2018 | list.
SCENE = [
    ("bus", "bus", (0.0, 400.0, 299.0, 599.0), None),
    ("truck", "truck", (1100.0, 300.0, 1280.8, 500.0), None),  # past the right edge, as in real files
    ("car", "car", (600.0, 350.0, 700.0, 400.0), None),
    ("pedestrian", "person", (1000.0, 300.0, 1040.0, 400.0), None),
    ("bicycle", "bike", (10.0, 10.0, 30.0, 30.0), None),
    ("motorcycle", "motor", (40.0, 10.0, 60.0, 30.0), None),
    ("rider", "rider", (70.0, 10.0, 90.0, 30.0), None),
    ("traffic light", "traffic light", (100.0, 10.0, 110.0, 30.0), ("R", "red", [3, "R"])),
    ("traffic light", "traffic light", (120.0, 10.0, 130.0, 30.0), ("R", "red", [3, "R"])),
    ("traffic light", "traffic light", (140.0, 10.0, 150.0, 30.0), ("G", "green", [1, "G"])),
    ("traffic light", "traffic light", (160.0, 10.0, 170.0, 30.0), ("NA", "none", [0, "NA"])),
    ("traffic sign", "traffic sign", (180.0, 10.0, 200.0, 30.0), None),
]
SCENE_CAPTION = (
    "A dashcam photo of a city street at night in clear weather, with two red traffic lights, a green traffic "
    "light, another traffic light, a pedestrian, a rider, a car, a truck, a bus, a motorcycle, a bicycle and a "
    "traffic sign. A bus close on the left, a truck close on the right and a car far ahead."
)


def box(b):
    return {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]}


def det20_frame(name=NAME) -> dict:
    labels = []
    for i, (cat, _, b, light) in enumerate(SCENE):
        attrs = {"occluded": False, "truncated": False, "trafficLightColor": light[0] if light else "NA"}
        labels.append({"id": str(1000 + i), "attributes": attrs, "category": cat, "box2d": box(b)})
    return {"name": f"{name}.jpg", "attributes": ATTRS, "timestamp": 10000, "labels": labels}


def per_image_file(name=NAME) -> dict:
    """The original 2018 format: one JSON per image, name without .jpg, labels as frames[0].objects."""
    objects = []
    for i, (_, cat, b, light) in enumerate(SCENE):
        attrs = {
            "occluded": i % 2 == 0,
            "truncated": False,
            "trafficLightColor": light[1] if light else "none",
        }
        objects.append({"category": cat, "id": i, "attributes": attrs, "box2d": box(b)})
    objects += [  # areas and lanes: polylines of [x, y, "L"|"C"], never counted as objects
        {
            "category": "area/drivable",
            "id": 20,
            "attributes": {},
            "poly2d": [[0.0, 719.0, "L"], [600.5, 400.2, "L"], [700.0, 400.0, "C"], [1280.8, 720.4, "L"]],
        },
        {
            "category": "area/alternative",
            "id": 21,
            "attributes": {},
            "poly2d": [[0, 700, "L"], [50, 600, "L"]],
        },
        {
            "category": "lane/single white",
            "id": 22,
            "attributes": {"direction": "parallel", "style": "dashed"},
            "poly2d": [[492.9, 331.9, "L"], [-0.6, 471.1, "L"]],
        },
        {
            "category": "lane/road curb",
            "id": 23,
            "attributes": {},
            "poly2d": [[10, 700, "L"], [300, 500, "C"]],
        },
    ]
    return {"name": name, "attributes": ATTRS, "frames": [{"timestamp": 10000, "objects": objects}]}


def scalabel_label(i, cat, b, light, capitalised):
    """A label as older Scalabel exports write it: every key present, null where unused, int ids."""
    if capitalised:
        attrs = {
            "Occluded": True,
            "Truncated": False,
            "Traffic Light Color": light[2] if light else [0, "NA"],
        }
    else:
        attrs = {"occluded": True, "truncated": None, "trafficLightColor": light[2] if light else [0, "NA"]}
    return {
        "id": i,
        "index": i,
        "category": cat,
        "manualShape": True,
        "manualAttributes": None,
        "score": None,
        "attributes": attrs,
        "box2d": box(b),
        "box3d": None,
        "poly2d": None,
        "rle": None,
        "graph": None,
    }


def scalabel_export() -> dict:
    """A dict with frames, config and groups; URL and .png names; null labels and attributes; mixed key case."""
    labels = [scalabel_label(i, cat, b, light, i % 2 == 1) for i, (cat, _, b, light) in enumerate(SCENE)]
    labels.append(
        {
            "id": 99,
            "category": "drivable area",
            "attributes": None,
            "box2d": None,
            "box3d": None,
            "poly2d": [{"vertices": [[0, 719], [640, 400], [1280, 719]], "types": "LLL", "closed": True}],
        }
    )
    common = {
        "url": None,
        "videoName": None,
        "intrinsics": None,
        "extrinsics": None,
        "size": None,
        "index": 0,
    }
    frames = [
        {
            **common,
            "name": f"https://s3-us-west-2.amazonaws.com/bdd-label/bdd100k/frames-20000/{NAME}.jpg",
            "attributes": ATTRS,
            "timestamp": 10000,
            "labels": labels,
        },
        {**common, "name": "0000f77c-6257be58.png", "attributes": ATTRS, "timestamp": None, "labels": None},
        {
            **common,
            "name": f"{OTHER}.png",
            "attributes": {"weather": None, "scene": "highway", "timeofday": None},
            "timestamp": 10000,
            "labels": [scalabel_label(0, "car", (500.0, 300.0, 560.0, 340.0), None, True)],
        },
        {**common, "name": "ac6d4f42-00000000.jpg", "attributes": None, "timestamp": 10000, "labels": []},
    ]
    config = {"imageSize": None, "attributes": None, "categories": [{"name": "car", "subcategories": None}]}
    return {"frames": frames, "config": config, "groups": None}


def encode(data, bom: bool = False) -> bytes:
    return (b"\xef\xbb\xbf" if bom else b"") + json.dumps(data, indent=1).encode("utf-8")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def caption(frame: bdd.Frame) -> str:
    return CaptionBuilder(load_templates(), TokenCounter()).caption(frame)[0]


def run_captions(*argv: str) -> int:
    return run_main(gen.main, list(argv))


def read_all(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# The original 2018 per-image format
# ---------------------------------------------------------------------------------------------------------------


def test_det20_scene_caption_is_pinned():
    (frame,) = bdd.decode_frames(encode([det20_frame()]))
    assert caption(frame) == SCENE_CAPTION


def test_per_image_file_reads_as_one_frame_and_captions_like_det20():
    (frame,) = bdd.decode_frames(encode(per_image_file()), "labels/100k/train/x.json")
    assert frame.name == NAME and frame.stem == NAME and frame.timestamp == 10000
    assert (frame.weather, frame.scene, frame.timeofday) == ("clear", "city street", "night")
    labels = frame.label_list()
    assert len(labels) == len(SCENE) + 4 and frame.labels_state == "ok"
    assert [bdd.category_of(lab).det_class for lab in labels[: len(SCENE)]] == [s[0] for s in SCENE]
    areas = labels[len(SCENE) :]
    assert all(lab.has_polygon and bdd.category_of(lab) == bdd.Category(None, False, True) for lab in areas)
    assert [bdd.light_color(lab) for lab in labels[7:11]] == ["red", "red", "green", None]
    assert bdd.detect_format([frame]) == "legacy"
    report = bdd.LabelReport()
    report.check_frame(frame)
    assert report.lines() == []  # area/... and lane/... are known categories, "none" a known colour
    assert caption(frame) == SCENE_CAPTION


def test_per_image_file_without_objects_and_with_several_frames(tmp_path):
    empty = dict(per_image_file(), frames=[{"timestamp": 10000}])
    (frame,) = bdd.decode_frames(encode(empty))
    assert frame.labels_state == "absent" and frame.name == NAME
    (frame,) = bdd.decode_frames(
        encode(dict(per_image_file(), frames=[{"timestamp": 10000, "objects": None}]))
    )
    assert frame.labels_state == "null"
    two = per_image_file()
    two["frames"] = two["frames"] * 2
    path = write(tmp_path / f"{NAME}.json", encode(two))
    with pytest.raises(UserError, match=rf"{NAME}\.json: a per-image label file with 2 frames"):
        bdd.load_frames(path)
    bad = per_image_file()
    bad["frames"][0]["objects"][0]["box2d"]["x1"] = "left"
    with pytest.raises(
        UserError, match=r"x\.json: not a BDD100K label file: .*`\$\.frames\[0\]\.objects\[0\]"
    ):
        bdd.decode_frames(encode(bad), "x.json")


def test_per_image_folder_through_bdd_data_dir_gives_det20_captions(tmp_path, caplog):
    """labels/100k/train/<name>.json found by --bdd_data_dir (no det_20, no legacy file): det_20's bytes."""
    det = write(
        tmp_path / "det" / "labels" / "det_20" / "det_train.json", encode([det20_frame(), det20_frame(OTHER)])
    )
    root = tmp_path / "bdd100k"
    folder = root / "labels" / "100k" / "train"
    write(folder / f"{NAME}.json", encode(per_image_file()))
    write(folder / f"{OTHER}.json", encode(per_image_file(OTHER), bom=True))
    (folder / "README.txt").write_text("not a label file")
    assert (
        run_captions("--labels_file", str(det), "--caption_txt_output_folder", str(tmp_path / "from_det"))
        == 0
    )
    with caplog.at_level("INFO", logger="bdd-sdxl.captions"):
        code = run_captions("--bdd_data_dir", str(root), "--caption_txt_output_folder", str(tmp_path / "out"))
    assert code == 0
    assert "(per-image files, legacy)" in caplog.text
    assert "objects by class:" in caplog.text and "area" not in caplog.text.split("objects by class:")[1]
    captions = read_all(tmp_path / "out")
    assert list(captions) == [f"{NAME}.txt", f"{OTHER}.txt"]
    assert captions == read_all(tmp_path / "from_det")
    assert captions[f"{NAME}.txt"] == (SCENE_CAPTION + "\n").encode()
    # one such file, named directly
    one = folder / f"{NAME}.json"
    assert run_captions("--labels_file", str(one), "--caption_txt_output_folder", str(tmp_path / "one")) == 0
    assert read_all(tmp_path / "one") == {f"{NAME}.txt": captions[f"{NAME}.txt"]}


def test_per_image_folder_errors_name_the_file(tmp_path, capsys):
    folder = tmp_path / "labels"
    write(folder / f"{NAME}.json", encode(per_image_file()))
    write(folder / f"{OTHER}.json", b'{"name": "x", "frames": [}')
    out = str(tmp_path / "out")
    assert run_captions("--labels_file", str(folder), "--caption_txt_output_folder", out) == 2
    err = capsys.readouterr().err
    assert f"{folder / OTHER}.json: malformed JSON" in err and "line 1" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert run_captions("--labels_file", str(empty), "--caption_txt_output_folder", out) == 2
    assert f"no .json label files in {empty} (found: notes.txt)" in capsys.readouterr().err


def test_layout_check_reads_a_per_image_folder(tmp_path):
    """Stage 4's layout check finds the source boxes in a per-image folder as in det_20 (shared reader)."""
    from annotation.layout import LayoutSources, SourceRef

    det = write(tmp_path / "det_val.json", encode([det20_frame()]))
    folder = tmp_path / "100k" / "val"
    write(folder / f"{NAME}.json", encode(per_image_file()))
    boxes = []
    for labels in (det, folder):
        ref = SourceRef(source_frame=f"{NAME}.jpg", source_labels=labels, source_size=(1280, 720))
        found, why = LayoutSources().source_boxes(ref, (640, 360), set(range(10)))
        assert found is not None, why
        boxes.append(found)
    assert boxes[0] == boxes[1] and len(boxes[0]) == len(SCENE)


# ---------------------------------------------------------------------------------------------------------------
# Scalabel exports
# ---------------------------------------------------------------------------------------------------------------


def test_scalabel_export_reads_every_variant():
    frames = bdd.decode_frames(encode(scalabel_export(), bom=True), "export.json")
    assert [f.stem for f in frames] == [NAME, "0000f77c-6257be58", OTHER, "ac6d4f42-00000000"]
    assert [f.labels_state for f in frames] == ["ok", "null", "ok", "empty"]
    scene = frames[0].label_list()
    assert [lab.id for lab in scene[:3]] == [0, 1, 2]
    lights = scene[7:11]  # capitalised and lower-case keys alternate; colours are [index, code] lists
    assert [bdd.light_color(lab) for lab in lights] == ["red", "red", "green", None]
    assert [lab.attributes.light for lab in lights] == ["R", "R", "G", "NA"]
    assert all(lab.attributes.is_occluded and not lab.attributes.is_truncated for lab in scene[: len(SCENE)])
    assert not any(lab.has_polygon for lab in scene[: len(SCENE)])  # "poly2d": null is no polygon
    assert scene[-1].has_polygon and scene[-1].attributes is None
    assert caption(frames[0]) == SCENE_CAPTION
    # null attribute values read "undefined" (omitted from captions); a null attributes object likewise
    assert (frames[2].weather, frames[2].scene, frames[2].timeofday) == ("undefined", "highway", "undefined")
    assert frames[3].weather == "undefined"
    assert caption(frames[2]) == "A dashcam photo of a highway, with a car. A car far ahead."
    report = bdd.LabelReport()
    for frame in frames:
        report.check_frame(frame)
    assert report.lines() == []


def test_bom_on_a_det20_list_and_errors_keep_their_lines():
    (frame,) = bdd.decode_frames(encode([det20_frame()], bom=True))
    assert frame.stem == NAME and caption(frame) == SCENE_CAPTION
    with pytest.raises(UserError, match=r"malformed JSON: .* at line 2"):
        bdd.decode_frames(b"\xef\xbb\xbf[\n {]", "bom.json")


def test_other_light_values_are_reported_not_fatal():
    frame = det20_frame()
    frame["labels"][7]["attributes"] = {"Traffic Light Color": [2]}  # an index without its code: unknown
    frame["labels"][8]["attributes"] = {
        "trafficLightColor": None,
        "Traffic Light Color": "R",
    }  # null: the other
    (decoded,) = bdd.decode_frames(encode([frame]))
    report = bdd.LabelReport()
    report.check_frame(decoded)
    assert report.unknown_light_colors == {"[2]": 1}
    assert (
        "with a red traffic light, a green traffic light, two other traffic lights, a pedestrian"
        in caption(decoded)
    )


def test_label_without_category_is_counted_as_unknown():
    frame = det20_frame()
    frame["labels"][0]["category"] = None
    del frame["labels"][1]["category"]
    (decoded,) = bdd.decode_frames(encode([frame]))
    report = bdd.LabelReport()
    report.check_frame(decoded)
    assert report.unknown_categories == {"(none)": 2}
    assert "bus" not in caption(decoded) and "truck" not in caption(decoded)


def test_object_without_frames_is_a_clear_error():
    with pytest.raises(UserError, match=r'x\.json: not a BDD100K label file: a JSON object without "frames"'):
        bdd.decode_frames(b'{"config": null}', "x.json")
    with pytest.raises(UserError, match=r"not a BDD100K label file: .*\$\.frames\[0\].*labels/100k/train"):
        bdd.decode_frames(b'{"frames": [{"labels": []}]}', "x.json")


def test_url_and_png_names_match_images_by_stem():
    assert bdd.stem(f"https://host/bdd100k/images/100k/train/{NAME}.jpg?X-Amz-Signature=a/b.c") == NAME
    assert bdd.stem(f"s3://bucket/some%20folder/{NAME}.png") == NAME
    assert bdd.stem(f"{NAME}.png") == bdd.stem(NAME) == NAME


def test_scalabel_captions_pair_with_images_in_the_lora_csv(tmp_path):
    """Captions written from URL/.png frame names carry the image's stem, so the CSV pairs them with the .jpg."""
    from convert import lora_bdd_to_huggingface_csv as lora_csv
    from convert.hf_csv import IMAGE_WITHOUT_CAPTION

    labels = write(tmp_path / "export.json", encode(scalabel_export(), bom=True))
    captions = tmp_path / "captions"
    assert run_captions("--labels_file", str(labels), "--caption_txt_output_folder", str(captions)) == 0
    assert sorted(p.name for p in captions.iterdir()) == [f"{NAME}.txt", f"{OTHER}.txt"]
    images = tmp_path / "images"
    images.mkdir()
    for name in (NAME, OTHER, "0000f77c-6257be58"):
        Image.new("RGB", (8, 8)).save(images / f"{name}.jpg")
    argv = [
        "--images_path",
        str(images),
        "--captions_path",
        str(captions),
        "--output_folder",
        str(tmp_path / "csv"),
    ]
    assert run_main(lora_csv.main, [*argv, "--split", "train"]) == 0
    rows = (tmp_path / "csv" / "bdd_hf_dataset_lora_train.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and rows[1].startswith(str(images / f"{NAME}.jpg"))  # header + 2 rows
    assert SCENE_CAPTION in rows[1]
    unmatched = (tmp_path / "csv" / "unmatched_lora_train.txt").read_text(encoding="utf-8")
    assert unmatched.strip() == f"{IMAGE_WITHOUT_CAPTION}\t{images / '0000f77c-6257be58.jpg'}"


# ---------------------------------------------------------------------------------------------------------------
# Segmentation masks: palette indices are the ids, whatever the palette
# ---------------------------------------------------------------------------------------------------------------

IDS = np.array([[*range(0, 10)], [*range(10, 19), 255]], dtype=np.uint8).repeat(2, axis=0)  # 4x10: every id


def grey_palette() -> list[int]:
    return [v for i in range(256) for v in (i, i, i)]


def shuffled_official_palette() -> list[int]:
    """The official colours at other indices: read through RGB it would give *valid but wrong* ids."""
    order = np.random.default_rng(0).permutation(256)
    official = np.array(bdd.seg_palette(), dtype=np.uint8).reshape(256, 3)
    return official[order].reshape(-1).tolist()


def random_palette() -> list[int]:
    return np.random.default_rng(1).integers(0, 256, 768).tolist()


PALETTES = {
    "official": bdd.seg_palette,
    "grey_identity": grey_palette,
    "shuffled_official": shuffled_official_palette,
    "random": random_palette,
}


def p_mask(palette: list[int]) -> Image.Image:
    im = Image.fromarray(IDS, mode="P")
    im.putpalette(palette)
    return im


def mask_files(folder: Path) -> dict[str, Path]:
    """Every accepted kind: L, P with each palette, and an RGB rendering of the official palette."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {
        "L": Image.fromarray(IDS, mode="L"),
        "rgb_rendering": Image.fromarray(bdd.ids_to_palette_rgb(IDS)),
    }
    kinds.update({f"P_{name}": p_mask(make()) for name, make in PALETTES.items()})
    paths = {}
    for kind, im in kinds.items():
        im.save(folder / f"{kind}.png")
        paths[kind] = folder / f"{kind}.png"
    with Image.open(paths["P_grey_identity"]) as im:
        assert im.mode == "P"  # PIL keeps a grey palette as P: the case under test
    return paths


def test_read_ids_reads_every_palette_as_indices(tmp_path):
    from ai.controlnet.conditioning import read_ids

    for kind, path in mask_files(tmp_path).items():
        for src in (path, path.read_bytes()):
            got = read_ids(src, expected_size=(10, 4), name=kind)
            assert got.mode == "L"
            np.testing.assert_array_equal(np.asarray(got), IDS, err_msg=kind)


def test_p_with_the_official_palette_and_its_rgb_rendering_are_not_confused(tmp_path):
    """Same ids from both, by different routes: P by index (its RGB conversion is a rendering, not ids)."""
    from ai.controlnet.conditioning import read_ids

    paths = mask_files(tmp_path)
    with Image.open(paths["P_official"]) as p, Image.open(paths["rgb_rendering"]) as rgb:
        assert (p.mode, rgb.mode) == ("P", "RGB")
        np.testing.assert_array_equal(np.asarray(p.convert("RGB")), np.asarray(rgb))
        assert not np.array_equal(np.asarray(p.convert("L")), IDS)  # luminance is not the id
    for kind in ("P_official", "rgb_rendering"):
        np.testing.assert_array_equal(np.asarray(read_ids(paths[kind])), IDS)
    # a shuffled palette shows official colours at other indices: only reading the index gives the ids
    with Image.open(paths["P_shuffled_official"]) as p:
        through_rgb = bdd.palette_rgb_to_ids(np.asarray(p.convert("RGB")))
    assert not np.array_equal(through_rgb, IDS)
    np.testing.assert_array_equal(np.asarray(read_ids(paths["P_shuffled_official"])), IDS)


def test_shared_reader_and_csv_writer_read_p_masks_as_indices(tmp_path):
    from convert import controlnet_bdd_to_huggingface_csv as controlnet_csv

    paths = mask_files(tmp_path / "kinds")
    for kind, path in paths.items():
        if kind == "rgb_rendering":
            with pytest.raises(UserError, match=r"mode RGB.*colour rendering.*\(mode P\)"):
                bdd.read_label_mask(path)
        else:
            np.testing.assert_array_equal(bdd.read_label_mask(path, expected_size=(10, 4)), IDS, err_msg=kind)
    # stage 1's ControlNet CSV: P masks with any palette pass the checks, and their palette renderings
    # (--palette_rgb) are the official colours of their indices
    images, captions, masks = (tmp_path / k for k in ("images", "captions", "masks"))
    for folder in (images, captions, masks):
        folder.mkdir()
    for name in PALETTES:
        Image.new("RGB", (10, 4)).save(images / f"{name}.jpg")
        (captions / f"{name}.txt").write_text("A dashcam photo of a road.\n", encoding="utf-8")
        (masks / f"{name}.png").write_bytes(paths[f"P_{name}"].read_bytes())
    out = tmp_path / "csv"
    argv = ["--images_path", str(images), "--captions_path", str(captions), "--conditions_path", str(masks)]
    assert (
        run_main(controlnet_csv.main, [*argv, "--output_folder", str(out), "--split", "t", "--palette_rgb"])
        == 0
    )
    for name in PALETTES:
        with Image.open(out / "conditioning_rgb" / "t" / f"{name}.png") as im:
            np.testing.assert_array_equal(np.asarray(im), bdd.ids_to_palette_rgb(IDS), err_msg=name)


def test_training_and_inference_paths_read_p_masks_as_indices(tmp_path):
    """The ControlNet trainer's row condition and inference's mask folder, on every kind of mask."""
    from ai.common import data
    from ai.controlnet import conditioning, control, masks

    paths = mask_files(tmp_path / "masks")
    image = tmp_path / "image.png"
    Image.new("RGB", (10, 4)).save(image)
    plan = data.CropPlan(original=(10, 4), resized=(10, 4), bucket=(10, 4), top=0, left=0, flip=False)
    expected = conditioning.ids_to_tensor(IDS, "one_hot").numpy()
    for kind, path in paths.items():
        for src in (str(path), path.read_bytes()):  # a CSV path, or bytes from a datasets table
            row = data.Row(0, str(image), "x", (10, 4), src, image.name)
            np.testing.assert_array_equal(control.RowCondition("one_hot")(row, plan).numpy(), expected, kind)
    listed = masks.list_masks(str(tmp_path / "masks"))
    assert sorted(m.name for m in listed) == sorted(paths)
    # what generation reads for each listed mask (infer_controlnet_sdxl: read_ids(mask_path))
    for mask in listed:
        np.testing.assert_array_equal(np.asarray(conditioning.read_ids(str(mask.path))), IDS, mask.name)


def test_mini_bdd_writer_colormaps_are_p_with_index_ids(tmp_path):
    """make_mini_bdd writes masks (L) and colormaps (P, official palette) that every reader takes as the same ids."""
    from ai.controlnet.conditioning import read_ids
    from mini_bdd.make import _colormap

    colormap = _colormap(Image.fromarray(IDS, mode="L"), bdd.seg_palette())
    buf = io.BytesIO()
    colormap.save(buf, format="PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.mode == "P" and im.getpalette()[:57] == bdd.seg_palette()[:57]
    np.testing.assert_array_equal(np.asarray(read_ids(buf.getvalue())), IDS)
    write(tmp_path / "c.png", buf.getvalue())
    np.testing.assert_array_equal(bdd.read_label_mask(tmp_path / "c.png"), IDS)
