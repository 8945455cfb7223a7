"""The embedded mini BDD100K: real layout, real label formats, drawn scenes whose boxes, masks and pixels agree."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import run_main
from mini_bdd.make import MARKER_NAME, main, make_mini_bdd, split_counts
from mini_bdd.scene import seg_id_of
from vocab import bdd

NAME_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{8}$")
FIXTURE_SIZE = (320, 180)  # what conftest's mini_bdd uses (frames=12)


def _json(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def _stems(folder: Path, ext: str) -> set[str]:
    return {p.stem for p in folder.iterdir() if p.suffix == ext}


def test_layout_names_and_counts(mini_bdd: Path):
    counts = split_counts(12)
    images = {
        key: _stems(mini_bdd / "images" / key, ".jpg")
        for key in ("100k/train", "100k/val", "10k/train", "10k/val")
    }
    assert len(images["100k/train"]) == 12 and len(images["100k/val"]) == counts["100k/val"] == 4
    for key, names in images.items():
        assert all(NAME_RE.match(n) for n in names), key
        assert not [p for p in (mini_bdd / "images" / key).iterdir() if p.suffix != ".jpg"]
    for split in ("train", "val"):
        shared = images[f"10k/{split}"] & images[f"100k/{split}"]
        own = images[f"10k/{split}"] - images["100k/train"] - images["100k/val"]
        assert len(shared) == counts[f"10k/{split} shared"] and len(own) == counts[f"10k/{split} own"] >= 2
        # sem_seg masks and colormaps exist exactly for the 10K images of the split
        assert _stems(mini_bdd / "labels/sem_seg/masks" / split, ".png") == images[f"10k/{split}"]
        assert _stems(mini_bdd / "labels/sem_seg/colormaps" / split, ".png") == images[f"10k/{split}"]
    for key in images:
        for path in sorted((mini_bdd / "images" / key).iterdir())[:2]:
            with Image.open(path) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", FIXTURE_SIZE)


def test_det20_format_exactly(mini_bdd: Path):
    train = _json(mini_bdd, "labels/det_20/det_train.json")
    val = _json(mini_bdd, "labels/det_20/det_val.json")
    assert isinstance(train, list) and isinstance(val, list)
    w, h = FIXTURE_SIZE
    states, categories, light_codes = Counter(), Counter(), Counter()
    for split, frame in [("train", f) for f in train] + [("val", f) for f in val]:
        assert set(frame) <= {"name", "attributes", "timestamp", "labels"} and frame["timestamp"] == 10000
        assert frame["name"].endswith(".jpg") and NAME_RE.match(frame["name"][:-4])
        assert set(frame["attributes"]) == {"weather", "scene", "timeofday"}
        assert frame["attributes"]["weather"] in bdd.WEATHERS and frame["attributes"]["scene"] in bdd.SCENES
        assert frame["attributes"]["timeofday"] in bdd.TIMES_OF_DAY
        if "labels" not in frame:
            states["absent"] += 1
            continue
        labels = frame["labels"]
        states["null" if labels is None else "empty" if labels == [] else "ok"] += 1
        for label in labels or []:
            assert list(label) == ["id", "attributes", "category", "box2d"]  # no manualShape/manualAttributes
            assert isinstance(label["id"], str) and label["id"].isdigit()
            assert set(label["attributes"]) == {"occluded", "truncated", "trafficLightColor"}
            assert isinstance(label["attributes"]["occluded"], bool)
            box = label["box2d"]
            assert all(isinstance(box[k], float) for k in ("x1", "y1", "x2", "y2"))
            assert 0 <= box["x1"] <= box["x2"] <= w - 1 and 0 <= box["y1"] <= box["y2"] <= h - 1
            code = label["attributes"]["trafficLightColor"]
            if label["category"] == "traffic light":
                assert code in ("G", "R", "Y", "NA")
                light_codes[code] += 1
            else:
                assert code == "NA"
            if split == "train":
                categories[label["category"]] += 1
    assert states["absent"] >= 1 and states["null"] >= 1 and states["empty"] >= 1 and states["ok"] >= 8
    assert set(categories) == set(bdd.DET20_CATEGORIES)  # all 13, incl. other person/vehicle and trailer
    assert set(light_codes) & {"G", "R", "Y"}
    # Some 100K train images have no det_train entry at all (like the real 137); val lists every val image.
    listed = {f["name"][:-4] for f in train}
    on_disk = _stems(mini_bdd / "images/100k/train", ".jpg")
    assert listed < on_disk and len(on_disk - listed) >= 1
    assert {f["name"][:-4] for f in val} == _stems(mini_bdd / "images/100k/val", ".jpg")
    assert [f["name"] for f in train] == [
        f["name"] for f in _json(mini_bdd, "labels/bdd100k_labels_images_train.json")
    ]


def test_legacy_format_exactly(mini_bdd: Path):
    frames = _json(mini_bdd, "labels/bdd100k_labels_images_train.json")  # ids are unique within a file
    categories, c_points, ids = Counter(), 0, []
    for frame in frames:
        assert list(frame) == ["name", "attributes", "timestamp", "labels"]
        for label in frame["labels"]:
            ids.append(label["id"])
            assert (
                isinstance(label["id"], int)
                and label["manualShape"] is True
                and label["manualAttributes"] is True
            )
            categories[label["category"]] += 1
            if "box2d" in label:
                assert label["category"] in bdd.LEGACY_BOX_CATEGORIES
                assert label["attributes"]["trafficLightColor"] in bdd.LEGACY_LIGHT_WORDS
                if label["category"] != "traffic light":
                    assert label["attributes"]["trafficLightColor"] == "none"
                continue
            (poly,) = label["poly2d"]
            assert len(poly["types"]) == len(poly["vertices"]) and set(poly["types"]) <= {"L", "C"}
            c_points += poly["types"].count("C")
            if label["category"] == "lane":
                assert poly["closed"] is False
                assert set(label["attributes"]) == {"laneDirection", "laneStyle", "laneType"}
            else:
                assert label["category"] == "drivable area" and poly["closed"] is True
                assert label["attributes"]["areaType"] in ("direct", "alternative")
    assert len(ids) == len(set(ids))
    assert {"person", "car", "traffic light", "traffic sign", "lane", "drivable area"} <= set(categories)
    assert not set(categories) & {"pedestrian", "bicycle", "motorcycle", "other person", "trailer"}
    assert c_points > 0


def test_label_files_read_by_shared_loader(mini_bdd: Path):
    for split in ("train", "val"):
        det = bdd.load_frames(mini_bdd / f"labels/det_20/det_{split}.json")
        legacy = bdd.load_frames(mini_bdd / f"labels/bdd100k_labels_images_{split}.json")
        assert bdd.detect_format(det) == "det_20" and bdd.detect_format(legacy) == "legacy"
        assert [f.name for f in det] == [f.name for f in legacy]
        report = bdd.LabelReport()
        for frame in det + legacy:
            report.check_frame(frame)
        assert report.lines() == []
        # legacy boxes are the det_20 boxes under their 2018 names (ignored classes are det_20 only)
        for d, lg in zip(det, legacy, strict=True):
            det_boxes = sorted(
                (bdd.canonical_category(x.category).det_class, x.box2d.x1, x.box2d.y2)
                for x in d.label_list()
                if not bdd.canonical_category(x.category).ignored
            )
            legacy_boxes = sorted(
                (bdd.canonical_category(x.category).det_class, x.box2d.x1, x.box2d.y2)
                for x in lg.label_list()
                if x.box2d is not None
            )
            assert det_boxes == legacy_boxes
    states = Counter(f.labels_state for f in bdd.load_frames(mini_bdd / "labels/det_20/det_train.json"))
    assert states["absent"] and states["null"] and states["empty"]


def test_masks_and_colormaps(mini_bdd: Path):
    palette = bdd.seg_palette()
    seen = set()
    for split in ("train", "val"):
        for mask_path in sorted((mini_bdd / "labels/sem_seg/masks" / split).iterdir()):
            with Image.open(mask_path) as im:
                assert im.mode == "L" and im.size == FIXTURE_SIZE
            mask = bdd.read_label_mask(mask_path, FIXTURE_SIZE)  # raises on ids outside 0-18/255
            seen |= set(np.unique(mask).tolist())
            with Image.open(mini_bdd / "labels/sem_seg/colormaps" / split / mask_path.name) as cm:
                assert cm.mode == "P" and cm.getpalette()[:768] == palette
                assert np.array_equal(np.asarray(cm), mask)
                assert np.array_equal(np.asarray(cm.convert("RGB")), bdd.ids_to_palette_rgb(mask))
    # drawn scenes: stuff and things, plus unlabelled (255) pixels such as the ego car's hood
    assert {bdd.SEG_ID[c] for c in ("road", "sky", "car")} <= seen and bdd.SEG_IGNORE_ID in seen
    assert len(seen) >= 10


def test_boxes_agree_with_mask_pixels(mini_bdd: Path):
    """Each visible object's box is the extent of its class's pixels: they touch all four box edges (1 px)."""
    checked = 0
    for split in ("train", "val"):
        masks = {p.stem: p for p in (mini_bdd / "labels/sem_seg/masks" / split).iterdir()}
        for frame in bdd.load_frames(mini_bdd / f"labels/det_20/det_{split}.json"):
            if frame.stem not in masks:
                continue
            mask = bdd.read_label_mask(masks[frame.stem])
            for label in frame.label_list():
                if label.attributes.occluded:
                    continue
                b = label.box2d
                x1, y1, x2, y2 = (round(v) for v in (b.x1, b.y1, b.x2, b.y2))
                assert max(abs(b.x1 - x1), abs(b.y1 - y1), abs(b.x2 - x2), abs(b.y2 - y2)) < 0.5
                own = mask[y1 : y2 + 1, x1 : x2 + 1] == seg_id_of(label.category)
                rows, cols = np.nonzero(own.any(axis=1))[0], np.nonzero(own.any(axis=0))[0]
                assert len(rows), (frame.name, label)
                assert rows[0] <= 1 and rows[-1] >= own.shape[0] - 2, (frame.name, label.category, b)
                assert cols[0] <= 1 and cols[-1] >= own.shape[1] - 2, (frame.name, label.category, b)
                checked += 1
    assert checked >= 10


def test_box_pixels_differ_from_background(mini_bdd: Path):
    """Objects are visible in the image: inside a clear-day car box the picture differs from the road around it."""
    frames = bdd.load_frames(mini_bdd / "labels/det_20/det_train.json")
    diffs = []
    for frame in frames:
        image = np.asarray(Image.open(mini_bdd / "images/100k/train" / frame.name).convert("RGB"), np.float32)
        for label in frame.label_list():
            b = label.box2d
            if label.category != "car" or label.attributes.occluded or b.x2 - b.x1 < 6:
                continue
            x1, y1, x2, y2 = (round(v) for v in (b.x1, b.y1, b.x2, b.y2))
            inside = image[y1 : y2 + 1, x1 : x2 + 1].reshape(-1, 3)
            diffs.append(inside.std(axis=0).mean())  # windows, wheels, lights: not a flat patch
    assert diffs and np.median(diffs) > 8


def test_night_frames_are_darker(mini_bdd: Path):
    means = {"night": [], "daytime": []}
    for split in ("train", "val"):
        for frame in _json(mini_bdd, f"labels/det_20/det_{split}.json"):
            time = frame["attributes"]["timeofday"]
            if time in means:
                image = Image.open(mini_bdd / "images/100k" / split / frame["name"]).convert("L")
                means[time].append(float(np.asarray(image).mean()))
    assert means["night"] and means["daytime"]
    assert max(means["night"]) < 0.6 * min(means["daytime"]), means


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path):
    make_mini_bdd(tmp_path / "a", frames=6, size=(128, 72), seed=5)
    make_mini_bdd(tmp_path / "b", frames=6, size=(128, 72), seed=5)
    make_mini_bdd(tmp_path / "c", frames=6, size=(128, 72), seed=6)
    a, b, c = (_tree_bytes(tmp_path / k) for k in "abc")
    assert len(a) > 20 and a == b
    assert a["labels/det_20/det_train.json"] != c["labels/det_20/det_train.json"]
    assert set(a) != set(c)  # other names
    with Image.open(
        tmp_path / "a/images/100k/train" / Path(sorted(k for k in a if "100k/train" in k)[0]).name
    ) as im:
        assert im.size == (128, 72)


def test_cli_refuses_foreign_folder_and_reruns_idempotently(tmp_path: Path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run_main(main, ["--out", str(foreign), "--frames", "6", "--size", "128x72"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "bdd"
    assert run_main(main, ["--out", str(out), "--frames", "6", "--size", "128x72", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "det_train.json: 5 frames" in printed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert run_main(main, ["--out", str(out), "--frames", "6", "--size", "128x72", "--seed", "2"]) == 0
    assert "reused" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert run_main(main, ["--out", str(out), "--frames", "7", "--size", "128x72", "--seed", "2"]) == 2
    assert "frames" in capsys.readouterr().err
    assert run_main(main, ["--out", str(tmp_path / "x"), "--frames", "6", "--size", "12by7"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_labels_only_writes_det20_at_real_density(tmp_path: Path):
    summary = make_mini_bdd(tmp_path / "det", frames=700, labels_only=True, seed=1)
    files = sorted(str(p.relative_to(tmp_path / "det")) for p in (tmp_path / "det").rglob("*") if p.is_file())
    assert files == [MARKER_NAME, "labels/det_20/det_train.json", "labels/det_20/det_val.json"]
    train = bdd.load_frames(tmp_path / "det/labels/det_20/det_train.json")
    val = bdd.load_frames(tmp_path / "det/labels/det_20/det_val.json")
    assert len(train) == 700 and len(val) == 100 and summary["det_frames"] == {"train": 700, "val": 100}
    assert bdd.detect_format(train) == "det_20"
    labels = [label for f in train for label in f.label_list()]
    assert 16 < len(labels) / len(train) < 21 and summary["boxes"]["train"] == len(labels)
    shares = Counter(label.category for label in labels)
    assert shares.most_common(3)[0][0] == "car" and 0.5 < shares["car"] / len(labels) < 0.6
    assert 0.4 < np.mean([label.attributes.occluded for label in labels]) < 0.55
    assert {f.labels_state for f in train} >= {"ok", "absent"}
    assert all(0 <= label.box2d.x1 <= label.box2d.x2 <= 1279 for label in labels)
    assert len({label.id for label in labels}) == len(labels)


def test_bad_parameters_are_user_errors(tmp_path: Path):
    from core.cli import UserError

    with pytest.raises(UserError, match="at least"):
        make_mini_bdd(tmp_path / "a", frames=3)
    with pytest.raises(UserError, match="too small"):
        make_mini_bdd(tmp_path / "b", frames=6, size=(32, 18))
