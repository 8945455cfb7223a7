"""annotation/train_demo_detector.py: the demo's detector, trained offline on the mini-BDD100K (same code as the tests')."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from PIL import Image
from yolo_fixture import cached_detector

from annotation.train_demo_detector import (
    CLI_DEFAULTS,
    DemoDetectorConfig,
    DetectorParams,
    detector_key,
    evaluate,
    info_path,
    main,
    training_boxes,
    write_yolo_training_set,
)
from core.cli import run_main
from core.config import load_config
from vocab import bdd


def run(capsys, *argv) -> tuple[int, str, str]:
    code = run_main(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_key_changes_with_data_and_settings(mini_bdd, tmp_path):
    key = detector_key(mini_bdd, DetectorParams())
    assert key == detector_key(mini_bdd, DetectorParams())  # stable
    assert detector_key(mini_bdd, DetectorParams(seed=1)) != key
    copy = tmp_path / "bdd100k"
    shutil.copytree(mini_bdd, copy)
    assert detector_key(copy, DetectorParams()) == key  # content, not location
    image = sorted((copy / "images" / "100k" / "val").glob("*.jpg"))[0]
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    assert detector_key(copy, DetectorParams()) != key


def test_bad_inputs_are_one_clear_line(mini_bdd, tmp_path, capsys):
    out = tmp_path / "det.pt"
    code, _, err = run(capsys, "--bdd_data_dir", tmp_path / "nope", "--out", out)
    assert code == 2 and f"error: BDD100K folder not found: {tmp_path / 'nope'}" in err
    code, _, err = run(capsys, "--bdd_data_dir", mini_bdd, "--out", out, "--classes", "car", "carr")
    assert code == 2 and "--classes: 'carr' is not a BDD100K detection class (did you mean 'car'?)" in err
    code, _, err = run(capsys, "--bdd_data_dir", mini_bdd, "--out", out, "--imgsz", "250")
    assert code == 2 and "--imgsz must be a multiple of 32 (YOLO's largest stride), got 250" in err
    code, _, err = run(capsys, "--bdd_data_dir", mini_bdd, "--out", tmp_path / "det.txt")
    assert code == 2 and "--out must name a .pt file" in err
    empty = tmp_path / "empty_bdd"
    (empty / "images" / "100k" / "train").mkdir(parents=True)
    code, _, err = run(capsys, "--bdd_data_dir", empty, "--out", out)
    assert code == 2 and f"det_20 labels not found: {empty / 'labels' / 'det_20' / 'det_train.json'}" in err
    code, _, err = run(capsys, "--bdd_data_dir", mini_bdd, "--out", out, "--min_box_side", "5000")
    assert code == 2 and "has a car box with a side of at least 5000 px" in err
    assert not out.exists()


def test_training_set_is_the_converters_with_the_trained_classes_only(mini_bdd, tmp_path):
    """convert/bdd_to_yolo.py writes it: exactly training_boxes' boxes (what evaluate() scores), hard-linked images,
    train frames without such a box left out, every labelled val frame kept, frames.csv beside it."""
    params = DetectorParams(classes=("car", "truck"))
    data, counts = write_yolo_training_set(mini_bdd, tmp_path / "data", params)
    for split in ("train", "val"):
        frames = {f.stem: f for f in bdd.load_frames(mini_bdd / "labels" / "det_20" / f"det_{split}.json")}
        expected = {}
        for image in bdd.list_images(mini_bdd / "images" / "100k" / split):
            frame = frames.get(image.stem)
            if frame is None or frame.labels_state != "ok":
                continue
            w, h = Image.open(image).size
            boxes = [
                (cls, bdd.box_to_yolo(box, w, h)) for _, (cls, box) in training_boxes(frame, w, h, params)
            ]
            if boxes or split == "val":
                expected[image.stem] = "".join(
                    f"{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, (x, y, bw, bh) in boxes
                )
            if image.stem in expected:
                linked = tmp_path / "data" / "images" / split / image.name
                assert os.stat(linked).st_ino == os.stat(image).st_ino
        written = {p.stem: p.read_text() for p in (tmp_path / "data" / "labels" / split).glob("*.txt")}
        assert written == expected and counts[f"{split}_images"] == len(expected)
        assert counts[f"{split}_boxes"] == sum(len(t.splitlines()) for t in expected.values()) > 0
    assert {line.split()[0] for t in written.values() for line in t.splitlines()} <= {"2", "3"}
    assert (tmp_path / "data" / "frames.csv").is_file() and data == tmp_path / "data" / "data.yaml"


def test_cli_reuses_the_fixture_weights_for_the_same_data_and_settings(mini_bdd, tmp_path, capsys):
    """The tests' detector and the CLI share one key: a .pt with a matching info file is reused, not retrained."""
    weights = cached_detector(mini_bdd, tmp_path / "work")
    params = DetectorParams()
    out = tmp_path / "demo" / "detector.pt"
    out.parent.mkdir()
    shutil.copyfile(weights, out)
    key = detector_key(mini_bdd, params)
    info = {
        "key": key,
        "params": params.model_dump(mode="json"),
        "train_seconds": 1.0,
        "val": {"val_images": 0},
    }
    info_path(out).write_text(json.dumps(info))
    before = out.stat().st_mtime_ns
    argv = ["--bdd_data_dir", mini_bdd, "--out", out, "--epochs", params.epochs, "--imgsz", params.imgsz]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert f"detector: reusing {out} (same data and settings, key {key}; --force retrains)" in stdout
    assert f"--model {out} --imgsz {params.imgsz}" in stdout
    assert out.stat().st_mtime_ns == before and not (tmp_path / "demo" / "detector_train").exists()


