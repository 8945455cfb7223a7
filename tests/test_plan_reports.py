"""The reports of convert/plan_generation.py: per-target counts (a target is credited with its own scenes only),
the distribution plot's panels and bars (test_plan_generation checks that a plan writes it), and the progress
bars on stderr."""

from __future__ import annotations

import json

import pytest
import yaml

from convert import plan_generation as pg
from convert.planning import REPORT_FILE, SUMMARY_FILE
from convert.planning.boxes import Box
from convert.planning.planner import Distribution, progress
from convert.planning.reports import SIZE_BUCKETS, distribution_figure
from vocab import bdd

W, H = 1280, 720
NO_EDITS = {"mirror": 0, "remove": 0, "move": 0, "duplicate": 0}


def labelled(name, weather, timeofday, categories):
    boxes = [
        {
            "id": str(i),
            "category": c,
            "box2d": {"x1": 100 + 150 * i, "y1": 300, "x2": 199 + 150 * i, "y2": 399},
        }
        for i, c in enumerate(categories)
    ]
    return {"name": name, "attributes": {"weather": weather, "timeofday": timeofday, "scene": "city street"},
            "labels": boxes}  # fmt: skip


def test_a_target_is_credited_with_its_own_scenes_only(tmp_path, capsys):
    """night_peds places every scene in rainy / night, a cell of the uniform target too: those scenes count toward
    that cell's frames (the uniform target does not fill it) but are not the uniform target's planned scenes."""
    labels = tmp_path / "det.json"
    labels.write_text(json.dumps([
        labelled("day.jpg", "clear", "daytime", ["car", "pedestrian"]),
        labelled("night.jpg", "rainy", "night", ["pedestrian", "car"]),
    ]))  # fmt: skip
    targets = {
        "seed": 0,
        "targets": [
            {"name": "night_peds", "weather": "rainy", "timeofday": "night", "require": {"pedestrian": 1},
             "scenes": 3},
            {"name": "uniform", "weather": ["rainy", "clear"], "timeofday": ["daytime", "night"], "scenes": 3},
        ],
        "edits": NO_EDITS,
    }  # fmt: skip
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(targets, sort_keys=False))
    out = tmp_path / "plan"
    args = ["--labels_file", str(labels), "--targets", str(tmp_path / "t.yaml"), "--out", str(out)]
    assert pg.main([*args, "--image_size", f"{W}x{H}"]) == 0
    # Turns alternate (A, U, A, U, A, U). U's cells (rainy/day, rainy/night, clear/day, clear/night) start at
    # real 0, 1, 1, 0; A's scenes raise rainy/night to 2, 3, 4 before U's turns, which go to the emptiest cell:
    # rainy/day (0), then clear/night (totals 1, 3, 1, 0), then rainy/day (1, 4, 1, 1).
    summary = json.loads((out / SUMMARY_FILE).read_text())
    night, uniform = summary["targets"]
    assert (night["planned"], uniform["planned"]) == (3, 3)
    assert [(c["real"], c["planned"], c["other_targets"], c["combined"]) for c in night["cells"]] == [
        (1, 3, 0, 4)
    ]
    assert [
        (c["cell"], c["real"], c["planned"], c["other_targets"], c["combined"]) for c in uniform["cells"]
    ] == [
        ({"weather": "rainy", "timeofday": "daytime"}, 0, 2, 0, 2),
        ({"weather": "rainy", "timeofday": "night"}, 1, 0, 3, 4),  # night_peds' 3 scenes, not uniform's
        ({"weather": "clear", "timeofday": "daytime"}, 1, 0, 0, 1),
        ({"weather": "clear", "timeofday": "night"}, 0, 1, 0, 1),
    ]
    for target in summary["targets"]:  # a target's planned cells add up to its scenes
        assert sum(c["planned"] for c in target["cells"]) == target["planned"]
    report = (out / REPORT_FILE).read_text()
    assert "| uniform | rainy / night | - | 1 | 0 | 3 | 4 |" in report
    assert "| night_peds | rainy / night | 1 pedestrian | 1 | 3 | 0 | 4 |" in report
    printed = capsys.readouterr().out
    assert "  uniform: 3 scenes; rainy / daytime 0 -> 2; clear / night 0 -> 1\n" in printed
    assert "  night_peds: 3 scenes; rainy / night 1 -> 4\n" in printed


def box(cls: str, side: float) -> Box:
    """A ``cls`` box of side x side pixels (inclusive corners), at the top left."""
    return Box(cls, cls, False, 0, 0, side - 1, side - 1)


def test_the_plot_has_a_linear_panel_per_class_with_real_and_planned_bars(tmp_path):
    cell = {"weather": "rainy", "timeofday": "night", "scene": "highway"}
    real, planned = Distribution(), Distribution()
    real.add(cell, [box("car", 10), box("car", 50), box("car", 50), box("car", 200), box("pedestrian", 20)])
    real.add({**cell, "weather": "clear"}, [box("car", 50)])
    planned.add(cell, [box("car", 50), box("pedestrian", 20), box("pedestrian", 100)])
    fig = distribution_figure(real, planned)
    heat_real, heat_combined, *panels = fig.axes
    assert len(panels) == len(bdd.DET_CLASSES)
    by_title = {ax.get_title().split(":")[0]: ax for ax in panels}
    assert list(by_title) == list(bdd.DET_CLASSES)
    want = {  # small / medium / large: real, then real + planned
        "car": ([1, 3, 1], [1, 4, 1]),
        "pedestrian": ([1, 0, 0], [2, 0, 1]),
        "bus": ([0, 0, 0], [0, 0, 0]),
    }
    for cls, (before, after) in want.items():
        ax = by_title[cls]
        assert ax.get_yscale() == "linear"
        real_bars, combined_bars = ax.containers
        assert [b.get_height() for b in real_bars] == before
        assert [b.get_height() for b in combined_bars] == after
        assert [t.get_text() for t in ax.texts] == [
            f"{b}\n+{a - b}" if a > b else str(b) for a, b in zip(after, before, strict=True)
        ]
        assert [t.get_text() for t in ax.get_xticklabels()] == list(SIZE_BUCKETS)
    assert by_title["car"].get_title() == "car: 5 → 6 boxes"
    # the heat maps write each weather x time of day count: rainy / night 1 -> 2, clear / night 1
    assert "1" in [t.get_text() for t in heat_real.texts]
    assert "2" in [t.get_text() for t in heat_combined.texts]
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("least, shown", [(1, True), (5000, False)])
def test_progress_bars_go_to_stderr_and_only_for_long_passes(capsys, least, shown):
    assert list(progress(list(range(3)), "reading boxes", least=least)) == [0, 1, 2]
    out, err = capsys.readouterr()
    assert out == "" and ("reading boxes" in err) == shown
