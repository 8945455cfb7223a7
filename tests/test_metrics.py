"""annotation/metrics.py: COCO mAP of tiny hand-made cases, against values computed by hand.

COCO's AP averages interpolated precision at 101 recall points (0, 0.01, ..., 1): a class whose only detection
finds one of its two boxes has precision 1 up to recall 0.5 and none beyond, so AP = 51/101.
"""

from __future__ import annotations

import pytest

from ai.common.cli import UserError
from annotation.metrics import Sample, map_table, ratio, size_bin, yolo_label_boxes

CAR, BUS, PED = 2, 4, 0
HALF = 51 / 101  # one of two boxes found, no false positive


def test_one_perfect_box_scores_one_everywhere_it_is_defined():
    t = map_table([Sample("a", [(CAR, [0, 0, 10, 10])], [(CAR, 0.9, [0, 0, 10, 10])])])
    assert (t["map"], t["map50"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert t["per_class"] == {"car": {"boxes": 1, "map": pytest.approx(1.0), "map50": pytest.approx(1.0)}}
    assert t["per_size"]["small"] == {"boxes": 1, "map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    assert t["per_size"]["medium"] == {"boxes": 0, "map": None, "map50": None}
    assert t["per_size"]["large"] == {"boxes": 0, "map": None, "map50": None}
    assert (t["images"], t["boxes"], t["detections"]) == (1, 1, 1)


def test_a_box_at_iou_062_counts_at_three_of_ten_coco_thresholds():
    # IoU = 62/100: a hit at 0.50, 0.55, 0.60 and a miss at 0.65 ... 0.95
    t = map_table([Sample("a", [(CAR, [0, 0, 10, 10])], [(CAR, 0.9, [0, 0, 10, 6.2])])])
    assert t["map50"] == pytest.approx(1.0)
    assert t["map"] == pytest.approx(0.3)


def test_a_false_positive_costs_only_when_it_outranks_the_true_one():
    truth = [(CAR, [0, 0, 10, 10])]
    fp_first = [(CAR, 0.9, [50, 50, 60, 60]), (CAR, 0.8, [0, 0, 10, 10])]
    fp_last = [(CAR, 0.9, [0, 0, 10, 10]), (CAR, 0.8, [50, 50, 60, 60])]
    assert map_table([Sample("a", truth, fp_first)])["map50"] == pytest.approx(
        0.5
    )  # precision 1/2 at recall 1
    assert map_table([Sample("a", truth, fp_last)])["map50"] == pytest.approx(1.0)


def test_a_missed_box_halves_recall():
    truth = [(CAR, [0, 0, 10, 10]), (CAR, [50, 50, 60, 60])]
    t = map_table([Sample("a", truth, [(CAR, 0.9, [0, 0, 10, 10])])])
    assert t["map50"] == pytest.approx(HALF) and t["map"] == pytest.approx(HALF)
    assert map_table([Sample("a", truth, [])])["map50"] == 0.0  # nothing detected: 0, not undefined


def test_size_bins_follow_coco_areas_and_the_sample_scale():
    truth = [(CAR, [0, 0, 10, 10]), (CAR, [100, 100, 300, 300])]  # 100 px² (small), 40000 px² (large)
    t = map_table([Sample("a", truth, [(CAR, 0.9, [0, 0, 10, 10])])])
    assert t["per_size"]["small"]["map50"] == pytest.approx(1.0)
    assert t["per_size"]["large"]["map50"] == 0.0
    assert t["per_size"]["medium"]["map50"] is None
    assert [t["per_size"][b]["boxes"] for b in ("small", "medium", "large")] == [1, 0, 1]
    assert t["map50"] == pytest.approx(HALF)
    # 40x40 = 1600 px² is medium; in a reference space at half the size (400 px²) it is small
    box = [(CAR, [0, 0, 40, 40])]
    assert map_table([Sample("a", box, [(CAR, 0.9, [0, 0, 40, 40])])])["per_size"]["medium"]["boxes"] == 1
    scaled = map_table([Sample("a", box, [(CAR, 0.9, [0, 0, 40, 40])], scale=(0.5, 0.5))])
    assert scaled["per_size"]["small"]["boxes"] == 1 and scaled["per_size"]["small"][
        "map50"
    ] == pytest.approx(1.0)
    assert (size_bin(32.0**2), size_bin(32.0**2 + 1), size_bin(96.0**2 + 1)) == ("small", "medium", "large")


def test_per_class_values_class_restriction_and_classes_without_truth():
    truth = [(CAR, [0, 0, 10, 10]), (BUS, [50, 50, 90, 90])]
    dets = [(CAR, 0.9, [0, 0, 10, 10]), (PED, 0.8, [20, 20, 30, 30])]  # bus missed; a pedestrian nobody drew
    t = map_table([Sample("a", truth, dets)])
    assert t["per_class"]["car"]["map50"] == pytest.approx(1.0)
    assert t["per_class"]["bus"]["map50"] == 0.0
    assert t["per_class"]["pedestrian"] == {"boxes": 0, "map": None, "map50": None}
    assert t["map50"] == pytest.approx(0.5)  # the mean over the classes that have boxes
    only_car = map_table([Sample("a", truth, dets)], classes=[CAR])
    assert list(only_car["per_class"]) == ["car"] and only_car["map50"] == pytest.approx(1.0)
    assert (only_car["boxes"], only_car["detections"]) == (1, 1)


def test_images_pool_into_one_curve():
    a = Sample("a", [(CAR, [0, 0, 10, 10])], [(CAR, 0.9, [0, 0, 10, 10])])
    b = Sample("b", [(CAR, [0, 0, 10, 10])], [])  # an image whose car was missed
    c = Sample("c", [], [(CAR, 0.1, [0, 0, 10, 10])])  # a background image with a low false positive
    t = map_table([a, b, c])
    assert t["map50"] == pytest.approx(HALF) and t["images"] == 3
    assert map_table([])["map"] is None and map_table([])["images"] == 0


def test_ratio():
    assert ratio(0.3, 0.6) == pytest.approx(0.5)
    assert ratio(None, 0.6) is None and ratio(0.3, None) is None and ratio(0.3, 0.0) is None


def test_yolo_label_boxes_reads_normalised_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("2 0.500000 0.250000 0.100000 0.500000\n\n0 0.1 0.1 0.2 0.2\n")
    boxes = yolo_label_boxes(f, 200, 100)
    assert boxes[0][0] == 2 and boxes[0][1] == pytest.approx([90, 0, 110, 50])
    assert boxes[1][0] == 0 and boxes[1][1] == pytest.approx([0, 0, 40, 20])
    assert yolo_label_boxes(tmp_path / "none.txt", 200, 100) == []
    f.write_text("2 0.5 0.5 0.1 0.1 0.93\n")
    with pytest.raises(UserError, match=r"a.txt:1: expected 'cls cx cy w h', got '2 0.5 0.5 0.1 0.1 0.93'"):
        yolo_label_boxes(f, 200, 100)
