"""annotation/metrics.py: COCO mAP against pycocotools' COCOeval run here directly (random cases, the exact
thresholds where float32 thresholds went wrong, COCO's per-class detection cap, size bins that share their ends),
and against values computed by hand (tiny cases, ignore regions).

COCO's AP averages interpolated precision at 101 recall points (0, 0.01, ..., 1): a class whose only detection
finds one of its two boxes has precision 1 up to recall 0.5 and none beyond, so AP = 51/101.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from annotation import metrics
from annotation.metrics import Boxes, detection_map, read_yolo_labels
from vocab import bdd

CAR, BUS, PED = 2, 4, 0
HALF = 51 / 101  # one of two boxes found, no false positive


def truth(*boxes: tuple[int, list[float]]) -> Boxes:
    if not boxes:
        return Boxes.empty()
    return Boxes(np.array([b for _, b in boxes], float), np.array([c for c, _ in boxes]))


def preds(*dets: tuple[int, float, list[float]]) -> Boxes:
    if not dets:
        return Boxes.empty(with_conf=True)
    return Boxes(
        np.array([b for *_, b in dets], float),
        np.array([c for c, *_ in dets]),
        np.array([p for _, p, _ in dets]),
    )


def one(t: Boxes, p: Boxes) -> dict:
    return detection_map({"a": p}, {"a": t}, bdd.DET_CLASSES)


def test_one_perfect_box_scores_one_everywhere_it_is_defined():
    r = one(truth((CAR, [0, 0, 10, 10])), preds((CAR, 0.9, [0, 0, 10, 10])))
    assert (r["map"], r["map50"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert r["per_class"]["car"] == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0), "gt_boxes": 1}
    assert r["per_class"]["bus"] == {"map": None, "map50": None, "gt_boxes": 0}
    assert r["per_size"]["small"] == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0), "gt_boxes": 1}
    assert r["per_size"]["medium"]["map"] is None and r["per_size"]["large"]["map50"] is None
    assert (r["images"], r["gt_boxes"]) == (1, 1)


def test_a_box_at_iou_062_counts_at_three_of_ten_coco_thresholds():
    # IoU = 62/100: a hit at 0.50, 0.55, 0.60 and a miss at 0.65 ... 0.95
    r = one(truth((CAR, [0, 0, 10, 10])), preds((CAR, 0.9, [0, 0, 10, 6.2])))
    assert r["map50"] == pytest.approx(1.0) and r["map"] == pytest.approx(0.3)


def test_a_false_positive_costs_only_when_it_outranks_the_true_one():
    t = truth((CAR, [0, 0, 10, 10]))
    fp_first = preds((CAR, 0.9, [50, 50, 60, 60]), (CAR, 0.8, [0, 0, 10, 10]))
    fp_last = preds((CAR, 0.9, [0, 0, 10, 10]), (CAR, 0.8, [50, 50, 60, 60]))
    assert one(t, fp_first)["map50"] == pytest.approx(0.5)  # precision 1/2 at recall 1
    assert one(t, fp_last)["map50"] == pytest.approx(1.0)


def test_a_missed_box_halves_recall():
    t = truth((CAR, [0, 0, 10, 10]), (CAR, [50, 50, 60, 60]))
    r = one(t, preds((CAR, 0.9, [0, 0, 10, 10])))
    assert r["map50"] == pytest.approx(HALF) and r["map"] == pytest.approx(HALF)
    assert one(t, preds())["map50"] == 0.0  # nothing detected: 0, not undefined


def test_size_bins_follow_coco_areas():
    t = truth(
        (CAR, [0, 0, 10, 10]), (CAR, [100, 100, 300, 300]), (BUS, [0, 0, 50, 50])
    )  # 100, 40000, 2500 px²
    r = one(t, preds((CAR, 0.9, [0, 0, 10, 10]), (BUS, 0.8, [0, 0, 50, 50])))
    assert r["per_size"]["small"]["map50"] == pytest.approx(1.0)
    assert r["per_size"]["medium"]["map50"] == pytest.approx(1.0)
    assert r["per_size"]["large"]["map50"] == 0.0
    assert [r["per_size"][s]["gt_boxes"] for s in ("small", "medium", "large")] == [1, 1, 1]
    assert r["map50"] == pytest.approx((HALF + 1.0) / 2)  # car: one of two, bus: one of one


def test_per_class_values_and_classes_without_truth():
    t = truth((CAR, [0, 0, 10, 10]), (BUS, [50, 50, 90, 90]))
    p = preds(
        (CAR, 0.9, [0, 0, 10, 10]), (PED, 0.8, [20, 20, 30, 30])
    )  # bus missed; a pedestrian nobody drew
    r = one(t, p)
    assert r["per_class"]["car"]["map50"] == pytest.approx(1.0)
    assert r["per_class"]["bus"]["map50"] == 0.0
    assert r["per_class"]["pedestrian"] == {"map": None, "map50": None, "gt_boxes": 0}
    assert r["map50"] == pytest.approx(0.5)  # the mean over the classes that have boxes


def test_images_pool_into_one_curve_and_keys_pick_a_subset():
    truths = {"a": truth((CAR, [0, 0, 10, 10])), "b": truth((CAR, [0, 0, 10, 10])), "c": truth()}
    predictions = {
        "a": preds((CAR, 0.9, [0, 0, 10, 10])),
        "c": preds((CAR, 0.1, [0, 0, 10, 10])),
    }  # b: missed
    r = detection_map(predictions, truths, bdd.DET_CLASSES)
    assert r["map50"] == pytest.approx(HALF) and r["images"] == 3
    assert detection_map(predictions, truths, bdd.DET_CLASSES, keys=["a"])["map50"] == pytest.approx(1.0)
    empty = detection_map(predictions, truths, bdd.DET_CLASSES, keys=[])
    assert empty["map"] is None and empty["images"] == 0


def test_read_yolo_labels(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("2 0.500000 0.250000 0.100000 0.500000\n\n0 0.1 0.1 0.2 0.2\n")
    boxes = read_yolo_labels(f, 200, 100)
    assert boxes.cls.tolist() == [2, 0]
    assert boxes.xyxy.ravel().tolist() == pytest.approx([90, 0, 110, 50, 0, 0, 40, 20])
    assert len(read_yolo_labels(tmp_path / "none.txt", 200, 100)) == 0
    f.write_text("2 0.5 0.5 0.1 0.1 0.93\n")
    with pytest.raises(ValueError, match=r"a.txt:1: not a YOLO box line"):
        read_yolo_labels(f, 200, 100)


# ---------------------------------------------------------------------------------------------------------------
# against pycocotools itself: the reference is built here, from the boxes, with COCO's own loadRes and summarize
# ---------------------------------------------------------------------------------------------------------------

SIZES = ("small", "medium", "large")


def coco_reference(truths: dict, predictions: dict, n_classes: int) -> dict:
    """pycocotools' summarize figures: overall (AP, AP50, AP75, APs/m/l), per class (a COCOeval restricted to the
    class) and AP50 per size (a COCOeval at IoU 0.5 only); None where summarize says -1."""
    keys = list(truths)
    gt = COCO()
    anns = []
    for image_id, key in enumerate(keys, 1):
        t = truths[key]
        crowd = t.crowd if t.crowd is not None else np.zeros(len(t), bool)
        for (x1, y1, x2, y2), c, is_crowd in zip(
            t.xyxy.tolist(), t.cls.tolist(), crowd.tolist(), strict=True
        ):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": int(is_crowd)})  # fmt: skip
    gt.dataset = {"images": [{"id": i} for i in range(1, len(keys) + 1)], "annotations": anns,
                  "categories": [{"id": c} for c in range(n_classes)]}  # fmt: skip
    results = [
        {"image_id": image_id, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        for image_id, key in enumerate(keys, 1)
        for (x1, y1, x2, y2), c, score in zip(
            predictions[key].xyxy.tolist(),
            predictions[key].cls.tolist(),
            predictions[key].conf.tolist(),
            strict=True,
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)

        def stats(cat_ids: list[int], iou_thrs: np.ndarray | None = None) -> list[float | None]:
            e = COCOeval(gt, dt, iouType="bbox")
            e.params.catIds = cat_ids
            if iou_thrs is not None:
                e.params.iouThrs = iou_thrs
            e.evaluate()
            e.accumulate()
            e.summarize()
            return [None if v == -1 else float(v) for v in e.stats]

        everything = stats(list(range(n_classes)))
        at50 = stats(list(range(n_classes)), np.array([0.5]))
        per_class = [stats([c])[:2] for c in range(n_classes)]
    return {
        "map": everything[0], "map50": everything[1], "map75": everything[2],
        "per_size": {s: {"map": everything[3 + i], "map50": at50[3 + i]} for i, s in enumerate(SIZES)},
        "per_class": {c: {"map": ap, "map50": ap50} for c, (ap, ap50) in enumerate(per_class)},
    }  # fmt: skip


def assert_equal_to_reference(truths: dict, predictions: dict, n_classes: int) -> dict:
    names = list(bdd.DET_CLASSES[:n_classes])
    ours = detection_map(predictions, truths, names)
    ref = coco_reference(truths, predictions, n_classes)

    def same(a: float | None, b: float | None) -> bool:
        return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-6)

    pairs = [(ours[k], ref[k], k) for k in ("map", "map50", "map75")]
    pairs += [
        (ours["per_class"][names[c]][k], ref["per_class"][c][k], (c, k))
        for c in range(n_classes)
        for k in ("map", "map50")
    ]
    pairs += [(ours["per_size"][s][k], ref["per_size"][s][k], (s, k)) for s in SIZES for k in ("map", "map50")]  # fmt: skip
    wrong = [(where, a, b) for a, b, where in pairs if not same(a, b)]
    assert not wrong, f"(where, ours, pycocotools): {wrong}"
    return ours


def random_case(seed: int, n_images: int = 12, n_classes: int = 3) -> tuple[dict, dict]:
    """Boxes of every size, some crowd; detections: jittered copies of the truths (IoUs around every threshold),
    duplicates, detections on crowd regions and false positives, random classes and scores."""
    rng = np.random.default_rng(seed)
    truths, predictions = {}, {}
    for i in range(n_images):
        n = int(rng.integers(0, 9))
        wh = np.exp(rng.uniform(np.log(4), np.log(250), (n, 2)))
        xy = rng.uniform(0, 600, (n, 2))
        xyxy = np.concatenate([xy, xy + wh], axis=1)
        cls = rng.integers(0, n_classes, n)
        crowd = rng.random(n) < 0.15
        truths[i] = Boxes(xyxy, cls, None, crowd)
        keep = rng.random(n) < 0.8
        jitter = rng.normal(0, 0.12, (n, 4)) * np.concatenate([wh, wh], axis=1)
        det = (xyxy + jitter)[keep]
        det_cls = np.where(rng.random(n) < 0.9, cls, rng.integers(0, n_classes, n))[keep]
        m = int(rng.integers(0, 6))
        fp_xy = rng.uniform(0, 600, (m, 2))
        fp = np.concatenate([fp_xy, fp_xy + np.exp(rng.uniform(np.log(4), np.log(250), (m, 2)))], axis=1)
        det = np.concatenate([det, det[: int(rng.integers(0, 3))], fp])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        det_cls = np.concatenate(
            [det_cls, det_cls[: len(det) - len(det_cls) - m], rng.integers(0, n_classes, m)]
        )
        predictions[i] = Boxes(det, det_cls, rng.random(len(det)))
    return truths, predictions


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_equal_pycocotools(seed):
    truths, predictions = random_case(seed)
    ours = assert_equal_to_reference(truths, predictions, 3)
    assert ours["map"] is not None and 0 < ours["map"] < 1  # a case that exercises something
    crowd = sum(int(t.is_crowd.sum()) for t in truths.values())
    assert ours["crowd_boxes"] == crowd and ours["gt_boxes"] == sum(len(t) for t in truths.values()) - crowd


@pytest.mark.parametrize("seed", range(3))
def test_subsets_from_one_evaluation_equal_pycocotools_on_each_subset(seed):
    """detection_maps evaluates once and accumulates per subset; each subset, a bootstrap resample with repeated
    images included, must equal a fresh COCOeval on exactly those images (a repeat is an image of its own)."""
    truths, predictions = random_case(seed, n_images=14)
    rng = np.random.default_rng(100 + seed)
    subsets = {
        "first half": list(range(7)),
        "odd, reversed": list(range(13, 0, -2)),
        "resample": [int(k) for k in rng.integers(0, 14, 14)],
    }
    results = metrics.detection_maps(predictions, truths, list(bdd.DET_CLASSES[:3]), subsets)
    for name, keys in subsets.items():
        t = {i: truths[k] for i, k in enumerate(keys)}
        p = {i: predictions[k] for i, k in enumerate(keys)}
        ref = coco_reference(t, p, 3)
        ours = results[name]
        assert ours["images"] == len(keys)
        for field in ("map", "map50", "map75"):
            assert ours[field] == pytest.approx(ref[field], abs=1e-9), (name, field)
        for c, name_c in enumerate(bdd.DET_CLASSES[:3]):
            got, want = ours["per_class"][name_c]["map"], ref["per_class"][c]["map"]
            assert (got is None and want is None) or got == pytest.approx(want, abs=1e-9), (name, name_c)
        assert ours == detection_map(p, t, list(bdd.DET_CLASSES[:3]))
    lean = metrics.detection_maps(predictions, truths, list(bdd.DET_CLASSES[:3]), subsets, per_size=False)
    for name in subsets:  # the bootstrap's cheaper accumulation: the same figures, per size left out
        assert all(lean[name]["per_size"][s]["map"] is None for s in SIZES)
        assert {k: lean[name][k] for k in ("map", "map50", "map75", "per_class")} == {
            k: results[name][k] for k in ("map", "map50", "map75", "per_class")
        }


def test_a_subset_counts_a_repeated_image_as_often_as_it_appears():
    """Hand-computed 101-point AP: image 0 has its one car found exactly, image 1 has one car and no detection.
    Both: recall 1/2 at precision 1 -> 51/101. Image 0 twice: 1.0. Image 1 twice: 0. 0, 0, 1: recall 2/3 -> 67/101."""
    box = np.array([[10.0, 10.0, 60.0, 50.0]])
    truths = {0: Boxes(box, np.array([0])), 1: Boxes(box, np.array([0]))}
    predictions = {0: Boxes(box, np.array([0]), np.array([0.9]))}
    subsets = {"both": [0, 1], "0 twice": [0, 0], "1 twice": [1, 1], "0, 0, 1": [0, 0, 1]}
    for per_size in (True, False):
        got = metrics.detection_maps(predictions, truths, ["car"], subsets, per_size=per_size)
        assert got["both"]["map"] == pytest.approx(51 / 101)
        assert got["0 twice"]["map"] == pytest.approx(1.0)
        assert got["1 twice"]["map"] == pytest.approx(0.0)
        assert got["0, 0, 1"]["map"] == pytest.approx(67 / 101)
        assert got["0, 0, 1"]["gt_boxes"] == 3


def test_best_recall_three_of_five_reaches_the_recall_point_06():
    t = truth(*[(CAR, [20.0 * i, 0, 20.0 * i + 10, 10]) for i in range(5)])
    p = preds(*[(CAR, 0.9 - 0.1 * i, [20.0 * i, 0, 20.0 * i + 10, 10]) for i in range(3)])
    r = assert_equal_to_reference({"a": t}, {"a": p}, len(bdd.DET_CLASSES))
    assert r["map"] == pytest.approx(
        61 / 101, abs=1e-12
    )  # recall points 0 ... 0.60 at precision 1 (not 60/101)


def test_a_detection_at_iou_exactly_055_counts_at_two_thresholds():
    t = truth((CAR, [0, 0, 100, 100]))
    p = preds(
        (CAR, 0.9, [0, 0, 100, 55])
    )  # intersection 5500, union 10000: IoU 0.55 in float64, COCO's threshold
    assert np.linspace(0.5, 0.95, 10)[1] == 5500 / 10000
    r = assert_equal_to_reference({"a": t}, {"a": p}, len(bdd.DET_CLASSES))
    assert (r["map"], r["map50"]) == (
        pytest.approx(0.2),
        pytest.approx(1.0),
    )  # hits at 0.50 and 0.55, not 0.1


def test_a_32_by_32_box_is_small_and_medium_as_pycocotools_scores_it():
    t = truth((CAR, [0, 0, 32, 32]), (BUS, [100, 100, 196, 196]))  # exactly 32² and 96²
    p = preds((CAR, 0.9, [0, 0, 32, 32]), (BUS, 0.8, [100, 100, 196, 196]))
    r = assert_equal_to_reference({"a": t}, {"a": p}, len(bdd.DET_CLASSES))
    assert {s: r["per_size"][s]["gt_boxes"] for s in SIZES} == {"small": 1, "medium": 2, "large": 1}
    assert all(r["per_size"][s]["map"] == pytest.approx(1.0) for s in SIZES)


def test_more_than_100_detections_in_an_image_are_capped_per_class_as_coco_does():
    # 3 classes x 60 boxes, each found: 180 detections in one image; COCO keeps 100 per image *and class*
    boxes = [(c, [12.0 * i, 40.0 * c, 12.0 * i + 10, 40.0 * c + 30]) for c in range(3) for i in range(60)]
    t = truth(*boxes)
    p = preds(*[(c, 0.5 + 0.001 * i, b) for i, (c, b) in enumerate(boxes)])
    r = assert_equal_to_reference({"a": t}, {"a": p}, 3)
    assert r["map"] == pytest.approx(1.0)
    # 130 detections of one class: its 100 best are scored, 30 of its boxes stay missed
    t = truth(*[(0, [12.0 * i, 0, 12.0 * i + 10, 30]) for i in range(130)])
    p = preds(*[(0, 1 - 0.001 * i, [12.0 * i, 0, 12.0 * i + 10, 30]) for i in range(130)])
    r = assert_equal_to_reference({"a": t}, {"a": p}, 3)
    assert r["map"] == pytest.approx(
        np.ceil(100 / 130 * 100 + 1e-9) / 101
    )  # precision 1 up to recall 100/130


def test_a_detection_on_an_ignore_region_is_neither_hit_nor_false_positive():
    # a car, and det_20's "other vehicle" beside it: a crowd region of car (what bdd_to_yolo's side file holds)
    t = Boxes(np.array([[0, 0, 100, 100], [200, 0, 300, 100]], float), np.array([CAR, CAR]), None,
              np.array([False, True]))  # fmt: skip
    on_region = (CAR, 0.9, [210, 10, 290, 90])  # inside the region: IoU with it (as COCO counts crowd) 1
    p = preds(on_region, (CAR, 0.8, [0, 0, 100, 100]), (CAR, 0.7, [400, 400, 450, 450]))
    r = assert_equal_to_reference({"a": t}, {"a": p}, len(bdd.DET_CLASSES))
    # by hand: the first detection is ignored, the car is found at precision 1, the false positive ranks last
    assert r["map"] == pytest.approx(1.0) and r["per_class"]["car"]["gt_boxes"] == 1 and r["crowd_boxes"] == 1
    # by hand, the region left out (as before): the detection on it is a false positive ranked first,
    # precision 1/2 at recall 1: AP 0.5 at every threshold
    dropped = Boxes(t.xyxy[:1], t.cls[:1])
    assert detection_map({"a": p}, {"a": dropped}, bdd.DET_CLASSES)["map"] == pytest.approx(0.5)
    # a region nobody detects is not missed; a detection of another class on it stays a false positive
    assert detection_map({"a": preds((CAR, 0.8, [0, 0, 100, 100]))}, {"a": t}, bdd.DET_CLASSES)[
        "map"
    ] == pytest.approx(1.0)
    other = preds((PED, 0.9, [210, 10, 290, 90]), (PED, 0.8, [500, 0, 520, 40]))
    t_ped = Boxes(np.vstack([t.xyxy, [[500, 0, 520, 40]]]), np.array([CAR, CAR, PED]), None,
                  np.array([False, True, False]))  # fmt: skip
    r = assert_equal_to_reference({"a": t_ped}, {"a": other}, len(bdd.DET_CLASSES))
    assert r["per_class"]["pedestrian"]["map50"] == pytest.approx(0.5)  # FP first, then the pedestrian


def test_images_with_no_detections_at_all_and_class_ids_out_of_range():
    truths = {"a": truth((CAR, [0, 0, 10, 10]))}
    r = detection_map({}, truths, bdd.DET_CLASSES)
    assert r["map"] == 0.0 and r["per_class"]["bus"]["map"] is None
    with pytest.raises(ValueError, match=r"class ids \[12\] outside 0..9"):
        detection_map({"a": preds((12, 0.5, [0, 0, 10, 10]))}, truths, bdd.DET_CLASSES)


def test_read_yolo_labels_adds_the_ignore_side_file_as_crowd(tmp_path):
    labels, ignore = tmp_path / "ds" / "labels" / "val", tmp_path / "ds" / "ignore" / "val"
    labels.mkdir(parents=True)
    ignore.mkdir(parents=True)
    (labels / "x.txt").write_text("2 0.5 0.5 0.1 0.2\n")
    (ignore / "x.txt").write_text("0 0.25 0.25 0.5 0.5\n")
    assert metrics.ignore_path(labels / "x.txt") == ignore / "x.txt"
    boxes = read_yolo_labels(labels / "x.txt", 200, 100)
    assert boxes.cls.tolist() == [2, 0] and boxes.is_crowd.tolist() == [False, True]
    assert boxes.xyxy.ravel().tolist() == pytest.approx([90, 40, 110, 60, 0, 0, 100, 50])
    (ignore / "y.txt").write_text("0 0.25 0.25 0.5 0.5\n")  # regions only: a frame of only crowd
    only = read_yolo_labels(labels / "y.txt", 200, 100)
    assert only.is_crowd.tolist() == [True]
    assert metrics.ignore_path(tmp_path / "x.txt") is None
    assert read_yolo_labels(tmp_path / "x.txt", 200, 100).crowd is None


def test_predict_boxes_asks_ultralytics_for_100_detections_per_class(monkeypatch, tmp_path):
    from annotation import yolo_runtime

    asked = {}

    def fake_stream(loaded, images, list_file, **kwargs):
        asked.update(kwargs)
        return iter(())

    monkeypatch.setattr(yolo_runtime, "stream_predictions", fake_stream)
    model = yolo_runtime.LoadedModel(None, dict(enumerate(bdd.DET_CLASSES)), "fake", "fake")
    metrics.predict_boxes(model, [], tmp_path / "list.txt", imgsz=64)
    assert asked["max_det"] == 100 * 10  # ultralytics' max_det is per image across classes
    metrics.predict_boxes(model, [], tmp_path / "list.txt", imgsz=64, classes=[2, 4])
    assert asked["max_det"] == 200 and asked["classes"] == [2, 4]


def test_scalabel_predictions_are_the_toolkit_s_inclusive_boxes(tmp_path):
    p = preds((CAR, 0.9, [10, 20, 50, 60]), (BUS, 0.25, [0.5, 1.5, 100.5, 41.5]))
    path = metrics.write_scalabel_predictions({tmp_path / "imgs" / "abc.jpg": p, "def.jpg": preds()}, bdd.DET_CLASSES,
                                              tmp_path / "preds.json")  # fmt: skip
    frames = json.loads(path.read_text())
    assert [f["name"] for f in frames] == ["abc.jpg", "def.jpg"] and frames[1]["labels"] == []
    car, bus = frames[0]["labels"]
    assert (car["category"], car["score"], bus["category"], bus["score"]) == ("car", 0.9, "bus", 0.25)
    # the toolkit reads width as x2 - x1 + 1: 40 px from 10, as ours
    assert car["box2d"] == {"x1": 10, "y1": 20, "x2": 49, "y2": 59}
    assert bus["box2d"] == {"x1": 0.5, "y1": 1.5, "x2": 99.5, "y2": 40.5}
    assert "pycocotools' COCOeval" in metrics.DEFINITION and "crowd" in metrics.DEFINITION


# ---------------------------------------------------------------------------------------------------------------
# the BDD100K toolkit (optional: runs where `pip install bdd100k` was done; not a project dependency)
# ---------------------------------------------------------------------------------------------------------------


def det20_case(seed: int, n_frames: int = 6) -> tuple[list[dict], dict]:
    """det_20 frames (ignored categories, crowd boxes, inclusive pixels inside 1280x720) and predictions."""
    rng = np.random.default_rng(seed)
    categories = [
        *bdd.DET_CLASSES[:4],
        *bdd.DET20_IGNORED,
    ]  # pedestrian, rider, car, truck and the ignored ones
    frames, predictions = [], {}
    for i in range(n_frames):
        labels, dets = [], []
        for j in range(int(rng.integers(1, 10))):
            w, h = np.exp(rng.uniform(np.log(6), np.log(300), 2))
            x1, y1 = rng.uniform(0, 1270 - w), rng.uniform(0, 710 - h)
            category = str(rng.choice(categories))
            attributes = {"occluded": False, "crowd": bool(rng.random() < 0.15)}
            box = {"x1": x1, "y1": y1, "x2": x1 + w - 1, "y2": y1 + h - 1}  # inclusive: width x2 - x1 + 1
            labels.append({"id": f"{i}-{j}", "category": category, "attributes": attributes, "box2d": box})
            if rng.random() < 0.8:
                cls = bdd.DET_CLASS_YOLO_ID[bdd.canonical_category(category).det_class]
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                dets.append(
                    (
                        cls,
                        float(rng.random()),
                        [x1 + jitter[0], y1 + jitter[1], x1 + w + jitter[2], y1 + h + jitter[3]],
                    )
                )
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, 1100), rng.uniform(0, 600)
            dets.append((int(rng.integers(0, 4)), float(rng.random()), [x1, y1, x1 + rng.uniform(5, 150), y1 + rng.uniform(5, 100)]))  # fmt: skip
        frames.append({"name": f"f{i}.jpg", "attributes": {"weather": "clear"}, "labels": labels})
        predictions[f"f{i}.jpg"] = preds(*dets)
    return frames, predictions


def truths_of(frames: list[dict]) -> dict:
    """Our ground truth of det_20 frames: continuous boxes [x1, x2 + 1), ignore regions as crowd."""
    out = {}
    for frame in bdd.decode_frames(json.dumps(frames).encode()):
        rows = [(bdd.DET_CLASS_YOLO_ID[bdd.category_of(x).det_class], bdd.is_crowd_region(x),
                 [x.box2d.x1, x.box2d.y1, x.box2d.x2 + 1, x.box2d.y2 + 1]) for x in frame.label_list()]  # fmt: skip
        out[frame.name] = Boxes(np.array([r[2] for r in rows]), np.array([r[0] for r in rows]), None,
                                np.array([r[1] for r in rows]))  # fmt: skip
    return out


@pytest.mark.parametrize("seed", range(3))
def test_the_bdd100k_toolkit_gives_the_same_numbers(tmp_path, seed):
    # the toolkit needs pydantic 1, so it lives in an environment of its own (`make test` builds .venv-bdd100k)
    toolkit = os.environ.get("BDD100K_TOOLKIT_PYTHON")
    if not toolkit:
        pytest.skip("BDD100K_TOOLKIT_PYTHON is not set (make test sets it to .venv-bdd100k/bin/python)")
    frames, predictions = det20_case(seed)
    (tmp_path / "det_val.json").write_text(json.dumps(frames))
    metrics.write_scalabel_predictions(predictions, bdd.DET_CLASSES, tmp_path / "preds.json")
    # the command annotation/README.md gives users
    cmd = [toolkit, "-m", "bdd100k.eval.run", "-t", "det", "-g", "det_val.json", "-r", "preds.json",
           "--nproc", "1", "--out-file", "toolkit.json"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "toolkit.json").read_text())  # percent; NaN where a class has no truth
    ours = detection_map(predictions, truths_of(frames), bdd.DET_CLASSES)
    assert ours["crowd_boxes"] > 0

    def same(a: float | None, percent: float) -> bool:
        return (a is None and np.isnan(percent)) or (a is not None and abs(a - percent / 100) < 1e-6)

    overall = {k: result[k][1]["OVERALL"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    pairs = [(ours["map"], overall["AP"]), (ours["map50"], overall["AP50"]), (ours["map75"], overall["AP75"])]
    pairs += [(ours["per_size"][s]["map"], overall[f"AP{s[0]}"]) for s in SIZES]
    pairs += [(ours["per_class"][n]["map"], result["AP"][0][n]) for n in bdd.DET_CLASSES]
    pairs += [(ours["per_class"][n]["map50"], result["AP50"][0][n]) for n in bdd.DET_CLASSES]
    assert sum(not np.isnan(b) for _, b in pairs) >= 10  # the case scores several classes and sizes
    assert all(same(a, b) for a, b in pairs), pairs
