"""convert/plan_generation.py and convert/planning/: distribution arithmetic, allocation, determinism and
extension, edited layouts, captions for the target conditions, bad targets files."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from convert import plan_generation as pg
from convert.planning import CSV_FILE, PLAN_FILE, PLOT_FILE, REPORT_FILE, SUMMARY_FILE
from convert.planning.boxes import Box, containments, frame_boxes, ious, largest_ious
from convert.planning.editor import EditedLayout, Editor
from convert.planning.targets import DEFINED, Edits, PlanTargets, Target, load_targets
from core.cli import run_main
from vocab import bdd
from vocab.box_layout import mirror_box, render_box_layout

REPO = Path(__file__).resolve().parents[1]
W, H = 1280, 720
NO_EDITS = {"mirror": 0, "remove": 0, "move": 0, "duplicate": 0}


def label(category, box, lid="0", occluded=False, color="NA"):
    x1, y1, x2, y2 = box
    return {
        "id": lid,
        "attributes": {"occluded": occluded, "truncated": False, "trafficLightColor": color},
        "category": category,
        "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
    }


def frame(name, weather, timeofday, scene, labels=None):
    out = {"name": f"{name}.jpg", "attributes": {"weather": weather, "timeofday": timeofday, "scene": scene}}
    if labels is not None:
        out["labels"] = labels
    return out


#: Five frames with known contents (1280x720). f5 has no labels key: a frame without objects.
FRAMES = [
    frame(
        "f1",
        "clear",
        "daytime",
        "city street",
        [
            label("car", (100, 400, 299, 499)),  # 200x100: large
            label("pedestrian", (600, 380, 619, 439)),  # 20x60 = 1200: medium
            label("traffic light", (10, 10, 19, 29), color="G"),  # 10x20: small
        ],
    ),
    frame(
        "f2",
        "clear",
        "night",
        "highway",
        [
            label("car", (0, 300, 99, 379)),
            label("car", (700, 300, 799, 379)),
            label("car", (1300, 300, 1350, 350)),  # wholly outside the image: not a box of this frame
        ],
    ),
    frame(
        "f3",
        "rainy",
        "night",
        "city street",
        [
            label("truck", (500, 300, 779, 499)),  # 280x200: large, centred (ahead), 200 px high (close)
            label("pedestrian", (900, 350, 929, 429)),  # 30x80 = 2400: medium, right, far
        ],
    ),
    frame("f4", "snowy", "daytime", "residential", [label("bus", (200, 200, 599, 499))]),
    frame("f5", "rainy", "daytime", "city street"),
]


def write_labels(path: Path, frames=FRAMES) -> Path:
    path.write_text(json.dumps(frames), encoding="utf-8")
    return path


def write_targets(path: Path, targets: list[dict], edits: dict | None = None, **top) -> Path:
    data = {"seed": 0, **top, "targets": targets, "edits": {**NO_EDITS, **(edits or {})}}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def plan(tmp_path: Path, labels: Path, targets: Path, out: str = "plan", *extra: str, size=(W, H)) -> Path:
    args = ["--labels_file", str(labels), "--targets", str(targets), "--out", str(tmp_path / out)]
    args += ["--image_size", f"{size[0]}x{size[1]}", *extra]
    assert pg.main(args) == 0
    return tmp_path / out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PLAN_FILE).read_text(encoding="utf-8").splitlines()]


def csv_rows(out: Path) -> dict[tuple, dict]:
    reader = csv.DictReader(io.StringIO((out / CSV_FILE).read_text(encoding="utf-8")))
    return {(r["set"], r["weather"], r["timeofday"], r["scene"], r["class"]): r for r in reader}


# ---------------------------------------------------------------------------------------------------------------
# Distribution arithmetic and allocation
# ---------------------------------------------------------------------------------------------------------------

TRUCKS_IN_SNOW = {"name": "trucks_in_snow", "weather": "snowy", "timeofday": "all", "require": {"truck": 1},
                  "scenes": 2}  # fmt: skip
BUSES = {
    "name": "buses",
    "weather": ["rainy", "clear"],
    "timeofday": ["daytime", "night"],
    "require": {"bus": 1},
}


def test_counts_before_and_after_equal_hand_computed_values(tmp_path):
    labels = write_labels(tmp_path / "det.json")
    targets = write_targets(tmp_path / "t.yaml", [TRUCKS_IN_SNOW, BUSES])
    out = plan(tmp_path, labels, targets, "plan", "--scenes", "6")
    got = rows(out)
    # Turns by weight (1 each, ties in file order) until trucks_in_snow has its 2; each target fills its emptiest
    # cell first (ties in vocabulary order). Each pool is one frame (the only one with a truck / a bus).
    assert [(r["target"], r["cell"], r["source_frame"]) for r in got] == [
        ("trucks_in_snow", {"weather": "snowy", "timeofday": "daytime"}, "f3.jpg"),
        ("buses", {"weather": "rainy", "timeofday": "daytime"}, "f4.jpg"),
        ("trucks_in_snow", {"weather": "snowy", "timeofday": "night"}, "f3.jpg"),
        ("buses", {"weather": "rainy", "timeofday": "night"}, "f4.jpg"),
        ("buses", {"weather": "clear", "timeofday": "daytime"}, "f4.jpg"),
        ("buses", {"weather": "clear", "timeofday": "night"}, "f4.jpg"),
    ]
    assert [r["attributes"]["scene"] for r in got] == ["city street", "residential"] * 2 + ["residential"] * 2
    assert [r["id"] for r in got] == [f"plan_{i:05d}" for i in range(6)]

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["scenes"] == 6 and summary["inputs"]["frames"] == 5
    snow, buses = summary["targets"]
    # real frames of a cell count only when they hold the required classes (f4 is snowy/daytime without a truck)
    assert [(c["cell"]["timeofday"], c["real"], c["planned"], c["combined"]) for c in snow["cells"]] == [
        ("daytime", 0, 1, 1), ("night", 0, 1, 1), ("dawn/dusk", 0, 0, 0)
    ]  # fmt: skip
    assert [(c["real"], c["planned"]) for c in buses["cells"]] == [(0, 1)] * 4
    frames = {
        (d["weather"], d["timeofday"]): (d["real"], d["combined"])
        for d in summary["frames_by_weather_timeofday"]
    }
    assert frames == {
        ("clear", "daytime"): (1, 2), ("clear", "night"): (1, 2), ("rainy", "daytime"): (1, 2),
        ("rainy", "night"): (1, 2), ("snowy", "daytime"): (1, 2), ("snowy", "night"): (0, 1),
    }  # fmt: skip
    boxes = {c: (v["real"], v["combined"]) for c, v in summary["boxes_by_class"].items() if v["combined"]}
    assert boxes == {
        "car": (3, 3), "pedestrian": (2, 4), "truck": (1, 3), "bus": (1, 5), "traffic light": (1, 1)
    }  # fmt: skip

    table = csv_rows(out)
    assert table[("real", "clear", "daytime", "city street", "all")]["frames"] == "1"
    assert table[("real", "rainy", "daytime", "city street", "all")]["boxes"] == "0"  # f5: a frame, no boxes
    car = table[("real", "clear", "daytime", "city street", "car")]
    assert (car["frames"], car["boxes"], car["small"], car["medium"], car["large"]) == (
        "1",
        "1",
        "0",
        "0",
        "1",
    )
    ped = table[("real", "clear", "daytime", "city street", "pedestrian")]
    assert (ped["medium"], ped["median_height"]) == ("1", "60.0")
    assert table[("real", "clear", "daytime", "city street", "traffic light")]["small"] == "1"
    truck = table[("planned", "snowy", "night", "city street", "truck")]
    assert (truck["frames"], truck["boxes"], truck["large"], truck["median_height"]) == (
        "1",
        "1",
        "1",
        "200.0",
    )
    bus = table[
        ("combined", "snowy", "daytime", "residential", "bus")
    ]  # the real f4 only: planned ones moved
    assert (bus["frames"], bus["boxes"]) == ("1", "1")
    both = table[("combined", "rainy", "night", "city street", "all")]  # f3, nothing planned there
    assert (both["frames"], both["boxes"]) == ("1", "2")
    assert table[("combined", "rainy", "night", "residential", "bus")]["boxes"] == "1"
    assert ("real", "snowy", "night", "city street", "all") not in table

    report = (out / REPORT_FILE).read_text()
    assert "| snowy | 1 → 2 | 0 → 1 | 0 | 1 → 3 |" in report
    assert "| trucks_in_snow | snowy / daytime | 1 truck | 0 | 1 | 0 | 1 |" in report
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_capped_targets_stop_and_weights_share_the_turns(tmp_path, capsys):
    labels = write_labels(tmp_path / "det.json")
    capped = [{**TRUCKS_IN_SNOW, "scenes": 1}, {**BUSES, "scenes": 2}]
    out = plan(tmp_path, labels, write_targets(tmp_path / "t.yaml", capped), "capped", "--scenes", "9")
    assert [r["target"] for r in rows(out)] == ["trucks_in_snow", "buses", "buses"]
    assert "the targets take 3 scenes in all" in capsys.readouterr().out
    # no --scenes and no scenes: key: the sum of the targets' scenes
    out = plan(tmp_path, labels, write_targets(tmp_path / "t.yaml", capped), "summed")
    assert len(rows(out)) == 3
    weighted = [{**TRUCKS_IN_SNOW, "scenes": None, "weight": 1}, {**BUSES, "weight": 3}]
    out = plan(tmp_path, labels, write_targets(tmp_path / "w.yaml", weighted), "weighted", "--scenes", "8")
    assert [r["target"][0] for r in rows(out)] == list("bbtbbbtb")


# ---------------------------------------------------------------------------------------------------------------
# Determinism and extension (on the mini BDD100K, every edit switched on)
# ---------------------------------------------------------------------------------------------------------------

EDITING = {"mirror": 0.5, "remove": 0.5, "move": 0.7, "duplicate": 0.7, "max_moves": 3, "max_duplicates": 3}
MIXED = [
    {"name": "night_rain_pedestrians", "weather": "rainy", "timeofday": "night", "require": {"pedestrian": 2},
     "scenes": 5},
    {"name": "uniform", "weather": "all", "timeofday": "all"},
]  # fmt: skip


def mini_plan(tmp_path, mini_bdd, out, *extra, edits=EDITING):
    targets = write_targets(tmp_path / "mixed.yaml", MIXED, edits)
    args = ["--bdd_data_dir", str(mini_bdd), "--targets", str(targets), "--out", str(tmp_path / out), *extra]
    assert pg.main(args) == 0
    return tmp_path / out


def test_same_seed_same_bytes_and_a_longer_plan_extends_a_shorter_one(tmp_path, mini_bdd, capsys):
    a = mini_plan(tmp_path, mini_bdd, "a", "--scenes", "12")
    b = mini_plan(tmp_path, mini_bdd, "b", "--scenes", "12")
    assert (a / PLAN_FILE).read_bytes() == (b / PLAN_FILE).read_bytes()
    assert (a / SUMMARY_FILE).read_bytes() == (b / SUMMARY_FILE).read_bytes()
    other = mini_plan(tmp_path, mini_bdd, "other", "--scenes", "12", "--seed", "1")
    assert rows(other) != rows(a)

    short = mini_plan(tmp_path, mini_bdd, "grow", "--scenes", "5")
    first = (short / PLAN_FILE).read_text().splitlines()
    mini_plan(tmp_path, mini_bdd, "grow", "--scenes", "12")
    grown = (short / PLAN_FILE).read_text().splitlines()
    assert grown[:5] == first and grown == (a / PLAN_FILE).read_text().splitlines()
    assert "(5 kept from the plan on disk)" in capsys.readouterr().out
    kinds = {e["op"] for r in map(json.loads, grown) for e in r["edits"]}
    assert kinds == {"mirror", "remove", "move", "duplicate"}  # every edit happened somewhere

    before = (short / PLAN_FILE).read_bytes()
    args = ["--bdd_data_dir", str(mini_bdd), "--targets", str(tmp_path / "mixed.yaml"), "--out", str(short)]
    assert run_main(pg.main, [*args, "--scenes", "4"]) == 0  # fewer: the longer plan on disk is kept
    assert "already holds 12 scenes, these 4 among them: left as it is" in capsys.readouterr().out
    assert run_main(pg.main, [*args, "--scenes", "12", "--seed", "3"]) == 2
    assert f"{short / PLAN_FILE} holds another plan (row 0 differs" in capsys.readouterr().err
    assert (short / PLAN_FILE).read_bytes() == before  # nothing written
    assert run_main(pg.main, [*args, "--scenes", "3", "--seed", "3", "--overwrite"]) == 0
    assert len(rows(short)) == 3


# ---------------------------------------------------------------------------------------------------------------
# Edited layouts
# ---------------------------------------------------------------------------------------------------------------


def source_boxes(mini_bdd: Path, size) -> dict[str, list[Box]]:
    frames = bdd.load_frames(mini_bdd / "labels/det_20/det_train.json")
    return {f.name: frame_boxes(f, size) for f in frames}


def test_mirrored_layouts_have_mirrored_boxes_and_render_mirrored(tmp_path):
    labels = write_labels(tmp_path / "det.json")
    targets = write_targets(tmp_path / "t.yaml", [TRUCKS_IN_SNOW], {"mirror": 1.0})
    (row,) = rows(plan(tmp_path, labels, targets, "m", "--scenes", "1"))
    assert row["edits"] == [{"op": "mirror"}]
    truck, ped = (r["box2d"] for r in row["labels"])
    assert truck == {"x1": W - 1 - 779, "y1": 300, "x2": W - 1 - 500, "y2": 499}
    assert ped == {"x1": W - 1 - 929, "y1": 350, "x2": W - 1 - 900, "y2": 429}
    source = FRAMES[2]["labels"]
    assert np.array_equal(
        render_box_layout(row["labels"], (W, H)), np.fliplr(render_box_layout(source, (W, H)))
    )
    assert row["caption"] == (
        "A dashcam photo of a city street in the daytime in the snow, with a pedestrian and a truck. "
        "A truck close ahead and a pedestrian far on the left."
    )


def test_a_plan_box_mirrors_as_a_box_layout_label_does():
    """Box.mirrored and vocab.box_layout.mirror_box share one mirror arithmetic; the plan keeps 1/1000 px."""
    for x1, x2, width in [(0, 9, 100), (10.25, 20.5, 64), (500, 779, W), (0.1234, 3.98765, 63)]:
        mirrored = Box("car", "car", False, x1, 7, x2, 9).mirrored(width)
        want = mirror_box({"x1": x1, "y1": 7, "x2": x2, "y2": 9}, width)
        assert (mirrored.x1, mirrored.x2) == (round(want["x1"], 3), round(want["x2"], 3))
        assert (mirrored.y1, mirrored.y2) == (7, 9)


def test_removed_moved_and_copied_boxes_stay_inside_and_within_the_real_overlaps(tmp_path, mini_bdd):
    out = mini_plan(tmp_path, mini_bdd, "edits", "--scenes", "30", edits={**EDITING, "mirror": 0.3})
    summary = json.loads((out / SUMMARY_FILE).read_text())
    limit, real_max = summary["overlap"]["limit"], summary["overlap"]["real"]["max"]
    assert 0 < limit <= real_max
    w, h = summary["inputs"]["size"]
    sources = source_boxes(mini_bdd, (w, h))
    checked = Counter()
    for row in rows(out):
        got = [Box(b["category"], bdd.canonical_category(b["category"]).det_class,
                      bdd.canonical_category(b["category"]).ignored, **b["box2d"]) for b in row["labels"]]  # fmt: skip
        for b in got:
            assert 0 <= b.x1 <= b.x2 <= w - 1 and 0 <= b.y1 <= b.y2 <= h - 1
        src = {b.source_index: b for b in sources[row["source_frame"]]}
        if {"op": "mirror"} in row["edits"]:
            src = {i: b.mirrored(w) for i, b in src.items()}
        removed = [e["label"] for e in row["edits"] if e["op"] == "remove"]
        copies = [e for e in row["edits"] if e["op"] == "duplicate"]
        assert len(got) == len(src) - len(removed) + len(copies)
        if row["target"] == "night_rain_pedestrians":
            assert sum(b.det_class == "pedestrian" for b in got) >= 2
            assert all(src[i].det_class != "pedestrian" for i in removed)  # required classes are kept
        largest = largest_ious(got)
        for e in row["edits"]:
            if e["op"] in ("move", "duplicate"):
                want = src[e["label"]].shifted(e["dx"])
                k = next(k for k, b in enumerate(got) if b.continuous == want.continuous)
                assert got[k].category == e["category"] and abs(e["dx"]) > 0
                assert largest[k] <= limit + 1e-6, (row["id"], e)
                others = np.array([o.continuous for j, o in enumerate(got) if j != k]).reshape(-1, 4)
                assert containments(got[k].continuous, others).max(initial=0) <= 0.5 + 1e-4  # the default
                if e["op"] == "move":
                    assert abs(e["dx"]) >= src[e["label"]].width - 1e-3  # dx is kept to 1/1000 px
                checked[e["op"]] += 1
            elif e["op"] == "remove":
                assert src[e["label"]].continuous not in {b.continuous for b in got}
                checked["remove"] += 1
    assert checked["move"] and checked["duplicate"] and checked["remove"]
    containment = summary["overlap"]["containment"]
    assert containment["limit"] == 0.5 and containment["placed"] == checked["move"] + checked["duplicate"]
    assert containment["placed_90_percent_inside"] == 0 and containment["planned_max"] <= 0.5 + 1e-4


def test_a_copy_goes_only_where_the_overlap_limit_and_the_road_span_allow():
    size = (100, 50)
    ped = Box("pedestrian", "pedestrian", False, 40, 20, 49, 39)  # 10x20, baseline 39
    car = Box("car", "car", False, 60, 25, 79, 39)  # same baseline, 20x15
    editor = Editor(Edits(span_margin=1.0), overlap_limit=0.0, class_weights={"pedestrian": 1.0})
    layout = EditedLayout([ped, car], size)
    # the span: road users on this baseline cover x 40..79, widened by one pedestrian width: 30..89
    assert editor.span(layout, ped) == (30.0, 89.0)
    shifts = set()
    for seed in range(40):
        dx = editor.place(layout, 0, np.random.default_rng(seed), copy=True)
        new = ped.shifted(dx)
        assert new.x1 >= 30 and new.x2 <= 89 and ious(new.continuous, layout.others()).max() == 0
        shifts.add(dx)
    assert shifts == {-10.0, 10.0, 40.0}  # every free place of the quarter-width grid: left, between, right
    others = [Box("car", "car", False, 0, 25, 39, 39), Box("car", "car", False, 50, 25, 79, 39),
              Box("bus", "bus", False, 80, 10, 99, 39)]  # fmt: skip
    crowded = EditedLayout([ped, *others], size)  # no gap left on these rows
    assert editor.place(crowded, 0, np.random.default_rng(0), copy=True) is None


def test_a_box_is_not_moved_or_copied_mostly_inside_another():
    """IoU alone lets a small car sit inside a truck (IoU = area ratio, under 0.1 here); the containment limit
    refuses every place where more than half of the smaller box lies inside the other."""
    size = (200, 60)
    car = Box("car", "car", False, 20, 35, 39, 49)  # 20x15, baseline 49
    truck = Box("truck", "truck", False, 100, 10, 179, 49)  # 80x40, same baseline: the span is x 0..199
    layout = EditedLayout([car, truck], size)
    grid = [-20.0, *np.arange(20.0, 161.0, 5.0).tolist()]  # quarter-width grid, IoU with the original <= 0.1
    unlimited = Editor(Edits(containment_limit=1.0), overlap_limit=0.1, class_weights={"car": 1.0})
    assert unlimited.free_shifts(layout, 0, copy=True) == (grid, 0)  # dx 80..140: wholly inside the truck
    editor = Editor(Edits(containment_limit=0.5), overlap_limit=0.1, class_weights={"car": 1.0})
    # at most half inside: 10 of its 20 columns (dx <= 70), or past the truck's right half-width (dx >= 150)
    beside = [-20.0, *np.arange(20.0, 71.0, 5.0).tolist(), 150.0, 155.0, 160.0]
    assert editor.free_shifts(layout, 0, copy=True) == (beside, len(grid) - len(beside))
    assert ious(car.shifted(100).continuous, layout.others()).max() < 0.1  # the IoU limit would have taken it
    for seed in range(20):
        dx = editor.place(layout, 0, np.random.default_rng(seed), copy=True)
        assert dx in beside
    # a move whose every free place lies inside the truck is refused, and counted
    car = Box("car", "car", False, 5, 35, 24, 49)
    wide = Box("truck", "truck", False, 30, 10, 194, 49)
    layout = EditedLayout([car, wide], size)
    assert unlimited.free_shifts(layout, 0, copy=False)[0] == np.arange(20.0, 176.0, 5.0).tolist()
    assert editor.place(layout, 0, np.random.default_rng(0), copy=False) is None
    assert (layout.refused_placements, layout.refused_places) == (1, 32)


def test_a_requirement_no_layout_can_hold_is_an_error(tmp_path, capsys):
    crowded = [frame("c", "clear", "daytime", "city street",
                     [label("pedestrian", (600, 300, 609, 329)), label("car", (0, 300, 599, 329)),
                      label("car", (610, 300, 1279, 329))])]  # fmt: skip
    labels = write_labels(tmp_path / "det.json", crowded)
    need = [{"name": "crowd", "weather": "rainy", "require": {"pedestrian": 2}}]
    args = ["--labels_file", str(labels), "--targets", str(write_targets(tmp_path / "t.yaml", need))]
    code = run_main(
        pg.main, [*args, "--out", str(tmp_path / "o"), "--scenes", "1", "--image_size", "1280x720"]
    )
    assert code == 2
    assert "target 'crowd', cell rainy: no source frame can hold 2 pedestrian" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------


def test_captions_say_the_target_conditions_with_stage1_code(tmp_path):
    labels = write_labels(tmp_path / "det.json")
    target = {"name": "rain", "weather": "rainy", "timeofday": "dawn/dusk", "scene": "city street",
              "require": {"truck": 1}, "scenes": 1}  # fmt: skip
    (row,) = rows(plan(tmp_path, labels, write_targets(tmp_path / "t.yaml", [target]), "c"))
    assert row["attributes"] == {"weather": "rainy", "timeofday": "dawn/dusk", "scene": "city street"}
    assert row["source_attributes"] == {"weather": "rainy", "timeofday": "night", "scene": "city street"}
    assert row["caption"] == (
        "A dashcam photo of a city street at dawn or dusk in the rain, with a pedestrian and a truck. "
        "A truck close ahead and a pedestrian far on the right."
    )
    # stage 1 writes the same caption for the planned frame read back from a det_20 file
    from convert.captions import CaptionBuilder, TokenCounter, load_templates

    planned = bdd.decode_frames(
        json.dumps([{"name": "x.jpg", "attributes": row["attributes"], "labels": row["labels"]}]).encode()
    )[0]
    assert CaptionBuilder(load_templates(), TokenCounter(), (W, H)).caption(planned)[0] == row["caption"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_bad_targets_and_targets_the_data_cannot_supply(tmp_path, capsys):
    labels = write_labels(tmp_path / "det.json")
    cases = [
        ({"targets": [{"name": "x", "weather": "sunny"}]}, "targets.0.weather"),
        (
            {"targets": [{"name": "x", "weathr": "rainy"}]},
            "targets.0.weathr: unknown key (did you mean 'weather'",
        ),
        (
            {"targets": [{"name": "x", "require": {"pedestrian": 0}}]},
            "targets.0.require: Value error, minimum",
        ),
        ({"targets": [{"name": "x", "require": {"pedestrians": 1}}]}, "targets.0.require.pedestrians"),
        ({"targets": [{"name": "x"}, {"name": "x"}]}, "names must be unique, repeated: ['x']"),
        ({"targets": []}, "targets: List should have at least 1 item"),
        ({"targets": [{"name": "x", "weather": []}]}, "list at least one value"),
        (
            {"targets": [{"name": "x"}], "edits": {"mirror": 2}},
            "edits.mirror: Input should be less than or equal",
        ),
        ({"targets": [{"name": "x"}]}, "how many scenes? Set scenes: N in the file or pass --scenes N"),
        (
            {"targets": [{"name": "x"}], "scenes": 1, "seed": -1},
            "seed: Input should be greater than or equal to 0",
        ),
        (
            {"targets": [{"name": "trains", "require": {"train": 1}}], "scenes": 3},
            f"target 'trains': no frame in {labels} has boxes of every required class (train); copies are made",
        ),
        (
            {"targets": [{"name": "tunnel", "scene": "tunnel", "require": {"car": 1}}], "scenes": 3},
            f"target 'tunnel': no tunnel frame in {labels} has the boxes it needs (car)",
        ),
    ]
    for data, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        out = tmp_path / "never"
        code = run_main(pg.main, ["--labels_file", str(labels), "--targets", str(path), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (data, err)
        assert not out.exists()
    code = run_main(
        pg.main, ["--labels_file", str(tmp_path / "no.json"), "--targets", str(path), "--out", "x"]
    )
    assert code == 2 and "labels file not found" in capsys.readouterr().err
    # a negative --seed is refused with the usage, not a numpy traceback from the planner
    path.write_text(yaml.safe_dump({"targets": [{"name": "x"}], "scenes": 1}), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        pg.main(["--labels_file", str(labels), "--targets", str(path), "--out", str(out), "--seed", "-1"])
    assert exc.value.code == 2 and "--seed must be >= 0, got -1" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_targets_file_documents_every_key_and_plans(tmp_path, mini_bdd):
    path = REPO / "config" / "plan_targets.yaml"
    spec = load_targets(path)
    assert [t.name for t in spec.targets] == ["night_rain_pedestrians", "uniform_weather_time"]
    assert (
        spec.targets[0].require == {"pedestrian": 2}
        and spec.targets[1].values("weather") == DEFINED["weather"]
    )
    demo = load_targets(REPO / "config" / "demo" / "plan_targets.yaml")  # make demo's: the emptiest cells
    assert demo.scenes == 4 and demo.targets[0].values("timeofday") == DEFINED["timeofday"]
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(data) == set(PlanTargets.model_fields)
    assert set(data["edits"]) == set(Edits.model_fields)
    assert all(set(t) == set(Target.model_fields) for t in data["targets"])
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"uncommented key line: {line!r}"
    # the script as users run it (both ways), on the mini data set
    out = tmp_path / "shipped"
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert/plan_generation.py"), "--bdd_data_dir", str(mini_bdd),
         "--targets", str(path), "--out", str(out), "--scenes", "4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "real frames per weather x time of day" in proc.stdout and "planned 4 scenes" in proc.stdout
    assert len(rows(out)) == 4 and rows(out)[0]["size"] == [320, 180]  # the mini data set's frame size
    proc = subprocess.run(
        [sys.executable, "-m", "convert.plan_generation", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--targets" in proc.stdout
