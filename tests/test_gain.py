"""annotation/evaluate_gain.py: real vs real + synthetic at equal iterations, over seeds, resumable.

The real data set is the session's mini-BDD100K through convert/bdd_to_yolo.py (data.yaml, frames.csv); the
synthetic set is stage 4's layout (images/{train,val}, labels, data.yaml from annotation/dataset.py's writer).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from annotation import evaluate_gain
from annotation.dataset import make_dirs, write_data_yaml
from annotation.gain import data as gain_data
from annotation.gain import design, runner, stats
from convert import bdd_to_yolo
from core.cli import UserError, run_main
from vocab import bdd

# ---------------------------------------------------------------------------------------------------------------
# Tiny data sets in the contract's layout
# ---------------------------------------------------------------------------------------------------------------


def yolo_lines(frame: bdd.Frame, width: int, height: int) -> str:
    lines = []
    for label in frame.label_list():
        cat = bdd.category_of(label)
        if label.box2d is None or cat.ignored or cat.det_class is None:
            continue
        cx, cy, w, h = bdd.box_to_yolo(label.box2d, width, height)
        lines.append(f"{bdd.DET_CLASS_YOLO_ID[cat.det_class]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def real_set(bdd_root: Path, out: Path) -> Path:
    """mini-BDD train and val frames through convert/bdd_to_yolo.py (data.yaml, frames.csv), as a user runs it."""
    for split in ("train", "val"):
        code = run_main(
            bdd_to_yolo.main, ["--bdd_data_dir", str(bdd_root), "--split", split, "--out", str(out)]
        )
        assert code == 0
    return out / "data.yaml"


def synthetic_set(bdd_root: Path, out: Path, n: int) -> Path:
    """Stage 4's layout: ``n`` 'generations' (mirrored mini-BDD train frames, boxes mirrored) in train and val."""
    frames = {f.name: f for f in bdd.load_frames(bdd_root / "labels" / "det_20" / "det_train.json")}
    images = [p for p in bdd.list_images(bdd_root / "images" / "100k" / "train") if p.name in frames]
    counts = {"train": 0, "val": 0}
    for i in range(n):
        src = images[i % len(images)]
        split = "val" if i % 4 == 3 else "train"
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            width, height = im.size
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out / "images" / split / f"gen__{i:04d}.png")
        lines = []
        for line in yolo_lines(frames[src.name], width, height).splitlines():
            c, cx, cy, w, h = line.split()
            lines.append(f"{c} {1 - float(cx):.6f} {cy} {w} {h}\n")
        (out / "labels" / split / f"gen__{i:04d}.txt").write_text("".join(lines))
        counts[split] += 1
    return write_data_yaml(out, counts["train"], counts["val"])[0]


@pytest.fixture(scope="module")
def sets(mini_bdd, tmp_path_factory):
    root = tmp_path_factory.mktemp("gain_sets")
    return real_set(mini_bdd, root / "real"), synthetic_set(mini_bdd, root / "synthetic", 12)


