"""convert/bdd_to_yolo.py: real BDD100K frames as a YOLO dataset with stage 4's ids, a condition side file and
hard-linked images; reruns that never clobber; every bad input one clear line."""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from convert.bdd_to_yolo import main
from core.cli import run_main
from vocab import bdd

REPO = Path(__file__).resolve().parents[1]


def convert(capsys, *argv) -> tuple[int, str, str]:
    code = run_main(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def frames_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "frames.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def labelled_val_frames(mini_bdd: Path) -> list[bdd.Frame]:
    return [
        f for f in bdd.load_frames(mini_bdd / "labels" / "det_20" / "det_val.json") if f.labels_state == "ok"
    ]


# ---------------------------------------------------------------------------------------------------------------
# a hand-checked frame
# ---------------------------------------------------------------------------------------------------------------


def hand_frames(tmp_path: Path) -> tuple[Path, Path]:
    """320x180 images and a det_20 file whose label lines were worked out by hand (see the test)."""
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("aaaa0001-00000001", "aaaa0002-00000002", "aaaa0004-00000004"):
        Image.new("RGB", (320, 180), (90, 90, 90)).save(images / f"{name}.jpg")
    attrs = {"weather": "rainy", "timeofday": "night", "scene": "highway"}
    frames = [
        {
            "name": "aaaa0001-00000001.jpg",
            "attributes": attrs,
            "labels": [
                {"id": "1", "category": "car", "box2d": {"x1": 10, "y1": 20, "x2": 49, "y2": 59}},
                {"id": "2", "category": "truck", "box2d": {"x1": 300, "y1": 0, "x2": 340, "y2": 9}},  # past x
                {
                    "id": "3",
                    "category": "pedestrian",
                    "box2d": {"x1": 0, "y1": 100, "x2": 9, "y2": 189},
                },  # past y
                {"id": "4", "category": "other vehicle", "box2d": {"x1": 50, "y1": 50, "x2": 60, "y2": 60}},
                {"id": "5", "category": "trailer", "box2d": {"x1": 70, "y1": 50, "x2": 80, "y2": 60}},
                {
                    "id": "6",
                    "category": "car",
                    "box2d": {"x1": 400, "y1": 10, "x2": 420, "y2": 20},
                },  # outside
            ],
        },
        {  # only an ignored box: an empty label file
            "name": "aaaa0002-00000002.jpg",
            "attributes": {"weather": "clear", "timeofday": "daytime", "scene": "city street"},
            "labels": [
                {"id": "7", "category": "other person", "box2d": {"x1": 5, "y1": 5, "x2": 9, "y2": 20}}
            ],
        },
        {"name": "aaaa0003-00000003.jpg", "attributes": attrs, "labels": [{"id": "8", "category": "car"}]},
        {"name": "aaaa0004-00000004.jpg", "attributes": attrs, "labels": None},  # unlabelled: skipped
    ]  # frame 3 has no image: counted and listed
    labels = tmp_path / "det_val.json"
    labels.write_text(json.dumps(frames))
    return labels, images


def test_hand_checked_label_lines_clipping_and_drops(tmp_path, capsys):
    labels, images = hand_frames(tmp_path)
    out = tmp_path / "yolo"
    code, stdout, err = convert(
        capsys, "--labels_file", labels, "--images_dir", images, "--split", "val", "--out", out
    )
    assert code == 0, err
    # car:        x 10..49, y 20..59 (inclusive) -> cx 30/320, cy 40/180, w 40/320, h 40/180
    # truck:      x 300..340 clipped to 319      -> cx 310/320, cy 5/180, w 20/320, h 10/180
    # pedestrian: y 100..189 clipped to 179      -> cx 5/320, cy 140/180, w 10/320, h 80/180
    assert (out / "labels" / "val" / "aaaa0001-00000001.txt").read_text() == (
        "2 0.093750 0.222222 0.125000 0.222222\n"
        "3 0.968750 0.027778 0.062500 0.055556\n"
        "0 0.015625 0.777778 0.031250 0.444444\n"
    )
    assert (out / "labels" / "val" / "aaaa0002-00000002.txt").read_text() == ""
    assert sorted(p.name for p in (out / "images" / "val").iterdir()) == [
        "aaaa0001-00000001.jpg",
        "aaaa0002-00000002.jpg",
    ]
    assert frames_csv(out) == [
        {"split": "val", "image": "images/val/aaaa0001-00000001.jpg", "weather": "rainy", "timeofday": "night",
         "scene": "highway"},
        {"split": "val", "image": "images/val/aaaa0002-00000002.jpg", "weather": "clear", "timeofday": "daytime",
         "scene": "city street"},
    ]  # fmt: skip
    assert "frames skipped: 'labels': null: 1; image missing (aaaa0003-00000003.jpg): 1" in stdout
    assert "boxes: 3 (pedestrian 1, car 1, truck 1); 1 empty label file(s)" in stdout
    # det_20's ignored categories: no training boxes, but ignore regions of car (2), truck (3) and pedestrian (0)
    # other vehicle: x 50..60, y 50..60 -> cx 55.5/320, cy 55.5/180, w 11/320, h 11/180; trailer: x 70..80
    # other person:  x 5..9, y 5..20    -> cx 7.5/320, cy 13/180, w 5/320, h 16/180
    assert (out / "ignore" / "val" / "aaaa0001-00000001.txt").read_text() == (
        "2 0.173437 0.308333 0.034375 0.061111\n3 0.235937 0.308333 0.034375 0.061111\n"
    )
    assert (
        out / "ignore" / "val" / "aaaa0002-00000002.txt"
    ).read_text() == "0 0.023438 0.072222 0.015625 0.088889\n"
    assert (
        "ignore regions (no training boxes; scored as COCO crowd): 3 (other vehicle 1, trailer 1, other person 1) "
        f"in {out / 'ignore' / 'val'} (2 file(s) written)" in stdout
    )
    assert "boxes clipped to the image: 2; dropped: outside the image or inverted 1" in stdout


def crowd_export(tmp_path: Path, key: str, form: str) -> tuple[Path, Path]:
    """A tracking-style frame list (``crowd``), a Scalabel export (``{"frames": ...}``, ``Crowd``) or a folder of
    per-image 2018 files: one car and one crowd of cars, one frame without any crowd."""
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    for name in ("b1", "b2"):
        Image.new("RGB", (320, 180)).save(images / f"{name}.jpg")
    car = {
        "id": "1",
        "category": "car",
        "attributes": {key: False},
        "box2d": {"x1": 10, "y1": 20, "x2": 49, "y2": 59},
    }
    crowd = {"id": "2", "category": "car", "attributes": {key: True, "occluded": True},
             "box2d": {"x1": 100, "y1": 40, "x2": 259, "y2": 129}}  # fmt: skip
    frames = [{"name": "b1.jpg", "labels": [car, crowd]}, {"name": "b2.jpg", "labels": [car]}]
    labels = tmp_path / f"{key}.json"
    if form == "per_image":
        labels = tmp_path / "labels_100k_val"
        labels.mkdir()
        for f in frames:
            doc = {
                "name": f["name"][:-4],
                "attributes": {},
                "frames": [{"timestamp": 10000, "objects": f["labels"]}],
            }
            (labels / f"{f['name'][:-4]}.json").write_text(json.dumps(doc))
    else:
        labels.write_text(json.dumps({"frames": frames, "config": None} if form == "scalabel" else frames))
    return labels, images


@pytest.mark.parametrize(("key", "form"), [("crowd", "list"), ("Crowd", "scalabel"), ("crowd", "per_image")])
def test_crowd_boxes_are_ignore_regions_not_training_boxes(tmp_path, capsys, key, form):
    labels, images = crowd_export(tmp_path, key, form)
    out = tmp_path / "yolo"
    code, stdout, err = convert(
        capsys, "--labels_file", labels, "--images_dir", images, "--split", "val", "--out", out
    )
    assert code == 0, err
    car = "2 0.093750 0.222222 0.125000 0.222222\n"
    assert (out / "labels" / "val" / "b1.txt").read_text() == car  # the crowd is not a car to learn
    assert (out / "labels" / "val" / "b2.txt").read_text() == car
    # crowd: x 100..259, y 40..129 -> cx 180/320, cy 85/180, w 160/320, h 90/180
    assert (out / "ignore" / "val" / "b1.txt").read_text() == "2 0.562500 0.472222 0.500000 0.500000\n"
    assert not (out / "ignore" / "val" / "b2.txt").exists()
    assert (
        "boxes: 2 (car 2)" in stdout
        and "ignore regions (no training boxes; scored as COCO crowd): 1 (car crowd 1)" in stdout
    )

    # what the evaluations read: the car, and the crowd as a crowd box
    from annotation.metrics import read_yolo_labels

    truth = read_yolo_labels(out / "labels" / "val" / "b1.txt", 320, 180)
    assert truth.cls.tolist() == [2, 2] and truth.is_crowd.tolist() == [False, True]
    assert truth.xyxy[1].tolist() == pytest.approx([100, 40, 260, 130], abs=1e-3)  # %.6f


def test_an_export_without_ignore_files_gets_them_from_a_plain_rerun(tmp_path, capsys):
    labels, images = hand_frames(tmp_path)
    out = tmp_path / "yolo"
    args = ("--labels_file", labels, "--images_dir", images, "--split", "val", "--out", out)
    assert convert(capsys, *args)[0] == 0
    written = {p.name: p.read_text() for p in (out / "ignore" / "val").iterdir()}
    for path in (out / "ignore" / "val").iterdir():  # as an export from before ignore files
        path.unlink()
    code, stdout, err = convert(capsys, *args)
    assert code == 0, err
    assert {p.name: p.read_text() for p in (out / "ignore" / "val").iterdir()} == written
    assert "new 0, replaced 0, unchanged 2" in stdout and "(2 file(s) written)" in stdout
    (out / "ignore" / "val" / "aaaa0002-00000002.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # differs: refused
    code, _, err = convert(capsys, *args)
    assert code == 2 and "1 frame(s) differ from what is there (aaaa0002-00000002)" in err
    assert convert(capsys, *args, "--overwrite")[0] == 0
    assert {p.name: p.read_text() for p in (out / "ignore" / "val").iterdir()} == written


# ---------------------------------------------------------------------------------------------------------------
# the mini data set: layout, side file, hard links, ultralytics
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(mini_bdd, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bdd_to_yolo") / "real"
    for split in ("train", "val"):
        assert run_main(main, ["--bdd_data_dir", str(mini_bdd), "--split", split, "--out", str(out)]) == 0
    return out


def test_layout_side_file_and_hard_links(mini_bdd, dataset):
    val = labelled_val_frames(mini_bdd)
    stems = sorted(f.stem for f in val)
    assert sorted(p.stem for p in (dataset / "labels" / "val").glob("*.txt")) == stems
    for stem in stems:
        src = mini_bdd / "images" / "100k" / "val" / f"{stem}.jpg"
        dest = dataset / "images" / "val" / f"{stem}.jpg"
        assert os.stat(dest).st_ino == os.stat(src).st_ino  # a hard link, not a copy
    rows = frames_csv(dataset)
    by_image = {r["image"]: r for r in rows}
    assert {r["split"] for r in rows} == {"train", "val"} and len(rows) == len(by_image)
    for frame in val:
        row = by_image[f"images/val/{frame.stem}.jpg"]
        assert (row["weather"], row["timeofday"], row["scene"]) == (
            frame.weather,
            frame.timeofday,
            frame.scene,
        )
        assert (dataset / row["image"]).is_file()
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == len(list((dataset / "labels" / "train").glob("*.txt")))
    data = yaml.safe_load((dataset / "data.yaml").read_text())
    assert data == {
        "path": str(dataset.resolve()),
        "train": "images/train",
        "val": "images/val",
        "nc": 10,
        "names": dict(enumerate(bdd.DET_CLASSES)),
    }


def test_legacy_labels_give_the_same_dataset(mini_bdd, dataset, tmp_path, capsys):
    """The legacy 2018 file of the same frames (no ignored categories, lanes added) writes the same files."""
    out = tmp_path / "legacy"
    legacy = mini_bdd / "labels" / "bdd100k_labels_images_val.json"
    code, _, err = convert(
        capsys, "--bdd_data_dir", mini_bdd, "--labels_file", legacy, "--split", "val", "--out", out
    )
    assert code == 0, err
    for path in (dataset / "labels" / "val").iterdir():
        assert (out / "labels" / "val" / path.name).read_text() == path.read_text()


def test_ultralytics_reads_the_dataset(dataset):
    from annotation.yolo_runtime import import_ultralytics

    import_ultralytics()
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(dataset / "data.yaml"), autodownload=False)
    assert data["nc"] == 10 and data["names"] == dict(enumerate(bdd.DET_CLASSES))
    ds = YOLODataset(img_path=data["val"], data=data, task="detect", imgsz=64, augment=False)
    n_lines = sum(len(p.read_text().splitlines()) for p in (dataset / "labels" / "val").glob("*.txt"))
    assert len(ds.labels) == len(list((dataset / "images" / "val").iterdir()))
    assert sum(len(lb["cls"]) for lb in ds.labels) == n_lines > 0


# ---------------------------------------------------------------------------------------------------------------
# reruns, selection, copies
# ---------------------------------------------------------------------------------------------------------------


def test_rerun_leaves_identical_files_and_refuses_differences(mini_bdd, tmp_path, capsys):
    out = tmp_path / "yolo"
    base = ["--bdd_data_dir", mini_bdd, "--split", "val", "--out", out]
    assert convert(capsys, *base)[0] == 0
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    code, stdout, _ = convert(capsys, *base)
    n = len(labelled_val_frames(mini_bdd))
    assert code == 0 and f"new 0, replaced 0, unchanged {n}, removed 0" in stdout
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing rewritten, data.yaml included
    label = sorted((out / "labels" / "val").glob("*.txt"))[0]
    label.write_text("2 0.5 0.5 0.1 0.1\n")
    code, _, err = convert(capsys, *base)
    assert code == 2 and f"1 frame(s) differ from what is there ({label.stem})" in err
    assert "Nothing was written; pass --overwrite" in err and label.read_text() == "2 0.5 0.5 0.1 0.1\n"
    code, stdout, _ = convert(capsys, *base, "--overwrite")
    assert code == 0 and "replaced 1" in stdout and label.read_text() != "2 0.5 0.5 0.1 0.1\n"


def test_max_frames_takes_the_first_names_and_a_smaller_set_needs_overwrite(mini_bdd, tmp_path, capsys):
    stems = sorted(f.stem for f in labelled_val_frames(mini_bdd))
    assert len(stems) >= 3
    out = tmp_path / "yolo"
    base = ["--bdd_data_dir", mini_bdd, "--split", "val", "--out", out]
    assert convert(capsys, *base, "--max_frames", "2")[0] == 0
    assert sorted(p.stem for p in (out / "labels" / "val").iterdir()) == stems[:2]
    code, stdout, _ = convert(capsys, *base, "--max_frames", "3")  # a larger N extends the set
    assert code == 0 and "new 1, replaced 0, unchanged 2" in stdout
    code, _, err = convert(capsys, *base, "--max_frames", "1")
    assert code == 2 and f"2 frame(s) of val there would not be written now ({stems[1]}, {stems[2]})" in err
    code, stdout, _ = convert(capsys, *base, "--max_frames", "1", "--overwrite")
    assert code == 0 and "removed 2" in stdout
    assert sorted(p.stem for p in (out / "images" / "val").iterdir()) == stems[:1]
    assert [r["image"] for r in frames_csv(out)] == [f"images/val/{stems[0]}.jpg"]


def test_copy_flag_and_cross_device_fallback(mini_bdd, tmp_path, capsys, monkeypatch):
    out = tmp_path / "copied"
    code, stdout, _ = convert(capsys, "--bdd_data_dir", mini_bdd, "--split", "val", "--out", out, "--copy")
    image = sorted((out / "images" / "val").iterdir())[0]
    src = mini_bdd / "images" / "100k" / "val" / image.name
    assert code == 0 and "hard-linked 0, copied" in stdout
    assert os.stat(image).st_ino != os.stat(src).st_ino and image.read_bytes() == src.read_bytes()

    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "fallback"
    code, stdout, _ = convert(capsys, "--bdd_data_dir", mini_bdd, "--split", "val", "--out", out)
    assert code == 0 and "hard-linked 0, copied" in stdout
    assert "note: hard links from" in stdout and "impossible (Invalid cross-device link): copied" in stdout
    assert all(p.stat().st_nlink == 1 for p in (out / "images" / "val").iterdir())


def test_runs_as_a_script(mini_bdd, tmp_path):
    out = tmp_path / "script"
    cmd = [sys.executable, str(REPO / "convert" / "bdd_to_yolo.py"), "--bdd_data_dir", str(mini_bdd)]
    proc = subprocess.run(
        [*cmd, "--split", "val", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "no train split written yet: train names images/val" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"yolo train data={out / 'data.yaml'}")
    assert yaml.safe_load((out / "data.yaml").read_text())["train"] == "images/val"


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_clear_line(mini_bdd, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = convert(capsys, "--bdd_data_dir", tmp_path / "nope", "--split", "val", "--out", out)
    assert code == 2 and f"error: BDD100K folder not found: {tmp_path / 'nope'}" in err
    empty = tmp_path / "empty"
    (empty / "images" / "100k" / "val").mkdir(parents=True)
    code, _, err = convert(capsys, "--bdd_data_dir", empty, "--split", "val", "--out", out)
    assert code == 2 and f"no val label file under {empty}: looked for labels/det_20/det_val.json" in err
    labels = mini_bdd / "labels" / "det_20" / "det_val.json"
    code, _, err = convert(
        capsys, "--labels_file", labels, "--images_dir", empty / "images" / "100k" / "val", "--split", "val",
        "--out", out,
    )  # fmt: skip
    n = len(labelled_val_frames(mini_bdd))
    assert code == 2 and f"nothing to write for val: {n} frame(s) in {labels}, {n} without an image in" in err
    code, _, err = convert(
        capsys, "--bdd_data_dir", mini_bdd, "--split", "val", "--out", out, "--classes", "cars"
    )
    assert code == 2 and "--classes: 'cars' is not a BDD100K detection class" in err
    with pytest.raises(SystemExit):
        main(["--bdd_data_dir", str(mini_bdd), "--split", "val", "--out", str(out), "--max_frames", "0"])
    assert "--max_frames must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "frames.csv").write_text("name,weather\n")
    code, _, err = convert(capsys, "--bdd_data_dir", mini_bdd, "--split", "val", "--out", out)
    assert code == 2 and f"{out / 'frames.csv'} is not this converter's frames file" in err
    file_out = tmp_path / "a_file"
    file_out.write_text("")
    code, _, err = convert(capsys, "--bdd_data_dir", mini_bdd, "--split", "val", "--out", file_out)
    assert code == 2 and f"--out {file_out} is a file, not a folder" in err


def test_a_yaml_config_and_the_flags_write_the_same_dataset(mini_bdd, tmp_path, capsys):
    """config/bdd_to_yolo.yaml's keys and the flags are one setting (YAML < flags < key=value); --check writes
    nothing; a typo gets did-you-mean."""
    flags = tmp_path / "flags"
    code, _, err = convert(
        capsys, "--bdd_data_dir", mini_bdd, "--split", "val", "--out", flags, "--classes", "car"
    )
    assert code == 0, err
    config = tmp_path / "export.yaml"
    config.write_text(f"bdd_data_dir: {mini_bdd}\nsplit: train\nout: {tmp_path / 'yaml'}\nclasses: [bus]\n")
    code, stdout, err = convert(capsys, "--config", config, "--split", "val", "--check")
    assert code == 0 and "ok (val: labels" in stdout and not (tmp_path / "yaml").exists(), err
    code, _, err = convert(capsys, "--config", config, "--split", "val", "classes=[car]")
    assert code == 0, err
    for sub in ("labels/val", "images/val"):
        assert sorted(p.name for p in (flags / sub).iterdir()) == sorted(
            p.name for p in (tmp_path / "yaml" / sub).iterdir()
        )
    for label in (flags / "labels" / "val").iterdir():
        assert label.read_text() == (tmp_path / "yaml" / "labels" / "val" / label.name).read_text()
    assert (flags / "frames.csv").read_text() == (tmp_path / "yaml" / "frames.csv").read_text()
    code, _, err = convert(capsys, "--config", config, "min_box_sid=3")
    assert code == 2 and "min_box_sid: unknown key (did you mean 'min_box_side'?)" in err