def test_evaluate_counts_the_val_boxes_of_the_trained_classes(mini_bdd, tmp_path):
    params = DetectorParams()
    weights = cached_detector(mini_bdd, tmp_path / "work", params)
    metrics = evaluate(weights, mini_bdd, params)
    frames = {f.name: f for f in bdd.load_frames(mini_bdd / "labels" / "det_20" / "det_val.json")}
    images = [p for p in bdd.list_images(mini_bdd / "images" / "100k" / "val") if p.name in frames]
    boxes = sum(len(training_boxes(frames[p.name], *Image.open(p).size, params)) for p in images)
    assert metrics["val_images"] == len(images) and metrics["val_boxes"] == boxes > 0
    assert 0 <= metrics["matched"] <= min(boxes, metrics["detections"])
    assert metrics["recall"] == round(metrics["matched"] / boxes, 4)


def test_cli_trains_saves_atomically_and_reruns_instantly(mini_bdd, tmp_path, capsys):
    """One tiny epoch through the real command line: weights, info file, summary; the rerun trains nothing."""
    out = tmp_path / "demo" / "detector.pt"
    argv = ["--bdd_data_dir", mini_bdd, "--out", out, "--epochs", "1", "--imgsz", "64"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    info = json.loads(info_path(out).read_text())
    params = CLI_DEFAULTS.model_copy(update={"epochs": 1, "imgsz": 64})
    assert info["key"] == detector_key(mini_bdd, params) and info["params"] == json.loads(
        json.dumps(params.model_dump(mode="json"))
    )
    assert f"detector: {out} (yolov8n, 1 epochs at 64 px on car; trained in " in stdout
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]  # no temp file left behind

    from ultralytics import YOLO

    model = YOLO(str(out))
    assert model.names == dict(enumerate(bdd.DET_CLASSES))  # the annotation script maps it by identity
    before = out.stat().st_mtime_ns
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and f"detector: reusing {out}" in stdout and out.stat().st_mtime_ns == before
    assert os.path.isdir(out.parent / "detector_train" / "runs" / "detector")
    labels = sorted((out.parent / "detector_train" / "data" / "labels" / "train").glob("*.txt"))
    assert labels and all(len(line.split()) == 5 for p in labels for line in p.read_text().splitlines())


def test_the_config_and_the_flags_are_one_setting(mini_bdd, tmp_path, capsys):
    """config/demo/detector.yaml < flags < key=value; --check trains nothing; typos get did-you-mean."""
    config = tmp_path / "detector.yaml"
    out = tmp_path / "d" / "detector.pt"
    config.write_text(f"bdd_data_dir: {mini_bdd}\nout: {out}\ntrain:\n  epochs: 3\n  classes: [car]\n")
    code, stdout, err = run(capsys, "--config", config, "--epochs", "1", "train.imgsz=64", "--check")
    assert code == 0 and "ok (" in stdout and not out.parent.exists(), err
    code, _, err = run(capsys, "--config", config, "train.epoch=1")
    assert code == 2 and "train.epoch: unknown key (did you mean 'epochs'" in err
    shipped = load_config(
        DemoDetectorConfig, Path(__file__).resolve().parents[1] / "config/demo/detector.yaml"
    )
    assert shipped.train == CLI_DEFAULTS  # the file spells out the command line's defaults
