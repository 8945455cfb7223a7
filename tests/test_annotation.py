"""annotation/yolo_annotate_folders.py: real detections from a tiny detector trained here, offline, end to end.

The session fixture ``detector`` trains yolov8n.yaml on the mini-BDD100K scenes (tests/yolo_fixture.py, cached
across sessions), so labels, layout scores and the written dataset come from real inference, not stubs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from yolo_fixture import DetectorParams, cached_detector, training_boxes

from annotation import dataset
from annotation.layout import LayoutSources, match_boxes, read_metadata
from annotation.settings import COCO_TO_BDD, AnnotationConfig, resolve_class_map
from annotation.yolo_annotate_folders import main
from core.cli import UserError, run_main
from core.config import load_config
from vocab import bdd

PARAMS = DetectorParams()
SCRIPT = Path(__file__).resolve().parents[1] / "annotation" / "yolo_annotate_folders.py"
LABEL_LINE = re.compile(r"^\d \d\.\d{6} \d\.\d{6} \d\.\d{6} \d\.\d{6}$")
#: the default thresholds (conf 0.1, min_confidence 0.25) with the tiny detector's training size
RUN_FLAGS = ["--imgsz", str(PARAMS.imgsz), "--batch", "4", "--device", "cpu"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def detector(mini_bdd, tmp_path_factory) -> Path:
    return cached_detector(mini_bdd, tmp_path_factory.mktemp("yolo_detector"), PARAMS)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connect or name lookup raises and is recorded; the test fails if any was tried."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:120])
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert attempts == [], f"network was attempted: {attempts}"


def annotate(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_main(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def frames_by_name(mini_bdd: Path, split: str = "train") -> dict[str, bdd.Frame]:
    return {f.name: f for f in bdd.load_frames(mini_bdd / "labels" / "det_20" / f"det_{split}.json")}


def big_vehicle_boxes(
    frame: bdd.Frame, width: int, height: int, scale: float = 1.0
) -> list[tuple[int, list[float]]]:
    """The boxes the detector was trained on, as (YOLO id, continuous xyxy) scaled by ``scale``."""
    return [
        (cls, [box.x1 * scale, box.y1 * scale, (box.x2 + 1) * scale, (box.y2 + 1) * scale])
        for _, (cls, box) in training_boxes(frame, width, height, PARAMS)
    ]


def read_labels(path: Path, width: int, height: int) -> list[tuple[int, list[float]]]:
    out = []
    for line in path.read_text().splitlines():
        cls, cx, cy, w, h = line.split()
        cx, cy, w, h = float(cx) * width, float(cy) * height, float(w) * width, float(h) * height
        out.append((int(cls), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    return out


def manifest(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def annotated(mini_bdd, detector, tmp_path_factory):
    """One offline run over the mini-BDD train frames plus a png in a subfolder, a blank, a corrupt file."""
    root = tmp_path_factory.mktemp("annotate")
    gen = root / "gen"
    shutil.copytree(mini_bdd / "images" / "100k" / "train", gen)
    (gen / "sub").mkdir()
    first = sorted(gen.glob("*.jpg"))[0]
    Image.open(first).save(gen / "sub" / f"{first.stem}.png")
    Image.new("RGB", (320, 180), (128, 128, 128)).save(gen / "blank.jpg")
    (gen / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = root / "out"
    return gen, out


# ---------------------------------------------------------------------------------------------------------------
# config, class map, matching, split: no model needed
# ---------------------------------------------------------------------------------------------------------------


def test_config_file_loads_through_schema_and_matches_defaults(repo_root):
    cfg = load_config(AnnotationConfig, repo_root / "config" / "annotation.yaml")
    assert cfg == AnnotationConfig()
    text = (repo_root / "config" / "annotation.yaml").read_text()
    keys = ("conf", "iou", "imgsz", "batch", "device", "max_det", "min_confidence", "min_detections")
    labels = ("source", "policy", "geometry", "confirm_min_confidence", "detector_only_min_confidence")
    for key in (*keys, *labels, "max_disagreement"):
        assert re.search(rf"#[^\n]*\n\s*{key}:", text) or f"# {key}" in text, f"{key} has no comment"


def test_bad_config_values_name_their_keys(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("predict:\n  imgsz: 8\nfilter:\n  min_confidnce: 0.3\nsplit:\n  val_fraction: 2\n")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    code, _, err = annotate(
        capsys, "--input_folder", tmp_path / "in", "--output_folder", tmp_path / "o", "--config", config
    )
    assert code == 2
    assert f"error: {config} with flags: invalid config" in err
    assert "predict.imgsz: Input should be greater than or equal to 32 (got 8)" in err
    assert "filter.min_confidnce: unknown key (did you mean 'min_confidence', " in err
    assert "split.val_fraction: Input should be less than or equal to 1 (got 2)" in err
    code, _, err = annotate(
        capsys, "--input_folder", tmp_path / "in", "--output_folder", tmp_path / "o", "--conf", "0.5"
    )
    assert code == 2 and "filter.min_confidence (0.25) is below predict.conf (0.5)" in err
    assert not (tmp_path / "o").exists()


def test_unknown_bdd_class_in_class_map_lists_valid_ones(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    base = ["--input_folder", tmp_path / "in", "--output_folder", tmp_path / "o"]
    code, _, err = annotate(capsys, *base, "--class_map", "person=pedestrain,car=car")
    assert code == 2
    assert (
        "class_map['person']: 'pedestrain' is not a BDD100K detection class (did you mean 'pedestrian'?)"
        in err
    )
    assert (
        "valid classes: pedestrian, rider, car, truck, bus, train, motorcycle, bicycle, traffic light, traffic sign"
        in err
    )
    map_file = tmp_path / "map.yaml"
    map_file.write_text("person: pedestrian\nvan: vehicle\n")
    with pytest.raises(UserError, match=r"map.yaml: 'van': 'vehicle' is not a BDD100K detection class"):
        resolve_class_map({0: "person", 1: "van"}, str(map_file), None)


def test_class_map_resolution():
    from annotation.yolo_runtime import coco_names

    coco = coco_names()
    ids, origin = resolve_class_map(coco, None, None)
    assert origin == "COCO -> BDD100K default"
    assert ids == {0: 0, 1: 7, 2: 2, 3: 6, 5: 4, 6: 5, 7: 3, 9: 8, 11: 9}  # the reference note's table
    assert {coco[k] for k in ids} == set(COCO_TO_BDD)
    ids, _ = resolve_class_map(coco, None, ["car", "bus"])
    assert ids == {2: 2, 5: 4}
    bdd_names = dict(enumerate(bdd.DET_CLASSES))
    ids, origin = resolve_class_map(bdd_names, "auto", None)
    assert ids == {i: i for i in range(10)} and origin.startswith("identity")
    ids, _ = resolve_class_map({0: "vehicle", 1: "human", 2: "dog"}, {0: "car", "human": "pedestrian"}, None)
    assert ids == {0: 2, 1: 0}  # by id and by name; the unmapped class is dropped
    with pytest.raises(UserError, match=r"the model has no class 'humans' \(did you mean 'human'\?\)"):
        resolve_class_map({0: "vehicle", 1: "human"}, {"humans": "pedestrian"}, None)
    with pytest.raises(UserError, match="no model class maps to a BDD100K class"):
        resolve_class_map({0: "cat", 1: "dog"}, None, None)


def test_match_boxes_is_classwise_and_greedy_by_confidence():
    src = [(2, [0, 0, 10, 10]), (2, [20, 0, 30, 10]), (0, [40, 0, 45, 10])]
    dets = [
        (2, 0.9, [0, 0, 10, 10]),  # exact match
        (2, 0.8, [1, 0, 11, 10]),  # same box again: its best partner is taken, the other car is too far
        (0, 0.7, [20, 0, 30, 10]),  # right place, wrong class
        (0, 0.6, [40, 0, 45, 9]),  # pedestrian, IoU 0.9
    ]
    r = match_boxes(dets, src, 0.5)
    assert (r.matched, r.n_source, r.n_detected) == (2, 3, 4)
    assert r.recall == pytest.approx(2 / 3) and r.precision == pytest.approx(0.5)
    assert r.score == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # the lower-confidence detection does not steal the box from the higher one
    r = match_boxes([(2, 0.3, [0, 0, 10, 10]), (2, 0.9, [0, 0, 10, 6])], [(2, [0, 0, 10, 10])], 0.5)
    assert r.matched == 1
    assert (
        match_boxes([], [], 0.5).score == 1.0
        and match_boxes([(2, 0.5, [0, 0, 1, 1])], [], 0.5).precision == 0
    )


def test_split_is_stable_per_image():
    keys = [f"gen/{i:05d}.png" for i in range(2000)]
    splits = {k: dataset.split_of(k, 0, 0.2) for k in keys}
    assert 0.17 < sum(s == "val" for s in splits.values()) / len(keys) < 0.23
    more = keys + [f"gen/new_{i}.png" for i in range(500)]
    assert all(dataset.split_of(k, 0, 0.2) == splits[k] for k in keys)  # new images reshuffle nothing
    assert sum(dataset.split_of(k, 1, 0.2) != splits[k] for k in keys) > 300  # the seed matters
    assert len(more) == 2500
    taken: set[str] = set()
    assert [dataset.unique_stem(k, taken) for k in ("a/b.png", "a/b.jpg", "a__b.png")] == [
        "a__b",
        "a__b_jpg",
        "a__b_png",
    ]


def test_layout_sources_read_metadata_and_scale_from_mask(mini_bdd, tmp_path):
    frame = next(f for f in frames_by_name(mini_bdd).values() if training_boxes(f, 320, 180, PARAMS))
    mask = tmp_path / "mask.png"
    Image.new("L", (320, 180)).save(mask)
    meta = tmp_path / "metadata.jsonl"
    labels = mini_bdd / "labels" / "det_20" / "det_train.json"
    meta.write_text(
        json.dumps(
            {
                "file": "x.png",
                "source_frame": frame.name,
                "source_labels": str(labels),
                "mask_path": "mask.png",
            }
        )
        + "\n\n"
        + json.dumps({"file": "sub/y.png", "source_frame": "nope.jpg", "source_labels": str(labels)})
        + "\n"
    )
    refs = read_metadata(meta)
    assert set(refs) == {"x.png", "y.png"} and refs["x.png"].mask_path == mask
    sources = LayoutSources()
    boxes, _ = sources.source_boxes(refs["x.png"], (640, 360), {2}, 0.0)
    want = [b for c, b in big_vehicle_boxes(frame, 320, 180, scale=2.0) if c == 2]
    got = [b for _, b in boxes]
    assert all(any(bdd.box_iou(w, g) > 0.999 for g in got) for w in want)  # 2x scale from the mask's size
    assert sources.source_boxes(refs["y.png"], (640, 360), {2}) == (None, f"frame nope.jpg not in {labels}")
    meta.write_text('{"file": "x.png"}\n{"source_frame": 3}\n')
    with pytest.raises(UserError, match=r'metadata.jsonl:2: a record needs "file"'):
        read_metadata(meta)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs through the command line
# ---------------------------------------------------------------------------------------------------------------


def test_missing_model_file_says_where_weights_come_from(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    missing = tmp_path / "weights" / "yolov8x.pt"
    code, _, err = annotate(
        capsys, "--input_folder", tmp_path / "in", "--output_folder", tmp_path / "o", "--model", missing
    )
    assert code == 2
    assert f"error: model weights not found: {missing}. This tool never downloads weights." in err
    assert "https://github.com/ultralytics/assets/releases" in err and "--model yolov8n.yaml" in err
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start


def test_empty_or_missing_input_folder(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    code, _, err = annotate(capsys, "--input_folder", tmp_path / "empty", "--output_folder", tmp_path / "o")
    assert code == 2
    assert (
        f"error: no images (.jpg, .jpeg, .png, .webp) found under {tmp_path / 'empty'} (searched recursively)"
        in err
    )
    code, _, err = annotate(capsys, "--input_folder", tmp_path / "nope", "--output_folder", tmp_path / "o")
    assert code == 2 and f"error: input folder not found: {tmp_path / 'nope'}" in err


# ---------------------------------------------------------------------------------------------------------------
# end to end with the trained detector
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_annotates_folder_offline_into_a_yolo_dataset(annotated, mini_bdd, detector, capsys, no_network):
    gen, out = annotated
    code, stdout, err = annotate(
        capsys, "--input_folder", gen, "--output_folder", out, "--model", detector, *RUN_FLAGS,
        "--min_detections", "0", "--val_fraction", "0.3",
    )  # fmt: skip
    assert code == 0, err
    records = manifest(out)
    n_images = len(list(gen.rglob("*.jpg"))) + len(list(gen.rglob("*.png")))
    assert len(records) == n_images
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_seen"] == n_images and summary["images_annotated_now"] == n_images - 1
    assert summary["unreadable_now"] == ["gen/corrupt.jpg"]
    assert records["gen/corrupt.jpg"]["status"] == "rejected" and records["gen/corrupt.jpg"]["reasons"] == [
        "unreadable"
    ]
    assert (
        "unreadable: gen/corrupt.jpg" in stdout
        and f"train with: yolo train data={(out / 'data.yaml').resolve()}" in stdout
    )

    # labels: five columns, six decimals, confidences beside them, an empty file for an image with nothing found
    accepted = [r for r in records.values() if r["status"] == "accepted"]
    assert len(accepted) == n_images - 1 and {r["split"] for r in accepted} == {"train", "val"}
    for r in accepted:
        image, label, conf = dataset.dataset_paths(out, r["split"], r)
        assert image.is_file() and os.path.samefile(image, r["source"])  # hardlinked
        lines = label.read_text().splitlines()
        assert all(LABEL_LINE.match(line) for line in lines), lines
        assert len(lines) == r["kept"] == len(conf.read_text().splitlines())
        assert [float(c) for c in conf.read_text().split()] == [
            d["confidence"] for d in r["detections"] if d["confidence"] >= 0.25
        ]
    blank = records["gen/blank.jpg"]
    assert blank["kept"] == 0 and dataset.dataset_paths(out, blank["split"], blank)[1].read_text() == ""

    # the labels sit on the drawn vehicles of the frames the detector was trained on: recall over the big cars,
    # precision over every drawn car box (small and det_20's "other vehicle" included: they are cars in the pixels)
    frames = frames_by_name(mini_bdd)
    found = n_big = on_a_car = n_labels = 0
    for r in accepted:
        frame = frames.get(Path(r["source"]).name)
        if frame is None:
            continue
        big = big_vehicle_boxes(frame, r["width"], r["height"])
        if not big:
            continue  # not a frame the detector was trained on
        labels = read_labels(dataset.dataset_paths(out, r["split"], r)[1], r["width"], r["height"])
        drawn = [
            (bdd.DET_CLASS_YOLO_ID["car"], [lb.box2d.x1, lb.box2d.y1, lb.box2d.x2 + 1, lb.box2d.y2 + 1])
            for lb in frame.label_list()
            if lb.box2d is not None and bdd.category_of(lb).det_class == "car"
        ]
        found += match_boxes([(c, 1.0, b) for c, b in labels], big, 0.5).matched
        on_a_car += match_boxes([(c, 1.0, b) for c, b in labels], drawn, 0.5).matched
        n_big, n_labels = n_big + len(big), n_labels + len(labels)
    assert n_big >= 10
    # the tiny detector (1-3 CPU minutes from scratch) finds 70-100% of them; a real one does far better
    assert found / n_big >= 0.6, (found, n_big, on_a_car, n_labels)
    assert on_a_car / n_labels >= 0.5, (found, n_big, on_a_car, n_labels)

    # data.yaml: absolute path, the 10 BDD classes, nothing to download
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["path"] == str(out.resolve()) and Path(data["path"]).is_absolute()
    assert data["names"] == dict(enumerate(bdd.DET_CLASSES)) and "download" not in data
    assert (data["train"], data["val"]) == ("images/train", "images/val")

    # review material and manifests
    for r in records.values():
        if r["key"] != "gen/corrupt.jpg":
            assert Image.open(out / "previews" / f"{r['out_stem']}.jpg").size == (320, 180)
    assert Image.open(out / "contact_sheet.jpg").width > 320
    rows = (out / "manifest.csv").read_text().splitlines()
    assert len(rows) == n_images + 1 and rows[0].startswith("key,status,reasons,split,out_stem")


@pytest.mark.slow
def test_yolo_train_runs_one_epoch_on_the_written_dataset(annotated, tmp_path):
    _, out = annotated
    if not (out / "data.yaml").exists():
        pytest.skip("needs test_annotates_folder_offline_into_a_yolo_dataset")
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    model.train(
        data=str(out / "data.yaml"), epochs=1, imgsz=96, batch=4, workers=0, device="cpu", amp=False, plots=False,
        project=str(tmp_path / "runs"), name="one_epoch", verbose=False,
    )  # fmt: skip
    assert (tmp_path / "runs" / "one_epoch" / "weights" / "last.pt").is_file()
    header, *rows = (tmp_path / "runs" / "one_epoch" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 and "metrics/mAP50(B)" in header


@pytest.mark.slow
def test_rerun_resumes_without_duplicating(mini_bdd, detector, tmp_path, capsys):
    gen = tmp_path / "gen"
    gen.mkdir()
    sources = sorted((mini_bdd / "images" / "100k" / "train").glob("*.jpg"))[:4]
    for src in sources[:3]:
        shutil.copy(src, gen / src.name)
    out = tmp_path / "out"
    args = [
        "--input_folder",
        gen,
        "--output_folder",
        out,
        "--model",
        detector,
        *RUN_FLAGS,
        "--min_detections",
        "0",
    ]
    assert annotate(capsys, *args)[0] == 0

    def snapshot():
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.txt")) if "labels" in p.parts}

    first, first_manifest = snapshot(), (out / "manifest.jsonl").read_text()
    code, stdout, _ = annotate(capsys, *args)
    assert code == 0 and "annotated now: 0, skipped (already done): 3" in stdout
    assert snapshot() == first and (out / "manifest.jsonl").read_text() == first_manifest

    shutil.copy(sources[3], gen / sources[3].name)  # one new image: only it goes through the detector
    code, stdout, _ = annotate(capsys, *args)
    assert code == 0 and "annotated now: 1 at" in stdout and "skipped (already done): 3" in stdout
    after = snapshot()
    assert {k: v for k, v in after.items() if k in first} == first and len(after) == 4
    assert len(manifest(out)) == 4

    # a stricter filter re-decides from the recorded detections, without the detector, and removes files
    code, stdout, _ = annotate(capsys, *args[:-2], "--min_detections", "50")
    assert code == 0 and "annotated now: 0" in stdout and "too_few_detections: 4" in stdout
    assert f"YOLO dataset {(out / 'data.yaml').resolve()} is empty: no image was accepted" in stdout
    assert "train with:" not in stdout
    assert not list((out / "labels").rglob("*.txt")) and not list((out / "images").rglob("*.jpg"))


@pytest.mark.slow
def test_layout_scores_separate_matching_from_mismatched_sources(mini_bdd, detector, tmp_path, capsys):
    """Generated images at 2x size; half name their true source frame, half a frame with other car boxes."""
    frames = frames_by_name(mini_bdd)
    images = mini_bdd / "images" / "100k" / "train"
    with_cars = [n for n, f in frames.items() if big_vehicle_boxes(f, 320, 180) and (images / n).exists()]
    assert len(with_cars) >= 4
    gen = tmp_path / "gen"
    gen.mkdir()
    labels = mini_bdd / "labels" / "det_20" / "det_train.json"
    lines, expected = [], {}
    for i, name in enumerate(with_cars):
        file = f"{i:03d}.png"
        Image.open(images / name).resize((640, 360), Image.BICUBIC).save(gen / file)
        source = name
        if i % 2:  # the source whose big-vehicle boxes overlap this image's own ones least
            own = big_vehicle_boxes(frames[name], 320, 180)

            def overlap(other: str, own=own) -> float:
                theirs = big_vehicle_boxes(frames[other], 320, 180)
                return max(bdd.box_iou(a, b) for _, a in own for _, b in theirs)

            source = min((o for o in with_cars if o != name), key=overlap)
            assert overlap(source) < 0.5  # no source box can match a detection on this image's own cars
        expected[f"gen/{file}"] = "match" if source == name else "mismatch"
        lines.append(
            json.dumps(
                {
                    "file": file,
                    "source_frame": source,
                    "source_labels": str(labels),
                    "source_size": [320, 180],
                }
            )
        )
    (gen / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "annotation.yaml"
    config.write_text(f"filter:\n  layout_min_box_size: {2 * PARAMS.min_box_side}\n")
    code, _, err = annotate(
        capsys, "--input_folder", gen, "--output_folder", tmp_path / "out", "--config", config, "--model", detector,
        *RUN_FLAGS, "--classes", ",".join(PARAMS.classes), "--min_detections", "0",
        "--min_recall", "0.5", "--min_precision", "0",
    )  # fmt: skip
    assert code == 0, err
    records = manifest(tmp_path / "out")
    scores = {
        kind: [records[k]["layout"]["recall"] for k, v in expected.items() if v == kind]
        for kind in ("match", "mismatch")
    }
    assert all(records[k]["layout"]["n_source"] > 0 for k in expected)
    mean = {kind: sum(v) / len(v) for kind, v in scores.items()}
    assert mean["match"] - mean["mismatch"] >= 0.4, scores
    assert all(records[k]["status"] == "rejected" and "low_layout_recall" in records[k]["reasons"]
               for k, v in expected.items() if v == "mismatch"), scores  # fmt: skip
    assert (
        sum(records[k]["status"] == "accepted" for k, v in expected.items() if v == "match")
        >= len(scores["match"]) / 2
    )


def test_unknown_model_class_in_class_map(mini_bdd, detector, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "in" / "a.png")
    code, _, err = annotate(
        capsys, "--input_folder", tmp_path / "in", "--output_folder", tmp_path / "o", "--model", detector,
        "--class_map", "{automobile: car}",
    )  # fmt: skip
    assert (
        code == 2
        and "class_map: the model has no class 'automobile'; its classes: pedestrian, rider, car" in err
    )


@pytest.mark.slow
def test_fresh_process_without_offline_env_makes_no_network_call(tmp_path):
    """The script sets ultralytics' offline switches itself: run it in a new interpreter with them unset."""
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 64), (40 * i, 90, 160)).save(gen / f"{i}.webp")
    out = tmp_path / "out"
    probe = (
        "import runpy, socket, sys\n"
        "attempts = []\n"
        "def refuse(*a, **k):\n"
        "    attempts.append(repr(a)[:100]); raise OSError('blocked')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "socket.getaddrinfo = socket.create_connection = refuse\n"
        f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "finally:\n"
        "    print('NETWORK_ATTEMPTS', len(attempts), attempts, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "ULTRALYTICS_"))}
    env["HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-c", probe, "--input_folder", str(gen), "--output_folder", str(out),
         "--model", "yolov8n.yaml", "--imgsz", "64", "--conf", "0", "--min_confidence", "0"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "NETWORK_ATTEMPTS 0 []" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        out / ".ultralytics" / "Ultralytics" / "Arial.ttf"
    ).is_file()  # fonts where check_font looks first
    assert not (tmp_path / "home" / ".config" / "Ultralytics").exists()  # nothing written to the user's home
    records = manifest(out)
    assert len(records) == 2 and all(
        r["detections"] for r in records.values()
    )  # random weights, conf 0: boxes
    assert all(d["model_class"] in COCO_TO_BDD for r in records.values() for d in r["detections"])
