"""annotation/diagnose.py: per-cell figures equal the shared COCO mAP on the cell's frames, the bootstrap re-ranks
COCO's matches as a duplicate-aware draw, thin cells are flagged and never ranked, the targets file is a valid plan
targets file and an edited one is kept, and every bad input is one clear line.

The detector is the tests' cached demo detector (tests/yolo_fixture.py), trained on the mini-BDD train frames' cars;
the 'val' set here is those train frames (a bdd_to_yolo export whose val split points at them), where it finds cars.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from yolo_fixture import DetectorParams, cached_detector

from annotation import diagnose, metrics
from convert import bdd_to_yolo
from convert.planning.targets import PlanTargets, load_targets
from core.cli import run_main
from vocab import bdd

PARAMS = DetectorParams()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector(mini_bdd, tmp_path_factory) -> Path:
    return cached_detector(mini_bdd, tmp_path_factory.mktemp("diagnose_detector"), PARAMS)


@pytest.fixture(scope="module")
def val_yaml(mini_bdd, tmp_path_factory) -> Path:
    """bdd_to_yolo's export of the mini-BDD train frames, its data.yaml's val split pointing at them."""
    out = tmp_path_factory.mktemp("diagnose_val") / "real"
    assert (
        run_main(bdd_to_yolo.main, ["--bdd_data_dir", str(mini_bdd), "--split", "train", "--out", str(out)])
        == 0
    )
    data = yaml.safe_load((out / "data.yaml").read_text())
    data["val"] = data["train"]
    (out / "data.yaml").write_text(yaml.safe_dump(data))
    return out / "data.yaml"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = run_main(diagnose.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_args(val_yaml: Path, detector: Path, out: Path) -> list:
    return ["--val", val_yaml, "--detector", detector, "--out", out, "--imgsz", PARAMS.imgsz, "--device", "cpu",
            "--batch", 4, "--classes", "car", "--resamples", 30]  # fmt: skip


@pytest.fixture(scope="module")
def diagnosed(val_yaml, detector, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diagnosed")
    assert (
        run_main(diagnose.main, [str(a) for a in [*base_args(val_yaml, detector, out), "--min_boxes", 3]])
        == 0
    )
    return out


def test_cell_figures_equal_detection_map_on_the_cells_frames(diagnosed, val_yaml, detector, tmp_path):
    """Independently: predict, read the labels, group frames.csv rows into cells, detection_map per cell."""
    from annotation import yolo_runtime

    result = json.loads((diagnosed / "diagnose.json").read_text())
    yolo_runtime.prepare_offline(tmp_path / ".ultralytics")
    rows = list(csv.DictReader((val_yaml.parent / "frames.csv").open()))
    images = [(val_yaml.parent / r["image"]).resolve() for r in rows]
    preds = metrics.predict_boxes(
        detector, images, tmp_path / "list.txt", imgsz=PARAMS.imgsz, batch=4, device="cpu"
    )
    truths = {}
    for image in images:
        label = image.parent.parent.parent / "labels" / "train" / f"{image.stem}.txt"
        from PIL import Image

        with Image.open(image) as im:
            truths[image] = metrics.read_yolo_labels(label, *im.size)
    car = bdd.DET_CLASS_YOLO_ID["car"]
    truths = {
        k: metrics.Boxes(v.xyxy[v.cls == car], v.cls[v.cls == car], None, v.is_crowd[v.cls == car])
        for k, v in truths.items()
    }
    preds = {
        k: metrics.Boxes(v.xyxy[v.cls == car], v.cls[v.cls == car], v.conf[v.cls == car])
        for k, v in preds.items()
    }
    # the same predictions for the BDD100K toolkit: one frame per val image, named as BDD100K names it
    scalabel = json.loads((diagnosed / "predictions_scalabel.json").read_text())
    assert sorted(f["name"] for f in scalabel) == sorted(i.name for i in images)
    counts = {f["name"]: len(f["labels"]) for f in scalabel}
    assert {k.name: len(v) for k, v in preds.items()} == counts and sum(counts.values()) > 0
    cells: dict[str, list[Path]] = {}
    for r, image in zip(rows, images, strict=True):
        cells.setdefault(f"{r['weather'] or 'undefined'}|{r['timeofday'] or 'undefined'}", []).append(image)
    by_cell = {(c["cell"], c["class"]): c for c in result["cells"]}
    checked = 0
    for cell, keys in cells.items():
        ref = metrics.detection_map(preds, truths, bdd.DET_CLASSES, keys)
        if not ref["gt_boxes"]:
            assert (cell, "all") not in by_cell
            continue
        assert by_cell[(cell, "all")]["map"] == pytest.approx(ref["map"], abs=1e-9)
        assert by_cell[(cell, "car")]["map"] == pytest.approx(ref["per_class"]["car"]["map"], abs=1e-9)
        assert by_cell[(cell, "car")]["boxes"] == ref["per_class"]["car"]["gt_boxes"]
        assert by_cell[(cell, "all")]["images"] == len(keys)
        checked += 1
    assert checked >= 2
    overall = metrics.detection_map(preds, truths, bdd.DET_CLASSES)
    assert result["overall"]["map"] == pytest.approx(overall["map"], abs=1e-9)
    assert (
        overall["per_class"]["car"]["map50"] > 0.3
    )  # the detector does find these cars: the figures mean something


def test_bootstrap_intervals_hold_the_point_estimate_and_thin_cells_are_not_ranked(diagnosed):
    result = json.loads((diagnosed / "diagnose.json").read_text())
    with_ci = [r for r in result["cells"] if r["ci_low"] is not None]
    assert with_ci
    for r in with_ci:
        assert r["ci_low"] - 1e-9 <= r["map"] <= r["ci_high"] + 1e-9, r
        assert 0 < r["resamples"] <= 30
    thin = [r for r in result["cells"] if r["boxes"] < 3]
    assert thin and all(r["flag"] == diagnose.TOO_FEW and "rank" not in r for r in thin)
    single = [r for r in result["cells"] if r["images"] == 1 and r["boxes"] >= 3]
    assert all(r["flag"] == diagnose.ONE_FRAME and "rank" not in r for r in single)
    ranked = result["ranked"]
    assert ranked and all(r["boxes"] >= 3 and r["images"] > 1 and r["class"] == "car" for r in ranked)
    uppers = [r["ci_high"] for r in ranked]
    assert uppers == sorted(uppers)  # weakest first, by the upper bound
    targeted = {(t["cell"], t["class"]) for t in result["targets"]["rows"]}
    assert targeted <= {(r["cell"], r["class"]) for r in ranked}
    assert (diagnosed / "diagnose.md").read_text().count("too few boxes") >= len(thin)
    assert (diagnosed / "diagnose.png").stat().st_size > 1000


def test_targets_file_is_a_plan_targets_file(diagnosed):
    targets = load_targets(diagnosed / "targets.yaml")
    assert isinstance(targets, PlanTargets)
    result = json.loads((diagnosed / "diagnose.json").read_text())
    rows = result["targets"]["rows"]
    assert len(targets.targets) == len(rows) >= 1
    for target, row in zip(targets.targets, rows, strict=True):
        weather, tod = row["cell"].split("|")
        assert target.weather == [weather] and target.timeofday == [tod] and target.scene is None
        assert target.require == {"car": 1}


def test_an_edited_targets_file_is_kept(val_yaml, detector, tmp_path, capsys):
    args = [*base_args(val_yaml, detector, tmp_path), "--min_boxes", 3, "--resamples", 0]
    assert run(capsys, *args)[0] == 0
    path = tmp_path / "targets.yaml"
    written = path.read_text()
    code, out, _ = run(capsys, *args, "targets.scenes=7")
    assert code == 0 and "(written)" in out and "scenes: 7" in path.read_text()
    edited = path.read_text().replace("scenes: 7", "scenes: 3")
    path.write_text(edited)
    code, out, _ = run(capsys, *args)
    assert code == 0 and "kept" in out and path.read_text() == edited
    path.unlink()
    assert run(capsys, *args)[0] == 0 and path.read_text() == written


def test_bad_inputs_are_one_clear_line(val_yaml, detector, tmp_path, capsys):
    import shutil

    # a val set without frames.csv
    bare = tmp_path / "bare"
    shutil.copytree(val_yaml.parent, bare, symlinks=True)
    (bare / "frames.csv").unlink()
    data = yaml.safe_load((bare / "data.yaml").read_text())
    data["path"] = str(bare)
    (bare / "data.yaml").write_text(yaml.safe_dump(data))
    code, _, err = run(capsys, *base_args(bare / "data.yaml", detector, tmp_path / "o1"))
    assert code == 2 and "without attributes" in err and "frames.csv" in err and "bdd_to_yolo" in err

    # val frames without any box (every cell empty)
    empty = tmp_path / "empty"
    shutil.copytree(val_yaml.parent, empty, symlinks=True)
    for label in (empty / "labels").rglob("*.txt"):
        label.write_text("")
    data["path"] = str(empty)
    (empty / "data.yaml").write_text(yaml.safe_dump(data))
    code, _, err = run(capsys, *base_args(empty / "data.yaml", detector, tmp_path / "o2"))
    assert code == 2 and "hold no box of the scored classes" in err

    # no cell with enough boxes to rank
    code, _, err = run(
        capsys, *base_args(val_yaml, detector, tmp_path / "o3"), "--min_boxes", 100000, "--resamples", 0
    )
    assert code == 2 and "cells.min_boxes=100000" in err

    # a detector whose classes map to no BDD100K class
    import torch

    ckpt = torch.load(detector, weights_only=False)
    ckpt["model"].names = {i: f"widget{i}" for i in ckpt["model"].names}
    foreign = tmp_path / "foreign.pt"
    torch.save(ckpt, foreign)
    args = base_args(val_yaml, foreign, tmp_path / "o4")
    args.remove("--classes"), args.remove("car")
    code, _, err = run(capsys, *args)
    assert code == 2 and "no model class maps to a BDD100K class" in err and "widget0" in err

    # a config typo names its key
    code, _, err = run(capsys, *base_args(val_yaml, detector, tmp_path / "o5"), "cells.min_box=3")
    assert code == 2 and "cells.min_box: unknown key" in err and "min_boxes" in err


def test_check_validates_and_writes_nothing(val_yaml, detector, tmp_path, capsys):
    code, out, _ = run(capsys, *base_args(val_yaml, detector, tmp_path / "out"), "--check")
    assert code == 0 and "ok" in out and not (tmp_path / "out").exists()
