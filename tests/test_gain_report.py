"""The gain reports from hand-made run results (no training): gain.csv's rows and columns per arm and seed, the
controls bracket, the real-equivalents, "no signal" and the convergence warning in gain.md and gain.json."""

from __future__ import annotations

import csv
import json
import math

import pytest

from annotation.gain import design, recipe, report
from vocab import bdd


def metrics(value: float) -> dict:
    per = {"map": value, "map50": value, "gt_boxes": 3}
    return {
        "images": 4, "gt_boxes": 30, "map": value, "map50": value, "map75": value,
        "per_class": {c: dict(per) for c in bdd.DET_CLASSES}, "per_size": {"small": dict(per)},
        "per_condition": {},
    }  # fmt: skip


def result(
    arm: str, seed: int, value: float, *, share: float = 0, budget: int = 10, syn: int = 0, at=None
) -> dict:
    return {
        "key": "k", "arm": arm, "share": share, "seed": seed, "real_budget": budget,
        "negative_control": "shuffled_labels" if arm == "negative_control" else None, "real_images": budget,
        "synthetic_images": syn, "list_length": 16, "epochs": 2, "iterations": 8, "optimizer_steps": 5,
        "images_seen": 16, "batch": 2, "imgsz": 32, "model": "yolov8n.yaml", "device": "cpu", "train_seconds": 1.0,
        "finished_at": "now", "convergence": {"iteration": 6, "map": value if at is None else at},
        "metrics": metrics(value),
    }  # fmt: skip


def sweep(base: float = 0.20) -> list[dict]:
    """Two seeds: curve 5 -> 10 -> 15 -> 20 real frames; the synthetic arm halfway (in log) between 10 and 15."""
    runs = []
    for seed, lift in ((0, 0.0), (1, 0.02)):
        b = base + lift if base else 0.0
        runs += [
            result("real", seed, b),
            result("synthetic", seed, b + 0.05, share=50, syn=5),
            result("positive_control", seed, b + 0.10, share=50, budget=15),
            result("negative_control", seed, b - 0.01, share=50, syn=5),
            result("real_curve", seed, b - 0.05, budget=5),
            result("real_curve", seed, b + 0.15, budget=20),
        ]
    return runs[::-1]  # any order in, ordered out


def write(tmp_path, results, warnings=()):
    schedule = design.Schedule(2, 4, 2)
    r = recipe.recipe(schedule, {"nbs": 4, "warmup_epochs": 3, "close_mosaic": 0, "mosaic": 1.0})
    settings = {"model": "yolov8n.yaml", "imgsz": 32}
    return report.write_reports(
        tmp_path, "k", settings, results, [0, 50], [0, 1], schedule, [], recipe=r, warnings=list(warnings)
    )


def test_csv_has_one_row_per_arm_and_seed_in_arm_order(tmp_path):
    write(tmp_path, sweep())
    rows = list(csv.DictReader((tmp_path / "gain.csv").open()))
    assert list(rows[0])[: len(report.CSV_FIXED)] == report.CSV_FIXED
    assert [(r["arm"], r["share"], r["real_budget"], r["seed"]) for r in rows] == [
        (arm, share, budget, seed)
        for arm, share, budget in (
            ("real", "0", "10"), ("synthetic", "50", "10"), ("positive_control", "50", "15"),
            ("negative_control", "50", "10"), ("real_curve", "0", "5"), ("real_curve", "0", "20"),
        )
        for seed in ("0", "1")
    ]  # fmt: skip
    assert {r["negative_control"] for r in rows if r["arm"] == "negative_control"} == {"shuffled_labels"}
    assert {r["optimizer_steps"] for r in rows} == {"5"} and {r["converged"] for r in rows} == {"true"}


def test_controls_bracket_and_real_equivalents(tmp_path):
    doc = write(tmp_path, sweep())
    assert doc["signal"] is None
    # per seed the synthetic mAP sits halfway between the 10- and 15-frame points: 10 * 1.5 ** 0.5 frames
    eq = doc["real_equivalents"]["50 % synthetic"]
    assert eq["budget"]["mean"] == pytest.approx(10 * math.sqrt(1.5))
    assert eq["worth"]["mean"] == pytest.approx(10 * math.sqrt(1.5) - 10) and eq["above"] == eq["below"] == 0
    assert eq["text"].startswith("5 synthetic ≈ 2 ± 0 real frames (real-equivalent budget 12")
    neg = doc["real_equivalents"]["negative control (50 %: shuffled labels)"]
    assert neg["budget"]["mean"] == pytest.approx(10 * 2 ** (-0.2))  # 1/5 of the way down from 10 to 5 in log
    gains = {t: c["map_gain"]["mean"] for t, c in doc["controls"].items()}
    assert gains == {
        "50 % synthetic": pytest.approx(0.05),
        "positive control (50 %: real frames instead)": pytest.approx(0.10),
        "negative control (50 %: shuffled labels)": pytest.approx(-0.01),
    }
    md = (tmp_path / "gain.md").read_text()
    assert "above the negative control's -1.00, below the positive control's +10.00 (50% of what" in md
    assert "5 optimizer steps" in md and "| 50 % | 10 | 5 | 2 | 26.00" in md
    assert [c["real_budget"] for c in json.loads((tmp_path / "gain.json").read_text())["real_curve"]] == [
        5,
        10,
        15,
        20,
    ]


def test_zero_baseline_is_no_signal_not_a_ranking(tmp_path):
    doc = write(tmp_path, sweep(base=0.0))
    assert doc["signal"].startswith("no signal: the baseline learned nothing")
    assert doc["real_equivalents"] == {}
    md = (tmp_path / "gain.md").read_text()
    assert "**No signal: the baseline learned nothing" in md and "Gains are not ranked" in md
    assert "| no signal |" in md and "above the negative control" not in md


def test_an_arm_still_rising_is_warned_about(tmp_path):
    runs = sweep()
    rising = next(r for r in runs if r["arm"] == "positive_control" and r["seed"] == 1)
    rising["convergence"]["map"] = rising["metrics"]["map"] - 0.05
    doc = write(tmp_path, runs)
    assert doc["convergence"]["positive control (50 %: real frames instead)"] == {
        "converged": 1,
        "checked": 2,
    }
    (warning,) = [w for w in doc["warnings"] if w.startswith("not converged")]
    assert "positive control" in warning and "favour the smaller one" in warning
    assert "not converged: positive control" in (tmp_path / "gain.md").read_text()


def test_the_bracket_gives_a_share_of_the_positive_control_only_for_a_gain():
    def controls(synthetic: float) -> dict:
        return {
            "700 % synthetic": {"arm": "synthetic", "map_gain": {"mean": synthetic}},
            "positive control": {"arm": "positive_control", "map_gain": {"mean": 0.02}},
            "negative control": {"arm": "negative_control", "map_gain": {"mean": -0.03}},
        }

    assert report.bracket(controls(0.01)) == (
        "700 % synthetic: gain +1.00, above the negative control's -3.00, below the positive control's +2.00 "
        "(50% of what as many real frames gave)"
    )
    worse = report.bracket(controls(-0.0189))
    assert "below the positive control's +2.00" in worse and "%" not in worse.split("positive control's")[1]