def items(n: int, prefix: str) -> list[gain_data.Item]:
    return [
        gain_data.Item(f"{prefix}{i:03d}.jpg", Path(f"/{prefix}{i:03d}.jpg"), Path(f"/{prefix}{i:03d}.txt"))
        for i in range(n)
    ]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = run_main(evaluate_gain.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------------
# The equal-iteration rule
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_real", [None, 7])
def test_every_arm_trains_the_same_list_length_on_the_same_real_images(max_real):
    real, synthetic = items(10, "r"), items(30, "s")
    shares = [0, 25, 50, 100, 250]
    for seed in (0, 1):
        arms = design.design_arms(real, synthetic, shares, seed, max_real)
        n_real = max_real or 10
        assert [len(a.synthetic) for a in arms] == [design.synthetic_count(s, n_real) for s in shares]
        assert [len(a.synthetic) for a in arms] == ([0, 3, 5, 10, 25] if n_real == 10 else [0, 2, 4, 7, 18])
        assert len({a.real for a in arms}) == 1 and len(arms[0].real) == n_real  # the same real images
        for small, big in zip(arms, arms[1:], strict=False):  # a share's draw contains every smaller share's
            assert set(small.synthetic) <= set(big.synthetic)
        schedule = design.equal_iteration_schedule(max(len(a.images) for a in arms), batch=4, epochs=3)
        assert schedule.batches_per_epoch == math.ceil(len(arms[-1].images) / 4)  # the largest arm, once
        for arm in arms:
            entries = design.epoch_list(arm, schedule.list_length)
            assert len(entries) == schedule.list_length  # every arm: the same list, the same iterations
            counts = {i.key: entries.count(i) for i in arm.images}
            assert set(counts) == {i.key for i in arm.images}  # every image of the arm, nothing else
            assert max(counts.values()) - min(counts.values()) <= 1  # repeated evenly
            assert min(counts.values()) == schedule.list_length // len(arm.images)
        assert schedule.iterations == 3 * schedule.batches_per_epoch
    # the seeded draws are reproducible and differ between seeds
    draw = design.design_arms
    assert draw(real, synthetic, shares, 0, 7) == draw(real, synthetic, shares, 0, 7)
    assert draw(real, synthetic, shares, 0, 7)[0].real != draw(real, synthetic, shares, 1, 7)[0].real


def test_real_only_arm_repeats_its_images_to_the_largest_arms_length():
    real, synthetic = items(6, "r"), items(6, "s")
    arms = design.design_arms(real, synthetic, [0, 100], seed=0, max_real=None)
    schedule = design.equal_iteration_schedule(12, batch=4, epochs=2)
    assert (schedule.list_length, schedule.iterations, schedule.images_seen) == (12, 6, 24)
    base = design.epoch_list(arms[0], 12)
    assert sorted({base.count(i) for i in arms[0].real}) == [2]  # 6 real images twice each
    mix = design.epoch_list(arms[1], 12)
    assert sorted({mix.count(i) for i in arms[1].images}) == [1]  # 12 images once each
    # a list length that is no multiple: counts differ by one, the extra copies a seeded draw
    odd = design.epoch_list(arms[0], 16)
    assert sorted(odd.count(i) for i in arms[0].real) == [2, 2, 3, 3, 3, 3]


def test_schedule_rounds_up_to_full_batches_and_iterations_are_whole_passes():
    schedule = design.equal_iteration_schedule
    assert schedule(10, batch=4, epochs=5) == design.Schedule(5, 3, 4)  # list 12, 15 iterations
    s = schedule(37 * 16 - 5, batch=16, iterations=1000)  # nb 37 -> 27 passes of 37 batches
    assert (s.epochs, s.batches_per_epoch, s.iterations) == (27, 37, 999)
    prime = schedule(100, batch=10, iterations=997)  # 99 passes of 10 batches, not one epoch of 997
    assert (prime.epochs, prime.batches_per_epoch, prime.iterations) == (99, 10, 990)
    short = schedule(100, batch=10, iterations=4)  # fewer than one pass: a seeded subset per arm
    assert (short.epochs, short.batches_per_epoch, short.list_length) == (1, 4, 40)
    # the case: 12 and 13 iterations at nb 4 are the same recipe, not 3 epochs vs 1
    assert (
        schedule(16, batch=4, iterations=12)
        == schedule(16, batch=4, iterations=13)
        == design.Schedule(3, 4, 4)
    )
    for n in (1, 7, 60, 360, 1001, 20000):
        s = schedule(50, batch=8, iterations=n)
        assert s.iterations <= n and n - s.iterations < s.epochs  # whole epochs: at most E - 1 short
        assert s.batches_per_epoch >= min(7, n)  # each epoch covers the largest arm (nb 7) when N allows
        assert s.batches_per_epoch < 2 * 7 or s.epochs == 1  # and not much more: epochs track passes


# ---------------------------------------------------------------------------------------------------------------
# Mean ± spread over seeds, paired gains
# ---------------------------------------------------------------------------------------------------------------


def test_spread_and_paired_gain_against_hand_computed_values():
    s = stats.spread([0.30, 0.32, 0.34])
    assert (s.n, s.mean, s.min, s.max) == (3, pytest.approx(0.32), 0.30, 0.34)
    assert s.std == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / (3 - 1))
    s = stats.spread([0.1, 0.4, None])
    assert s.mean == pytest.approx(0.25) and s.std == pytest.approx(math.sqrt(0.045))  # (0.15²·2)/1
    one = stats.spread([0.5])
    assert one.std is None and stats.fmt_spread(one) == "50.00"
    assert stats.spread([None]) is None
    assert stats.fmt_spread(stats.spread([0.30, 0.32, 0.34])) == "32.00 ± 2.00 [30.00, 34.00]"
    rows = [
        {"share": 0, "seed": 0, "map": 0.30},
        {"share": 0, "seed": 1, "map": 0.34},
        {"share": 50, "seed": 0, "map": 0.31},
        {"share": 50, "seed": 1, "map": 0.38},
        {"share": 50, "seed": 2, "map": 0.90},  # no baseline at seed 2: not paired
    ]
    g = stats.paired_gain(rows, 50)
    assert g.n == 2 and g.mean == pytest.approx(0.025) and g.std == pytest.approx(math.sqrt(2 * 0.015**2))
    assert (g.min, g.max) == (pytest.approx(0.01), pytest.approx(0.04))


