"""annotation/metrics.py: COCO mAP of tiny hand-made cases, against values computed by hand.

COCO's AP averages interpolated precision at 101 recall points (0, 0.01, ..., 1): a class whose only detection
finds one of its two boxes has precision 1 up to recall 0.5 and none beyond, so AP = 51/101.
"""

from __future__ import annotations

import numpy as np
import pytest

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
