"""Labels from layout and detector together (annotation/consensus.py, dataset.decide, the CLI's labels.source).

Unit tests on hand-made boxes (every combination of confirmed, layout-only and detector-only, IoU edges, class
mismatch, one detection over two source boxes, the policies, the agreement arithmetic), decisions on hand-written
metadata (scaling, inline labels, images without a layout), and one run through the command line with the tests'
small detector (tests/yolo_fixture.py): consensus labels, a rerun to layout labels without inference, previews.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from PIL import Image
from yolo_fixture import DetectorParams, cached_detector, training_boxes

from annotation import consensus, dataset
from annotation.consensus import BoxProvenance, agreement_stats, match_provenance, resolve_labels, size_of
from annotation.layout import LayoutSources, read_metadata
from annotation.settings import AnnotationConfig
from annotation.yolo_annotate_folders import main
from core.cli import UserError, run_main
from vocab import bdd

CAR, TRUCK, PED = (bdd.DET_CLASS_YOLO_ID[c] for c in ("car", "truck", "pedestrian"))
PARAMS = DetectorParams()


def kinds(boxes: list[BoxProvenance]) -> list[tuple[str, int]]:
    return [(b.provenance, b.class_id) for b in boxes]


def label_boxes(labels: list[dict]) -> list[tuple[str, int, list[float]]]:
    return [(label["provenance"], label["class_id"], label["box_xyxy"]) for label in labels]


# ---------------------------------------------------------------------------------------------------------------
# matching and provenance
# ---------------------------------------------------------------------------------------------------------------

#: one box of each provenance, far apart: a confirmed car, a layout-only pedestrian, a detector-only truck
C_SRC, C_DET = (CAR, [0, 0, 40, 40]), (CAR, 0.9, [0, 0, 40, 36])  # IoU 0.9
L_SRC = (PED, [100, 0, 110, 30])
D_DET = (TRUCK, 0.7, [200, 0, 260, 40])


@pytest.mark.parametrize(
    "present",
    [c for n in range(4) for c in itertools.combinations("CLD", n)],
    ids=lambda c: "".join(c) or "none",
)
def test_every_combination_of_provenance_and_what_each_mode_and_policy_labels(present):
    sources = ([C_SRC] if "C" in present else []) + ([L_SRC] if "L" in present else [])
    detections = ([C_DET] if "C" in present else []) + ([D_DET] if "D" in present else [])
    boxes = match_provenance(detections, sources, 0.5, min_confidence=0.25)
    want = [("confirmed", CAR)] * ("C" in present) + [("layout_only", PED)] * ("L" in present)
    want += [("detector_only", TRUCK)] * ("D" in present)
    assert kinds(boxes) == want  # source boxes in source order, then detector-only ones

    c = [("confirmed", CAR, C_SRC[1])] if "C" in present else []
    c_det = [("confirmed", CAR, C_DET[2])] if "C" in present else []
    lo = [("layout_only", PED, L_SRC[1])] if "L" in present else []
    do = [("detector_only", TRUCK, D_DET[2])] if "D" in present else []
    disagree = "L" in present or "D" in present

    def run(source, **kw):
        labels, reasons = resolve_labels(boxes, source, min_confidence=0.25, max_disagreement=1.0, **kw)
        return label_boxes(labels), reasons

    assert run("consensus", policy="keep_layout") == (c + lo + do, [])
    assert run("consensus", policy="confirmed") == (c + do, [])
    assert run("consensus", policy="strict") == (c, ["layout_disagreement"] if disagree else [])
    assert run("consensus", policy="keep_layout", geometry="detector") == (c_det + lo + do, [])
    assert run("consensus", policy="keep_layout", detector_only_min_confidence=None) == (c + lo, [])
    assert run("consensus", policy="keep_layout", detector_only_min_confidence=0.71) == (c + lo, [])
    assert run("detector") == (c_det + do, [])  # the detections, never rejected by disagreement
    assert run("layout") == (c + lo, [])  # the source boxes, confirmed or not
    confidences = [label["confidence"] for label in resolve_labels(boxes, "layout", min_confidence=0.25)[0]]
    assert confidences == [0.9] * ("C" in present) + [None] * ("L" in present)  # layout-only: no score


def test_iou_edges_class_mismatch_and_confidence_thresholds():
    src = [(CAR, [0, 0, 10, 10])]
    # IoU exactly at the threshold confirms (>=), just below does not
    assert kinds(match_provenance([(CAR, 0.9, [0, 0, 10, 5])], src, 0.5, 0.25)) == [("confirmed", CAR)]
    assert kinds(match_provenance([(CAR, 0.9, [0, 0, 10, 4.9])], src, 0.5, 0.25)) == [
        ("layout_only", CAR),
        ("detector_only", CAR),
    ]
    # touching boxes (IoU 0) and a degenerate detection never match
    assert kinds(match_provenance([(CAR, 0.9, [10, 0, 20, 10])], src, 0.01, 0.25))[0] == ("layout_only", CAR)
    assert kinds(match_provenance([(CAR, 0.9, [5, 5, 5, 5])], src, 0.01, 0.25))[0] == ("layout_only", CAR)
    # right place, wrong class: a layout-only car and a detector-only truck
    assert kinds(match_provenance([(TRUCK, 0.9, [0, 0, 10, 10])], src, 0.5, 0.25)) == [
        ("layout_only", CAR),
        ("detector_only", TRUCK),
    ]
    # a detection under min_confidence is no disagreement; it confirms only from confirm_min_confidence on
    weak = [(CAR, 0.15, [0, 0, 10, 10]), (PED, 0.2, [50, 50, 60, 60])]
    assert kinds(match_provenance(weak, src, 0.5, 0.25)) == [("layout_only", CAR)]
    boxes = match_provenance(weak, src, 0.5, 0.25, confirm_min_confidence=0.1)
    assert kinds(boxes) == [("confirmed", CAR)] and boxes[0].confidence == 0.15  # the pedestrian: ignored
    assert boxes[0].iou == pytest.approx(1.0) and boxes[0].detection_index == 0


def test_one_detection_over_two_source_boxes_and_two_detections_of_one():
    front, behind = [0, 0, 10, 10], [0, 0, 10, 8]  # two overlapping cars (IoU 0.8)
    det = (CAR, 0.9, [0, 0, 10, 9])  # IoU 0.9 with the front car, 0.889 with the one behind
    boxes = match_provenance([det], [(CAR, behind), (CAR, front)], 0.5, 0.25)
    assert kinds(boxes) == [("layout_only", CAR), ("confirmed", CAR)]  # it confirms the one it overlaps most
    assert boxes[1].layout_xyxy == tuple(front)
    # a second detection of one source box: the more confident one confirms, the other is detector-only,
    # whatever their order in the list
    dets = [(CAR, 0.4, [0, 0, 10, 10]), (CAR, 0.8, [0, 0, 10, 9])]
    boxes = match_provenance(dets, [(CAR, front)], 0.5, 0.25)
    assert kinds(boxes) == [("confirmed", CAR), ("detector_only", CAR)]
    assert boxes[0].confidence == 0.8 and boxes[1].confidence == 0.4 and boxes[1].detection_index == 0


@pytest.mark.parametrize("confirm", [None, 0.1, 0.5])
def test_detector_labels_with_a_layout_are_the_labels_without_one(confirm):
    """labels.source detector: a layout changes scores and provenance, never which detections become labels."""
    detections = [
        (CAR, 0.9, [0, 0, 10, 10]), (CAR, 0.3, [20, 0, 30, 10]), (CAR, 0.15, [40, 0, 50, 10]),
        (PED, 0.6, [0, 20, 5, 30]), (CAR, 0.7, [0, 0, 10, 9]),
    ]  # fmt: skip
    sources = [(CAR, [0, 0, 10, 10]), (CAR, [40, 0, 50, 10]), (PED, [100, 0, 105, 10])]
    boxes = match_provenance(detections, sources, 0.5, 0.25, confirm_min_confidence=confirm)
    labels, reasons = resolve_labels(boxes, "detector", min_confidence=0.25)
    as_records = [
        {"class": bdd.DET_CLASSES[c], "class_id": c, "confidence": conf, "box_xyxy": box}
        for c, conf, box in detections
    ]
    without = consensus.detector_labels(as_records, 0.25)
    assert [(x["class_id"], x["confidence"], x["box_xyxy"]) for x in labels] == [
        (x["class_id"], x["confidence"], x["box_xyxy"]) for x in without
    ] and reasons == []
    assert [x["confidence"] for x in without] == [0.9, 0.3, 0.6, 0.7]  # detection order, >= min_confidence


def test_disagreement_threshold_and_strict_policy():
    sources = [(CAR, [0, 0, 10, 10]), (CAR, [20, 0, 30, 10]), (PED, [40, 0, 45, 10])]
    detections = [(CAR, 0.9, [0, 0, 10, 10]), (CAR, 0.6, [60, 0, 70, 10])]
    boxes = match_provenance(detections, sources, 0.5, 0.25)  # 1 confirmed, 2 layout-only, 1 detector-only
    n = consensus.counts_of(boxes)
    assert n == {"confirmed": 1, "layout_only": 2, "detector_only": 1}
    assert consensus.disagreement_share(n) == 0.75
    for policy in ("keep_layout", "confirmed"):
        for limit, rejected in ((0.75, False), (0.74, True)):
            _, reasons = resolve_labels(
                boxes, "consensus", min_confidence=0.25, policy=policy, max_disagreement=limit
            )
            assert reasons == (["layout_disagreement"] if rejected else []), (policy, limit)
    assert consensus.disagreement_share(consensus.counts_of([])) == 0.0
    with pytest.raises(
        ValueError, match="labels policy 'lenient' is not one of keep_layout, confirmed, strict"
    ):
        resolve_labels(boxes, "consensus", min_confidence=0.25, policy="lenient")


# ---------------------------------------------------------------------------------------------------------------
# agreement rates per class and size
# ---------------------------------------------------------------------------------------------------------------


def test_coco_size_buckets():
    assert size_of([0, 0, 31.9, 32]) == "small" and size_of([0, 0, 32, 32]) == "medium"
    assert size_of([0, 0, 96, 95.9]) == "medium" and size_of([0, 0, 96, 96]) == "large"
    # a confirmed pair is bucketed by its source box (as COCO buckets a match by its ground truth)
    boxes = match_provenance([(CAR, 0.9, [0, 0, 34, 34])], [(CAR, [0, 0, 30, 30])], 0.5, 0.25)
    assert boxes[0].provenance == "confirmed" and boxes[0].size == "small"  # 900 px², the detection 1156


def test_agreement_rates_per_class_and_size_equal_hand_computed_values():
    image1 = match_provenance(
        [(CAR, 0.9, [0, 0, 20, 20]), (PED, 0.8, [300, 0, 400, 100])],
        [(CAR, [0, 0, 20, 20]), (CAR, [100, 0, 150, 50])],
        0.5,
        0.25,
    )  # confirmed car 400 px² (small), layout-only car 2500 (medium), detector-only pedestrian 10000 (large)
    image2 = match_provenance(
        [(CAR, 0.9, [0, 0, 100, 100]), (CAR, 0.5, [200, 200, 210, 210])], [(CAR, [0, 0, 100, 100])], 0.5, 0.25
    )  # confirmed car (large), detector-only car 100 px² (small)
    image3: list = []  # an image with a layout and no box at all
    stats = agreement_stats([b.to_json() for b in image] for image in (image1, image2, image3))
    assert stats["images"] == 3
    assert stats["all"] == {
        "confirmed": 2, "layout_only": 1, "detector_only": 2, "total": 5,
        "confirmed_rate": 0.4, "layout_only_rate": 0.2, "detector_only_rate": 0.4,
        "layout_recall": 0.6667, "layout_precision": 0.5,
    }  # fmt: skip
    assert stats["per_class"] == {
        "pedestrian": {
            "confirmed": 0, "layout_only": 0, "detector_only": 1, "total": 1,
            "confirmed_rate": 0.0, "layout_only_rate": 0.0, "detector_only_rate": 1.0,
            "layout_recall": None, "layout_precision": 0.0,
        },
        "car": {
            "confirmed": 2, "layout_only": 1, "detector_only": 1, "total": 4,
            "confirmed_rate": 0.5, "layout_only_rate": 0.25, "detector_only_rate": 0.25,
            "layout_recall": 0.6667, "layout_precision": 0.6667,
        },
    }  # fmt: skip
    assert list(stats["per_class"]) == ["pedestrian", "car"]  # BDD class order
    sizes = {s: (v["confirmed"], v["layout_only"], v["detector_only"]) for s, v in stats["per_size"].items()}
    assert sizes == {"small": (1, 0, 1), "medium": (0, 1, 0), "large": (1, 0, 1)}
    assert (
        stats["per_size"]["small"]["confirmed_rate"] == 0.5
        and stats["per_size"]["medium"]["layout_recall"] == 0
    )
    assert "32^2" in stats["size_buckets"] and "generated image's pixels" in stats["size_buckets"]


# ---------------------------------------------------------------------------------------------------------------
# decisions on hand-written metadata: scaling, inline labels, det_20 files, images without a layout
# ---------------------------------------------------------------------------------------------------------------


def record(folder: Path, file: str, size: tuple[int, int], detections=()) -> dict:
    return {
        "key": f"gen/{file}", "source": str(folder / file), "width": size[0], "height": size[1], "error": None,
        "detections": [
            {"class": bdd.DET_CLASSES[c], "class_id": c, "confidence": conf, "box_xyxy": list(box)}
            for c, conf, box in detections
        ],
    }  # fmt: skip


def config(**labels) -> AnnotationConfig:
    return AnnotationConfig.model_validate(
        {"labels": labels, "filter": {"min_recall": 0, "min_precision": 0}}
    )


def yolo_lines(text: str) -> list[tuple[int, list[float]]]:
    return [(int(line.split()[0]), [float(v) for v in line.split()[1:]]) for line in text.splitlines()]


def assert_lines(text: str, want: list[tuple[int, list[float]]]) -> None:
    """YOLO label text equals ``want`` to the six decimals it is written with."""
    got = yolo_lines(text)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [v for _, v in got] == [pytest.approx(v, abs=1e-6) for _, v in want]


def test_layout_labels_scaled_from_source_size_inline_and_det20(tmp_path):
    det20 = tmp_path / "det_val.json"
    det20.write_text(
        json.dumps(
            [
                {
                    "name": "frame-a.jpg",
                    "labels": [
                        {"id": "1", "category": "car", "box2d": {"x1": 100, "y1": 200, "x2": 299, "y2": 399}},
                        {
                            "id": "2",
                            "category": "other vehicle",
                            "box2d": {"x1": 0, "y1": 0, "x2": 99, "y2": 99},
                        },
                    ],
                }
            ]
        )
    )
    inline = [
        {
            "category": "car",
            "box2d": {"x1": 10, "y1": 20, "x2": 49, "y2": 59},
            "attributes": {"occluded": True},
        },
        {"category": "pedestrian", "box2d": {"x1": 100, "y1": 40, "x2": 109, "y2": 79}},
    ]
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file": "a.png", "source_frame": "frame-a.jpg", "source_labels": "det_val.json",
                    "source_size": [1280, 720]}) + "\n"
        # inline labels win over source_frame/source_labels (the frame named here is not in the file)
        + json.dumps({"file": "b.png", "source_frame": "planned-7.jpg", "source_labels": "det_val.json",
                      "source_size": [320, 180], "labels": inline}) + "\n"
        + json.dumps({"file": "c.png", "source_frame": "missing.jpg", "source_labels": "det_val.json"}) + "\n"
    )  # fmt: skip
    refs = read_metadata(tmp_path / "metadata.jsonl")
    assert [label.category for label in refs["b.png"].labels] == ["car", "pedestrian"]
    assert refs["b.png"].labels[0].attributes.is_occluded and refs["a.png"].labels is None
    layout, cfg = LayoutSources(), config(source="layout")
    every_class = set(range(10))

    # det_20 frame at 1280x720 -> image saved at 640x360: x0.5; det_20's ignored "other vehicle" is no label
    a = record(tmp_path, "a.png", (640, 360))
    dataset.decide(a, cfg, layout, every_class)
    assert a["labels_source"] == "layout" and a["labels_note"] is None and a["status"] == "accepted"
    assert label_boxes(a["labels"]) == [("layout_only", CAR, [50.0, 100.0, 150.0, 200.0])]
    text, confs = dataset.label_lines(a)
    assert_lines(text, [(CAR, [100 / 640, 150 / 360, 100 / 640, 100 / 360])])
    assert confs == "nan\n"

    # inline labels in the 320x180 plan -> image saved at 640x360: x2, in the continuous (x2 + 1) convention
    b = record(tmp_path, "b.png", (640, 360))
    dataset.decide(b, cfg, layout, every_class)
    assert b["layout_note"] == "2 source boxes from inline labels of planned-7.jpg"
    assert label_boxes(b["labels"]) == [
        ("layout_only", CAR, [20.0, 40.0, 100.0, 120.0]),
        ("layout_only", PED, [200.0, 80.0, 220.0, 160.0]),
    ]
    assert_lines(
        dataset.label_lines(b)[0],
        [(CAR, [60 / 640, 80 / 360, 80 / 640, 80 / 360]), (PED, [210 / 640, 120 / 360, 20 / 640, 80 / 360])],
    )
    # saved at the plan's own size (generate_at_bucket resized back): no scaling
    b_same = record(tmp_path, "b.png", (320, 180))
    dataset.decide(b_same, cfg, layout, every_class)
    assert [label["box_xyxy"] for label in b_same["labels"]] == [
        [10.0, 20.0, 50.0, 60.0],
        [100.0, 40.0, 110.0, 80.0],
    ]
    # classes the detector cannot output are no part of the layout (here: no pedestrian)
    b_cars = record(tmp_path, "b.png", (640, 360))
    dataset.decide(b_cars, cfg, layout, {CAR})
    assert [label["class"] for label in b_cars["labels"]] == ["car"]

    # a frame missing from its labels file, and an image no metadata record names: no layout, detector labels
    dets = [(CAR, 0.8, [1, 1, 30, 30]), (CAR, 0.2, [40, 40, 50, 50])]
    for rec in (record(tmp_path, "c.png", (640, 360), dets), record(tmp_path, "d.png", (640, 360), dets)):
        dataset.decide(rec, cfg, layout, every_class)
        assert rec["labels_source"] == "detector" and rec["provenance"] is None and rec["layout"] is None
        assert label_boxes(rec["labels"]) == [("detector", CAR, [1, 1, 30, 30])]
        assert (
            "no source layout" in rec["labels_note"]
            and "detector labels instead of layout" in rec["labels_note"]
        )
    assert f"frame missing.jpg not in {det20}" in rec_note(tmp_path, "c.png", layout)
    assert "no metadata.jsonl record" in rec_note(tmp_path, "d.png", layout)


def rec_note(folder: Path, file: str, layout: LayoutSources) -> str:
    rec = record(folder, file, (64, 64))
    dataset.decide(rec, config(source="consensus"), layout, set(range(10)))
    assert rec["labels_source"] == "detector"
    return rec["labels_note"]


def test_decide_consensus_records_provenance_layout_scores_and_policy(tmp_path):
    inline = [
        {"category": "car", "box2d": {"x1": 0, "y1": 0, "x2": 39, "y2": 39}},  # detected: confirmed
        {"category": "car", "box2d": {"x1": 100, "y1": 0, "x2": 139, "y2": 39}},  # missed: layout-only
    ]
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file": "a.png", "labels": inline, "source_size": [320, 180]})
    )
    dets = [
        (CAR, 0.9, [0, 0, 40, 38]),
        (TRUCK, 0.6, [200, 100, 260, 140]),  # detector-only, kept by keep_layout (>= 0.5)
        (PED, 0.3, [300, 100, 310, 130]),  # detector-only, dropped (< 0.5)
        (CAR, 0.1, [100, 100, 110, 110]),  # below min_confidence: nothing
    ]
    layout = LayoutSources()
    rec = record(tmp_path, "a.png", (320, 180), dets)
    cfg = AnnotationConfig.model_validate({"predict": {"conf": 0.05}})  # the shipped defaults otherwise
    dataset.decide(rec, cfg, layout, set(range(10)))
    assert [(b["provenance"], b["class"], b["label"]) for b in rec["provenance"]] == [
        ("confirmed", "car", True),
        ("layout_only", "car", True),
        ("detector_only", "truck", True),
        ("detector_only", "pedestrian", False),
    ]
    assert rec["layout"] | {"source_frame": None} == {
        "source_frame": None, "recall": 0.5, "precision": 0.3333, "score": 0.4, "matched": 1, "n_source": 2,
        "n_detected": 3, "n_confirmed": 1, "n_layout_only": 1, "n_detector_only": 2, "disagreement": 0.75,
    }  # fmt: skip
    # max_disagreement 0.5 < 0.75: rejected; with a looser limit accepted with three labels
    assert rec["status"] == "rejected" and rec["reasons"] == ["layout_disagreement"]
    rec = record(tmp_path, "a.png", (320, 180), dets)
    dataset.decide(rec, config(max_disagreement=0.8), layout, set(range(10)))
    assert rec["status"] == "accepted" and rec["counts"] == {"car": 2, "truck": 1} and rec["n_labels"] == 3
    assert rec["kept"] == 3  # detections at or above min_confidence (the detector's own count)
    assert dataset.label_lines(rec)[1] == "0.900000\nnan\n0.600000\n"
    # detector labels for the same image: the layout check still filters (min_recall 0.5: 0.5 passes)
    rec = record(tmp_path, "a.png", (320, 180), dets)
    dataset.decide(
        rec, AnnotationConfig.model_validate({"labels": {"source": "detector"}}), layout, set(range(10))
    )
    assert rec["status"] == "accepted" and [label["class"] for label in rec["labels"]] == [
        "car",
        "truck",
        "pedestrian",
    ]
    assert rec["layout"]["recall"] == 0.5 and rec["provenance"][0]["label"]
    # layout labels are never rejected by the detector, only by min_detections
    rec = record(tmp_path, "a.png", (320, 180), [])
    dataset.decide(
        rec, AnnotationConfig.model_validate({"labels": {"source": "layout"}}), layout, set(range(10))
    )
    assert rec["status"] == "accepted" and rec["layout"]["recall"] == 0.0 and rec["n_labels"] == 2
    rec = record(tmp_path, "a.png", (320, 180), [])
    strict_count = {"filter": {"min_detections": 3}, "labels": {"source": "layout"}}
    dataset.decide(rec, AnnotationConfig.model_validate(strict_count), layout, set(range(10)))
    assert rec["reasons"] == ["too_few_detections"]


def test_inline_labels_errors_name_file_line_and_key(tmp_path):
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(
        '{"file": "a.png", "labels": []}\n{"file": "b.png", "labels": [{"category": "car", "box2d": {"x1": "a"}}]}\n'
    )
    with pytest.raises(
        UserError,
        match=r'metadata.jsonl:2: "labels" must be a list of det_20 labels .*`labels\[0\].box2d.x1`',
    ):
        read_metadata(meta)
    meta.write_text('{"file": "a.png", "labels": [], "source_size": [64, 64]}\n')
    ref = read_metadata(meta)["a.png"]
    assert ref.labels == () and LayoutSources().source_boxes(ref, (64, 64), {CAR}) == (
        [],
        "0 source boxes from inline labels",
    )


def test_a_generation_plans_record_is_a_layout(tmp_path):
    """The record ControlNet inference writes for a planned scene (ai/controlnet/plans.py): the plan's labels
    inline, source_frame/source_labels/mask_path null, plan fields alongside."""
    label = {
        "id": "0",
        "category": "bus",
        "attributes": {"occluded": False, "truncated": True, "trafficLightColor": "NA"},
        "box2d": {"x1": 639.5, "y1": 200.0, "x2": 959.25, "y2": 499.0},
    }
    meta = {"file": "p-0001_00.png", "mask_path": None, "source_frame": None, "source_labels": None,
            "source_size": [1280, 720], "plan_id": "p-0001", "plan_source_frame": "b1c66a42-6f7d68ca.jpg",
            "plan_edits": ["mirror"], "attributes": {"weather": "rainy"}, "labels": [label]}  # fmt: skip
    (tmp_path / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    ref = read_metadata(tmp_path / "metadata.jsonl")["p-0001_00.png"]
    boxes, note = LayoutSources().source_boxes(ref, (640, 360), set(range(10)))
    assert note == "1 source boxes from inline labels"
    assert boxes == [(bdd.DET_CLASS_YOLO_ID["bus"], [319.75, 100.0, 480.125, 250.0])]  # (x2 + 1) / 2


def test_labels_settings_are_checked_with_their_keys(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    base = ["--input_folder", str(tmp_path / "in"), "--output_folder", str(tmp_path / "o")]
    assert run_main(main, [*base, "--labels_source", "layouts", "--labels_policy", "lenient"]) == 2
    err = capsys.readouterr().err
    assert "labels.source: Input should be 'detector', 'layout' or 'consensus' (got 'layouts')" in err
    assert "labels.policy: Input should be 'keep_layout', 'confirmed' or 'strict' (got 'lenient')" in err
    # layout labels for a folder in which no image has a layout: refused before anything is written
    assert run_main(main, [*base, "--labels_source", "layout"]) == 2
    err = capsys.readouterr().err
    assert "labels.source is layout, but none of the 1 images has a source layout (no metadata.jsonl" in err
    assert "--labels_source detector" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# through the command line with the tests' small detector
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(mini_bdd, tmp_path_factory) -> Path:
    return cached_detector(mini_bdd, tmp_path_factory.mktemp("yolo_detector"), PARAMS)


def manifest(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_consensus_then_layout_labels_through_the_cli_without_rerunning_the_detector(
    mini_bdd, detector, tmp_path, capsys
):
    """Three frames the detector knows, saved at 2x: one by source frame + det_20, two with an inline layout
    (one with an extra car where there is none); a fourth image without metadata (a LoRA generation)."""
    images = mini_bdd / "images" / "100k" / "train"
    det20 = mini_bdd / "labels" / "det_20" / "det_train.json"
    frames = {f.name: f for f in bdd.load_frames(det20)}
    names = [
        n
        for n, f in frames.items()
        if len(training_boxes(f, 320, 180, PARAMS)) >= 2 and (images / n).exists()
    ]
    assert len(names) >= 4
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, name in enumerate(names[:4]):
        Image.open(images / name).resize((640, 360), Image.BICUBIC).save(gen / f"{i}.png")

    def inline(name: str) -> list[dict]:
        return [
            {"category": "car", "box2d": {"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2}}
            for _, (_, b) in training_boxes(frames[name], 320, 180, PARAMS)
        ]

    phantom = {"category": "car", "box2d": {"x1": 5, "y1": 2, "x2": 45, "y2": 20}}  # in the sky: no car
    metadata = [
        {"file": "0.png", "source_frame": names[0], "source_labels": str(det20), "source_size": [320, 180]},
        {"file": "1.png", "source_frame": names[1], "labels": inline(names[1]), "source_size": [320, 180]},
        {"file": "2.png", "labels": [*inline(names[2]), phantom], "source_size": [320, 180]},
    ]
    (gen / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    out = tmp_path / "out"
    config = tmp_path / "annotation.yaml"
    config.write_text(  # no image-level rejection: what the labels are is what this test looks at
        f"filter:\n  layout_min_box_size: {2 * PARAMS.min_box_side}\n  min_recall: 0\n  min_precision: 0\n"
        "labels:\n  max_disagreement: 1.0\n"
    )
    base = ["--input_folder", gen, "--output_folder", out, "--config", config, "--model", detector,
            "--imgsz", str(PARAMS.imgsz), "--batch", "4", "--device", "cpu", "--classes", "car",
            "--min_detections", "0", "--val_fraction", "0"]  # fmt: skip
    assert run_main(main, [str(a) for a in base]) == 0
    stdout = capsys.readouterr().out
    records = manifest(out)
    with_layout = [records[f"gen/{i}.png"] for i in range(3)]
    lora = records["gen/3.png"]
    assert lora["labels_source"] == "detector" and lora["provenance"] is None and lora["labels_note"]
    assert all(r["labels_source"] == "consensus" and r["provenance"] for r in with_layout)
    # the phantom car is layout-only: kept as a label by keep_layout (an orange "layout" box in the preview)
    phantom_box = [10.0, 4.0, 92.0, 42.0]
    ph = [b for b in with_layout[2]["provenance"] if b["layout_xyxy"] == phantom_box]
    assert len(ph) == 1 and ph[0]["provenance"] == "layout_only" and ph[0]["label"]
    assert all(r["status"] == "accepted" for r in records.values())
    assert_lines(  # the last label of image 2, confidence nan
        dataset.dataset_paths(out, "train", with_layout[2])[1].read_text().splitlines()[-1],
        [(CAR, [51 / 640, 23 / 360, 82 / 640, 38 / 360])],
    )
    assert dataset.dataset_paths(out, "train", with_layout[2])[2].read_text().splitlines()[-1] == "nan"
    n_confirmed = sum(b["provenance"] == "confirmed" for r in with_layout for b in r["provenance"])
    n_source = sum(r["layout"]["n_source"] for r in with_layout)
    assert n_confirmed >= n_source / 2  # the detector finds most drawn cars of frames it was trained on

    # every label file holds what its record's labels say; the summary adds up the manifest's boxes
    summary = json.loads((out / "summary.json").read_text())
    for r in records.values():
        if r["status"] == "accepted":
            text = dataset.dataset_paths(out, r["split"], r)[1].read_text()
            assert len(text.splitlines()) == r["n_labels"] == len(r["labels"])
    totals = {
        p: sum(b["provenance"] == p for r in with_layout for b in r["provenance"])
        for p in consensus.PROVENANCES
    }
    agreement = summary["agreement"]
    assert agreement["images"] == 3 and {p: agreement["all"][p] for p in totals} == totals
    assert agreement["per_class"]["car"]["total"] == sum(totals.values())
    assert sum(v["total"] for v in agreement["per_size"].values()) == sum(totals.values())
    assert summary["images_by_labels_source"] == {"consensus": 3, "detector": 1}
    assert summary["images_without_layout"] == 1 and any(
        "1 image(s) have no source layout" in w for w in summary["warnings"]
    )
    assert "layout vs detector agreement over 3 images with a source layout" in stdout
    assert Image.open(out / "agreement.png").size[0] > 300
    for r in records.values():
        assert Image.open(out / "previews" / f"{r['out_stem']}.jpg").size == (640, 360)

    # the same folder relabelled from the layout: no inference, the label files are the scaled source boxes
    before_preview = (out / "previews" / f"{with_layout[2]['out_stem']}.jpg").read_bytes()
    assert run_main(main, [str(a) for a in base] + ["--labels_source", "layout"]) == 0
    stdout = capsys.readouterr().out
    assert "annotated now: 0" in stdout and "skipped (already done): 4" in stdout
    records = manifest(out)
    for i, meta in enumerate(metadata):
        r = records[f"gen/{i}.png"]
        assert r["labels_source"] == "layout" and r["status"] == "accepted"
        want = meta.get("labels") or inline(names[0])
        got = yolo_lines(dataset.dataset_paths(out, r["split"], r)[1].read_text())
        assert len(got) == len(want)
        for (cls, (cx, cy, w, h)), lab in zip(got, want, strict=True):
            b = bdd.Box2D(**lab["box2d"])  # inclusive source pixels, 320x180 -> 640x360
            x1, y1, x2, y2 = bdd.clip_box(b, 320, 180)
            assert cls == CAR
            assert (cx, cy, w, h) == pytest.approx(
                ((x1 + x2 + 1) / 640, (y1 + y2 + 1) / 360, (x2 - x1 + 1) / 320, (y2 - y1 + 1) / 180),
                abs=5e-5,  # boxes are recorded to 0.01 px
            )  # fmt: skip
    assert records["gen/3.png"]["labels_source"] == "detector"  # no layout: still the detector's labels
    assert (out / "previews" / f"{with_layout[2]['out_stem']}.jpg").read_bytes() != before_preview  # redrawn

    # strict consensus: the phantom rejects its image, and its label files are removed
    assert run_main(main, [str(a) for a in base] + ["--labels_policy", "strict"]) == 0
    capsys.readouterr()
    r = manifest(out)["gen/2.png"]
    assert r["status"] == "rejected" and r["reasons"] == ["layout_disagreement"]
    assert not any(dataset.dataset_paths(out, s, r)[1].exists() for s in dataset.SPLITS)