# ---------------------------------------------------------------------------------------------------------------
# Conditions from frames.csv
# ---------------------------------------------------------------------------------------------------------------


def test_conditions_group_val_frames_by_weather_and_time_of_day(tmp_path):
    root = tmp_path / "val"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    attrs = {
        "a": ("clear", "daytime"),
        "b": ("rainy", "night"),
        "c": ("clear", "night"),
        "d": ("", "daytime"),
    }
    for stem in attrs:
        Image.new("RGB", (32, 32)).save(root / "images" / "val" / f"{stem}.jpg")
    data = {"path": str(root), "train": "images/val", "val": "images/val", "names": list(bdd.DET_CLASSES)}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    with (root / "frames.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "image", "weather", "timeofday", "scene"])
        w.writerow(["train", "images/train/zzz.jpg", "snowy", "night", "highway"])  # another split: ignored
        for stem, (weather, tod) in attrs.items():
            w.writerow(["val", f"images/val/{stem}.jpg", weather, tod, "city street"])
    spec = gain_data.load_data_yaml(root / "data.yaml", "--val")
    val = gain_data.split_items(spec, "val")
    conditions = gain_data.read_conditions(spec, val)
    assert conditions == {
        "images/val/a.jpg": ("clear", "daytime"),
        "images/val/b.jpg": ("rainy", "night"),
        "images/val/c.jpg": ("clear", "night"),
        "images/val/d.jpg": ("undefined", "daytime"),  # an empty attribute reads as BDD's 'undefined'
    }
    groups = gain_data.condition_groups(conditions)
    assert groups["clear|daytime"] == ["images/val/a.jpg"]
    assert groups["clear|*"] == ["images/val/a.jpg", "images/val/c.jpg"]
    assert groups["*|night"] == ["images/val/b.jpg", "images/val/c.jpg"]
    assert groups["*|daytime"] == ["images/val/a.jpg", "images/val/d.jpg"]
    assert list(groups) == [  # cells, then weather margins, then time-of-day margins
        "clear|daytime", "clear|night", "rainy|night", "undefined|daytime",
        "clear|*", "rainy|*", "undefined|*", "*|daytime", "*|night",
    ]  # fmt: skip
    (root / "images" / "val" / "e.jpg").write_bytes((root / "images" / "val" / "a.jpg").read_bytes())
    with pytest.raises(
        UserError, match=r"1 of 5 val images have no row in .*frames.csv \(first: images/val/e.jpg\)"
    ):
        gain_data.read_conditions(spec, gain_data.split_items(spec, "val"))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one clear line each, nothing trained
# ---------------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(sets, tmp_path, capsys):
    real, synthetic = sets
    out = tmp_path / "out"
    base = ["--real", real, "--synthetic", synthetic, "--val", real, "--out", out, "--device", "cpu"]

    code, _, err = run(capsys, *base, "--model", tmp_path / "missing.pt")
    assert (
        code == 2
        and f"model weights not found: {tmp_path / 'missing.pt'}" in err
        and "--model yolov8n.yaml" in err
    )

    no_attrs = tmp_path / "no_attrs"
    shutil.copytree(real.parent, no_attrs)
    (no_attrs / "frames.csv").unlink()
    data = yaml.safe_load((no_attrs / "data.yaml").read_text())
    (no_attrs / "data.yaml").write_text(yaml.safe_dump({**data, "path": str(no_attrs)}))
    code, _, err = run(capsys, *base[:4], "--val", no_attrs / "data.yaml", "--out", out)
    assert code == 2 and f"val set without attributes: {no_attrs / 'frames.csv'} not found" in err
    assert "convert/bdd_to_yolo.py" in err and "--skip_conditions" in err

    empty = tmp_path / "empty_syn"
    make_dirs(empty)
    write_data_yaml(empty, 0, 0)  # stage 4 accepted nothing
    code, _, err = run(
        capsys, "--real", real, "--synthetic", empty / "data.yaml", "--val", real, "--out", out
    )
    assert code == 2 and "the synthetic set is empty" in err

    coco = tmp_path / "coco.yaml"
    coco.write_text(
        yaml.safe_dump(
            {
                "path": str(real.parent),
                "train": "images/train",
                "val": "images/val",
                "names": ["person", "car"],
            }
        )
    )
    code, _, err = run(capsys, "--real", coco, "--synthetic", synthetic, "--val", real, "--out", out)
    assert code == 2 and f"--real: {coco}: names must be the 10 BDD100K classes in stage 4's order" in err

    for shares, message in (
        ("0,-10", "--shares must be percentages >= 0"),
        ("25,50", "--shares must include 0"),
        ("0,abc", "--shares: expected comma-separated numbers"),
        ("0,50,50", "--shares: repeated value"),
        ("0,10000", "needs"),  # more synthetic images than the set has
    ):
        code, _, err = run(capsys, *base, "--shares", shares)
        assert code == 2 and message in err, (shares, err)

    code, _, err = run(capsys, *base, "--train_args", "epochs=3")
    assert (
        code == 2
        and "--train_args: 'epochs=3' is not KEY=VALUE with one of the training hyperparameters" in err
    )
    code, _, err = run(capsys, *base, "--device", "0,1")
    assert code == 2 and "--device takes one device" in err
    code, _, err = run(capsys, *base, "--max_real", "1000")
    assert code == 2 and "--max_real 1000: the real train split has only" in err
    code, _, err = run(capsys, *base, "--val", tmp_path / "nope.yaml")
    assert code == 2 and f"--val: data yaml not found: {tmp_path / 'nope.yaml'}" in err
    assert not (out / "runs").exists()  # nothing trained


# ---------------------------------------------------------------------------------------------------------------
# End to end on CPU: two arms, one seed, a crash in the middle, resume, refused settings change
# ---------------------------------------------------------------------------------------------------------------


def test_gain_run_end_to_end_resumes_after_a_crash(sets, tmp_path, capsys, monkeypatch):
    real, synthetic = sets
    out = tmp_path / "gain"
    argv = [
        "--real", real, "--synthetic", synthetic, "--val", real, "--out", out, "--shares", "0,50",
        "--seeds", "0", "--epochs", "1", "--imgsz", "64", "--batch", "4", "--device", "cpu", "--workers", "0",
        "--model", "yolov8n.yaml",
    ]  # fmt: skip
    trained: list[str] = []
    real_train = runner.train_run

    def crash_on_second(run_dir, *a, **k):
        trained.append(run_dir.name)
        if len(trained) == 2:  # killed mid-training: a half-written run folder, no result.json
            (run_dir / "ultralytics" / "train" / "weights").mkdir(parents=True)
            (run_dir / "ultralytics" / "train" / "weights" / "last.pt").write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_train(run_dir, *a, **k)

    monkeypatch.setattr(runner, "train_run", crash_on_second)
    code, _, err = run(capsys, *argv)
    assert code == 130 and "interrupted" in err
    assert trained == ["share0_seed0", "share50_seed0"]
    first = out / "runs" / "share0_seed0" / "result.json"
    assert first.is_file() and not (out / "runs" / "share50_seed0" / "result.json").exists()
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns

    # rerun: the finished arm is kept (not retrained), the crashed one restarts from scratch
    trained.clear()
    monkeypatch.setattr(
        runner,
        "train_run",
        lambda run_dir, *a, **k: trained.append(run_dir.name) or real_train(run_dir, *a, **k),
    )
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert trained == ["share50_seed0"]
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_mtime
    assert "[1/2] 0 % synthetic, seed 0: kept (finished" in stdout
    weights = out / "runs" / "share50_seed0" / "ultralytics" / "train" / "weights" / "last.pt"
    assert weights.read_bytes() != b"half a checkpoint"

    # equal iterations: both arms ran one epoch over a list as long as the 50 % arm, in full batches of 4
    results = [
        json.loads((out / "runs" / n / "result.json").read_text()) for n in ("share0_seed0", "share50_seed0")
    ]
    n_real = len(list((real.parent / "images" / "train").iterdir()))
    n_syn = design.synthetic_count(50, n_real)
    length = math.ceil((n_real + n_syn) / 4) * 4
    for r, syn in zip(results, (0, n_syn), strict=True):
        assert (r["real_images"], r["synthetic_images"]) == (n_real, syn)
        assert (r["list_length"], r["iterations"], r["images_seen"]) == (length, length // 4, length)
    composition = {
        share: list(csv.DictReader((out / "runs" / f"share{share}_seed0" / "composition.csv").open()))
        for share in (0, 50)
    }
    real_of = {
        share: {r["source"] for r in rows if r["kind"] == "real"} for share, rows in composition.items()
    }
    assert real_of[0] == real_of[50] and len(real_of[0]) == n_real  # the same real images in both arms
    assert sum(int(r["copies_per_epoch"]) for r in composition[0]) == length
    assert sum(int(r["copies_per_epoch"]) for r in composition[50]) == length

    # outputs: rows, tables, plot, summary
    rows = list(csv.DictReader((out / "gain.csv").open()))
    assert [(r["share"], r["seed"]) for r in rows] == [("0", "0"), ("50", "0")]
    assert all(r["iterations"] == str(length // 4) and r["settings_key"] == results[0]["key"] for r in rows)
    assert {"map", "map50", "map_car", "map50_car", "map@*|daytime"} <= set(rows[0])
    assert float(rows[0]["map"]) == pytest.approx(results[0]["metrics"]["map"])
    val_frames = len(list((real.parent / "images" / "val").iterdir()))
    assert results[0]["metrics"]["images"] == val_frames
    md = (out / "gain.md").read_text()
    assert f"{length // 4} iterations" in md and "| 50 % |" in md and "## Per weather / time of day" in md
    assert (out / "gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gain summary" in stdout and str(out / "gain.md") in stdout

    # a third run with the same settings trains nothing; other settings are refused, not mixed
    trained.clear()
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and trained == [] and stdout.count("kept (finished") == 2
    code, _, err = run(capsys, *[a if a != "64" else "96" for a in argv])
    assert (
        code == 2 and "holds gain runs made under other settings (imgsz: 64 -> 96)" in err and trained == []
    )


def test_a_list_entry_ultralytics_drops_is_refused_before_training(sets, tmp_path):
    """ultralytics silently drops unreadable images; that arm would train fewer iterations, so it is an error."""
    real, _ = sets
    frames = gain_data.split_items(gain_data.load_data_yaml(real, "--real"), "train")[:3]
    broken = tmp_path / "gen" / "images" / "train" / "gen.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a png")
    label = tmp_path / "gen" / "labels" / "train" / "gen.txt"
    label.parent.mkdir(parents=True)
    label.write_text("2 0.5 0.5 0.2 0.2\n")
    arm = design.Arm(100, 0, tuple(frames), (gain_data.Item("images/train/gen.png", broken, label),))
    schedule = design.equal_iteration_schedule(len(arm.images), batch=2, epochs=1)
    run_dir = tmp_path / "run"
    data_yaml, entries = runner.write_run_data(run_dir, arm, schedule.list_length, frames[:1])
    assert len(entries) == schedule.list_length == 4
    with pytest.raises(
        UserError, match=r"ultralytics kept 3 of the 4 training list entries .*s__images__train__gen"
    ):
        runner.train_run(
            run_dir, data_yaml, "yolov8n.yaml", schedule, 0, imgsz=64, device="cpu", workers=0, train_args={},
            progress=False,
        )  # fmt: skip
    assert not (run_dir / "ultralytics" / "train" / "weights" / "last.pt").exists()


def test_run_data_is_linear_in_the_arm_size(tmp_path, monkeypatch):
    """composition.csv says which images are real without searching the real tuple per image (quadratic: at
    70k real frames half an hour of comparisons per arm); counted as Item comparisons, not timed."""
    real, synthetic = items(300, "r"), items(300, "s")
    arm = design.Arm(100, 0, tuple(real), tuple(synthetic))
    calls = []
    eq = gain_data.Item.__eq__
    monkeypatch.setattr(gain_data.Item, "__eq__", lambda a, b: calls.append(1) or eq(a, b))
    runner.write_run_data(tmp_path / "run", arm, len(arm.images), real[:1])
    assert len(calls) <= len(arm.images)
    rows = list(csv.DictReader((tmp_path / "run" / "composition.csv").open()))
    assert [(r["source"], r["kind"], r["copies_per_epoch"]) for r in rows] == [
        (str(i.image), kind, "1") for kind, its in (("real", real), ("synthetic", synthetic)) for i in its
    ]


def test_evaluate_run_scores_a_trained_detector_by_class_and_condition(mini_bdd, sets, tmp_path):
    """The demo detector memorised the cars of the mini-BDD train frames: scored on those frames (as if they were
    the val set) it finds them, so predictions reach the right images' labels (a wrong pairing scores ~0)."""
    from yolo_fixture import DetectorParams, cached_detector

    real, _ = sets
    spec = gain_data.load_data_yaml(real, "--val")
    items = gain_data.split_items(spec, "train")
    val = runner.ValSet(
        items,
        runner.load_val_truths(items),
        gain_data.condition_groups(gain_data.read_conditions(spec, items)),
    )
    params = DetectorParams()
    weights = cached_detector(mini_bdd, tmp_path / "work", params)
    m = runner.evaluate_run(weights, val, tmp_path, imgsz=params.imgsz, batch=4, device="cpu")
    assert m["images"] == len(items) and m["per_class"]["car"]["gt_boxes"] > 0
    assert m["per_class"]["car"]["map50"] > 0.3
    assert m["per_class"]["pedestrian"]["map"] in (0.0, None)  # never trained on pedestrians
    margins = [g for g in m["per_condition"] if g.startswith(gain_data.ANY)]
    assert sum(m["per_condition"][g]["images"] for g in margins) == len(
        items
    )  # the time-of-day margins partition
    assert all(
        m["per_condition"][g]["map50"] is not None for g in margins if m["per_condition"][g]["gt_boxes"]
    )


# ---------------------------------------------------------------------------------------------------------------
# The config: YAML < flags < key=value overrides, one schema, --check
# ---------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def flag_argv(real: Path, synthetic: Path, out: Path) -> list[str]:
    return [
        "--real", str(real), "--synthetic", str(synthetic), "--val", str(real), "--out", str(out),
        "--shares", "0,50", "--seeds", "0,1", "--epochs", "2", "--max_real", "6", "--imgsz", "64", "--batch", "4",
        "--device", "cpu", "--workers", "0", "--train_args", "lr0=0.01,mosaic=0",
    ]  # fmt: skip


def the_same_as_yaml(real: Path, synthetic: Path, out: Path, path: Path) -> Path:
    """``flag_argv``'s settings written as a config file."""
    config = {
        "out": str(out),
        "data": {"real": str(real), "synthetic": str(synthetic), "val": str(real)},
        "design": {"shares": [0, 50], "seeds": [0, 1], "epochs": 2, "max_real": 6},
        "train": {"imgsz": 64, "batch": 4, "device": "cpu", "workers": 0, "args": {"lr0": 0.01, "mosaic": 0}},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def settings_key_of(stdout: str) -> str:
    return stdout.split("settings key ")[1].split()[0]


def test_the_pure_parts_run_without_ultralytics():
    """design and stats (and the script's config) import and compute without ultralytics, so they are cheap to
    test and to reuse; a fresh interpreter, since this one has imported ultralytics already."""
    code = """
import sys
from pathlib import Path
from annotation.gain import controls, curve, design, leaks, recipe, stats
from annotation.gain.data import Item
import annotation.evaluate_gain

real = [Item(f"r{i}", Path(f"/r{i}.jpg"), Path(f"/r{i}.txt")) for i in range(10)]
synthetic = [Item(f"s{i}", Path(f"/s{i}.jpg"), Path(f"/s{i}.txt")) for i in range(10)]
arms = design.design_arms(real, synthetic, [0, 50, 100], seed=0, max_real=None)
schedule = design.equal_iteration_schedule(max(len(a.images) for a in arms), batch=4, epochs=2)
assert [len(a.synthetic) for a in arms] == [0, 5, 10] and schedule == design.Schedule(2, 5, 4)
assert all(len(design.epoch_list(a, schedule.list_length)) == 20 for a in arms)
runs = [{"share": s, "seed": seed, "real_images": 10, "synthetic_images": 0, "metrics": {"map": m, "map50": m}}
        for s, seed, m in ((0, 0, 0.3), (0, 1, 0.34), (50, 0, 0.31), (50, 1, 0.38))]
summary = stats.summarize(runs, [0, 50])
assert round(summary["50"]["map_gain"]["mean"], 6) == 0.025 and summary["0"]["map_gain"] is None
assert stats.fmt_spread(stats.spread([0.30, 0.32, 0.34])) == "32.00 ± 2.00 [30.00, 34.00]"
assert recipe.optimizer_steps(6, 1, 4, 64, 3) == (1, 6, 0)
assert curve.real_equivalent([(100, 0.1), (400, 0.2)], 0.15).budget > 199.9
assert "ultralytics" not in sys.modules, "ultralytics was imported"
"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_yaml_config_is_the_same_run_as_its_flags(sets, tmp_path, capsys):
    """The same settings from a config file and from flags: the same config, the same settings key (a folder made
    by either resumes with the other)."""
    real, synthetic = sets
    out = tmp_path / "out"
    path = the_same_as_yaml(real, synthetic, out, tmp_path / "gain.yaml")
    _, from_flags = evaluate_gain.parse_config(flag_argv(real, synthetic, out))
    _, from_yaml = evaluate_gain.parse_config(["--config", str(path)])
    assert from_yaml == from_flags
    assert from_flags.train.args == {"lr0": 0.01, "mosaic": 0} and from_flags.design.shares == [0.0, 50.0]
    keys = []
    for argv in (flag_argv(real, synthetic, out), ["--config", path]):
        code, stdout, err = run(capsys, *argv, "--check")
        assert code == 0, err
        keys.append(settings_key_of(stdout))
    assert keys[0] == keys[1]


def test_settings_keep_their_keys_and_values(sets, tmp_path, monkeypatch):
    """gain_settings.json's settings are what the config says (a change makes every existing --out refuse to
    resume): the keys below, the values from the config, the list flags as they were spelled. Version 2: the
    --iterations rule (whole passes), optimizer steps and the convergence checkpoint changed what a run holds."""
    import importlib.metadata

    real, synthetic = sets
    monkeypatch.setattr(gain_data, "fingerprint", lambda items: f"{len(items)} items")
    monkeypatch.setattr(gain_data, "conditions_fingerprint", lambda val: f"frames.csv of {val}")
    _, cfg = evaluate_gain.parse_config(flag_argv(real, synthetic, tmp_path / "out"))
    inputs = gain_data.Inputs(items(8, "r"), items(12, "s"), items(4, "v"), None)
    settings = evaluate_gain.run_settings(cfg, "model-fp", design.Schedule(2, 3, 4), inputs)
    assert settings == {
        "version": 2,
        "model": "yolov8n.yaml",
        "model_fingerprint": "model-fp",
        "imgsz": 64,
        "batch": 4,
        "epochs": 2,
        "batches_per_epoch": 3,
        "max_real": 6,
        "synthetic_splits": "train,val",
        "train_args": {"lr0": 0.01, "mosaic": 0},
        "real": "8 items",
        "synthetic": "12 items",
        "val": "4 items",
        "conditions": f"frames.csv of {real}",
        "convergence_check": True,
        "ultralytics": importlib.metadata.version("ultralytics"),
        "pycocotools": importlib.metadata.version("pycocotools"),
    }
    _, cfg = evaluate_gain.parse_config(
        [*flag_argv(real, synthetic, tmp_path / "out"), "--skip_conditions", "--synthetic_splits", "train"]
    )
    settings = evaluate_gain.run_settings(cfg, "model-fp", design.Schedule(2, 3, 4), inputs)
    assert (settings["conditions"], settings["synthetic_splits"]) == (None, "train")


def test_flags_override_the_yaml_and_overrides_override_both(sets, tmp_path):
    real, synthetic = sets
    path = the_same_as_yaml(real, synthetic, tmp_path / "out", tmp_path / "gain.yaml")
    _, cfg = evaluate_gain.parse_config(["--config", str(path), "--imgsz", "96", "--seeds", "3"])
    assert (cfg.train.imgsz, cfg.design.seeds) == (96, [3])
    assert (cfg.train.batch, cfg.design.shares, cfg.design.max_real) == (
        4,
        [0.0, 50.0],
        6,
    )  # the rest: the YAML
    _, cfg = evaluate_gain.parse_config(
        [
            "train.imgsz=128",
            "--config",
            str(path),
            "--imgsz",
            "96",
            "train.args.lr0=0.02",
            "design.seeds=[4, 5]",
        ]
    )
    assert (cfg.train.imgsz, cfg.design.seeds, cfg.train.args) == (128, [4, 5], {"lr0": 0.02, "mosaic": 0})
    _, cfg = evaluate_gain.parse_config(["--config", str(path), "--iterations", "40", "design.epochs=null"])
    assert (cfg.design.epochs, cfg.design.iterations, cfg.design.budget_epochs) == (None, 40, None)
    _, cfg = evaluate_gain.parse_config(["--config", str(path), "design.epochs=null"])
    assert cfg.design.budget_epochs == 50  # neither: 50 epochs, as before


def test_config_errors_name_their_keys_all_at_once(sets, tmp_path, capsys):
    real, synthetic = sets
    out = tmp_path / "out"
    path = tmp_path / "typo.yaml"
    path.write_text(
        f"out: {out}\ndata: {{real: {real}, synthetic: {synthetic}, val: {real}}}\ndesign:\n  seed: [0]\n"
    )
    code, _, err = run(capsys, "--config", path, "train.imgsize=64", "--shares", "25", "--device", "0,1")
    assert code == 2
    assert "design.seed: unknown key (did you mean 'seeds'?)" in err
    assert "train.imgsize: unknown key (did you mean 'imgsz'?)" in err
    assert "design.shares: " in err and "--shares must include 0" in err
    assert "train.device: " in err and "--device takes one device" in err
    code, _, err = run(capsys, "--config", tmp_path / "missing.yaml")
    assert code == 2 and f"config not found: {tmp_path / 'missing.yaml'}" in err
    code, _, err = run(capsys, "--out", out)  # the inputs have no defaults: each missing key is named
    assert code == 2 and all(f"data.{k}: Field required" in err for k in ("real", "synthetic", "val"))
    code, _, err = run(capsys, *flag_argv(real, synthetic, out), "--train_args", "lr=0.1")
    assert code == 2 and "--train_args: 'lr=0.1' is not KEY=VALUE" in err and "did you mean" in err
    assert not out.exists()


def test_epochs_and_iterations_exclude_each_other(sets, tmp_path, capsys):
    real, synthetic = sets
    argv = [str(a) for a in flag_argv(real, synthetic, tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        evaluate_gain.main([*argv, "--iterations", "10"])
    assert exc.value.code == 2
    assert "argument --iterations: not allowed with argument --epochs" in capsys.readouterr().err
    code, _, err = run(capsys, *argv, "design.iterations=10")
    assert code == 2 and "set design.epochs (--epochs) or design.iterations (--iterations), not both" in err
    path = the_same_as_yaml(real, synthetic, tmp_path / "out", tmp_path / "gain.yaml")  # epochs: 2
    code, _, err = run(capsys, "--config", path, "--iterations", "10")
    assert code == 2 and "not both" in err
    assert not (tmp_path / "out").exists()


def test_check_validates_config_and_inputs_and_trains_nothing(sets, tmp_path, capsys, monkeypatch):
    real, synthetic = sets
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("--check trained"))
    code, stdout, err = run(capsys, *flag_argv(real, synthetic, out), "--check")
    assert code == 0, err
    assert "check OK: 4 of 4 runs to train" in stdout and "nothing trained" in stdout
    assert not out.exists()  # not even gain_settings.json: a check changes nothing
    # the inputs are checked as a run checks them: a missing model, too many synthetic images
    code, _, err = run(
        capsys, *flag_argv(real, synthetic, out), "--model", tmp_path / "missing.pt", "--check"
    )
    assert code == 2 and f"model weights not found: {tmp_path / 'missing.pt'}" in err
    code, _, err = run(capsys, *flag_argv(real, synthetic, out), "--shares", "0,1000", "--check")
    assert code == 2 and "needs" in err and not out.exists()


def test_shipped_config_is_the_readme_command():
    """config/gain.yaml spells out every key (also the top-level ones test_configs does not look at) and runs
    the README's stage-5 command; without --config the schema's defaults are the same values."""
    from core.config import load_config

    written = yaml.safe_load((REPO / "config" / "gain.yaml").read_text(encoding="utf-8"))
    schema = evaluate_gain.GainConfig
    assert set(written) == set(schema.model_fields)
    for section, field in schema.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            assert set(written[section]) == set(field.annotation.model_fields), section
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = readme.split("\npython annotation/evaluate_gain.py ")[1].splitlines()
    ends = [i for i, line in enumerate(lines) if not line.endswith("\\")][0]
    argv = " ".join(line.rstrip("\\") for line in lines[: ends + 1]).split()
    # no hard-coded --device: the default (the first GPU, else the CPU) runs on every host
    assert not any(arg.startswith("--device") for arg in argv), argv
    _, from_readme = evaluate_gain.parse_config(argv)
    assert load_config(schema, REPO / "config" / "gain.yaml") == from_readme
