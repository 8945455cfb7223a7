"""annotation/evaluate_gain.py on the tiny sets: val leaks refused (source frame, hard link, content copy), and
the controls and optimizer steps from real trainings, run concurrently on [cpu, cpu] with the same figures as
one at a time in process."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_gain import real_set, run, synthetic_set

from annotation.dataset import write_data_yaml
from annotation.gain import recipe, runner


@pytest.fixture(scope="module")
def sets(mini_bdd, tmp_path_factory):
    root = tmp_path_factory.mktemp("gain_runs")
    return real_set(mini_bdd, root / "real"), synthetic_set(mini_bdd, root / "synthetic", 12)


def check_argv(real: Path, synthetic: Path, out: Path) -> list:
    return ["--real", real, "--synthetic", synthetic, "--val", real, "--out", out, "--shares", "0,50",
            "--seeds", "0", "--iterations", "4", "--imgsz", "32", "--batch", "2", "--device", "cpu", "--check"]  # fmt: skip


def val_images(real: Path) -> list[Path]:
    return sorted((real.parent / "images" / "val").iterdir())


def synthetic_from(images: list[Path], out: Path, link) -> Path:
    """A stage-4 style set whose train images are ``link(val image, dest)`` of the given images."""
    (out / "images" / "train").mkdir(parents=True)
    (out / "labels" / "train").mkdir(parents=True)
    for n, image in enumerate(images):
        link(image, out / "images" / "train" / f"gen__{n:04d}{image.suffix}")
        (out / "labels" / "train" / f"gen__{n:04d}.txt").write_text("2 0.5 0.5 0.2 0.2\n")
    return write_data_yaml(out, len(images), 0)[0]


# ---------------------------------------------------------------------------------------------------------------
# Val leaks
# ---------------------------------------------------------------------------------------------------------------


def test_synthetic_hard_links_and_copies_of_val_frames_are_refused(sets, tmp_path, capsys):
    real, synthetic = sets
    val = val_images(real)
    linked = synthetic_from(val[:2], tmp_path / "linked", os.link)  # the case: hard links, same inode
    code, _, err = run(capsys, *check_argv(real, linked, tmp_path / "out"))
    assert code == 2 and "--synthetic and --val: 2 synthetic image(s) are val images (same file" in err
    assert val[0].name in err and "Remove them" in err
    # one byte-for-byte copy among real generations: caught by content
    copied = tmp_path / "copied"
    shutil.copytree(synthetic.parent, copied)
    shutil.copyfile(val[1], copied / "images" / "train" / "gen__0000.png")
    (copied / "data.yaml").write_text(
        (copied / "data.yaml").read_text().replace(str(synthetic.parent), str(copied))
    )
    code, _, err = run(capsys, *check_argv(real, copied / "data.yaml", tmp_path / "out"))
    assert code == 2 and "1 synthetic image(s) are val images (same content" in err
    assert "gen__0000.png" in err and val[1].name in err
    # a real train split holding a val frame (a symlink to it: the same file)
    bad_real = tmp_path / "bad_real"
    shutil.copytree(real.parent, bad_real, symlinks=True)
    os.symlink(val[0], bad_real / "images" / "train" / "leak.jpg")
    shutil.copyfile(
        bad_real / "labels" / "val" / f"{val[0].stem}.txt", bad_real / "labels" / "train" / "leak.txt"
    )
    data = yaml.safe_load((bad_real / "data.yaml").read_text())
    (bad_real / "data.yaml").write_text(yaml.safe_dump({**data, "path": str(bad_real)}))
    argv = check_argv(bad_real / "data.yaml", synthetic, tmp_path / "out")
    argv[argv.index("--val") + 1] = real  # the original val split
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--real and --val: 1 real train image(s) are val images (same file" in err
    assert not (tmp_path / "out").exists()


def test_synthetic_images_generated_from_val_frames_are_refused(sets, tmp_path, capsys):
    real, synthetic = sets
    val = val_images(real)
    out = tmp_path / "syn"
    shutil.copytree(synthetic.parent, out)
    (out / "data.yaml").write_text((out / "data.yaml").read_text().replace(str(synthetic.parent), str(out)))
    gens = tmp_path / "generations"
    gens.mkdir()
    # stage 4's manifest: two images whose layout came from val frames, one from a train frame, one via a plan
    records = [
        {"key": "a.png", "split": "train", "out_stem": "gen__0000", "source": str(gens / "a.png"),
         "layout": {"source_frame": val[0].name}},
        {"key": "b.png", "split": "train", "out_stem": "gen__0001", "source": str(gens / "b.png"),
         "layout": {"source_frame": f"{val[1].stem}.jpg"}},
        {"key": "c.png", "split": "train", "out_stem": "gen__0002", "source": str(gens / "c.png"),
         "layout": {"source_frame": "somewhere-in-train.jpg"}},
        {"key": "d.png", "split": "val", "out_stem": "gen__0003", "source": str(gens / "d.png"), "layout": None},
    ]  # fmt: skip
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # the planned scene d.png records its plan's source frame in the generation's metadata.jsonl
    (gens / "metadata.jsonl").write_text(
        json.dumps({"file": "d.png", "source_frame": None, "plan_source_frame": val[2].name}) + "\n"
    )
    code, _, err = run(capsys, *check_argv(real, out / "data.yaml", tmp_path / "gain"))
    assert code == 2 and "--synthetic: 3 of 12 synthetic image(s) were generated from val frames" in err
    assert f"images/train/gen__0000.png from {val[0].stem}" in err and "from train frames only" in err
    # the same from manifest.csv's source_frame column alone
    (out / "manifest.jsonl").unlink()
    (gens / "metadata.jsonl").unlink()
    with (out / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "split", "out_stem", "source_frame", "source"])
        w.writerow(["a.png", "train", "gen__0000", val[3].name, str(gens / "a.png")])
        w.writerow(["c.png", "train", "gen__0002", "", str(gens / "c.png")])
    code, _, err = run(capsys, *check_argv(real, out / "data.yaml", tmp_path / "gain"))
    assert code == 2 and "1 of 12 synthetic image(s) were generated from val frames" in err
    # no leak: the check passes and says what it looked at
    (out / "manifest.csv").unlink()
    code, stdout, err = run(capsys, *check_argv(real, out / "data.yaml", tmp_path / "gain"))
    assert code == 0, err
    assert "no val leaks (" in stdout and "source frames known for 0 of 12" in stdout


# ---------------------------------------------------------------------------------------------------------------
# Controls, curve, steps: concurrent on [cpu, cpu] == one at a time
# ---------------------------------------------------------------------------------------------------------------


def test_concurrent_runs_equal_sequential_ones_with_controls(sets, tmp_path, capsys):
    real, synthetic = sets
    base = [
        "--real", real, "--synthetic", synthetic, "--val", real, "--shares", "0,50", "--seeds", "0",
        "--iterations", "8", "--max_real", "4", "--imgsz", "32", "--batch", "2", "--workers", "0",
        "--train_args", "nbs=4",
    ]  # fmt: skip
    code, seq_out, err = run(capsys, *base, "--out", tmp_path / "sequential", "--device", "cpu")
    assert code == 0, err
    code, stdout, err = run(
        capsys, *base, "--out", tmp_path / "concurrent", "--devices", "cpu,cpu", "--positive_control",
        "--negative_control", "blank_images",
    )  # fmt: skip
    assert code == 0, err
    assert stdout.count("training on device cpu") == 4
    # the same seeds and data give the same figures in a worker process as in this one
    for name in ("share0_seed0", "share50_seed0"):
        seq = json.loads((tmp_path / "sequential" / "runs" / name / "result.json").read_text())
        con = json.loads((tmp_path / "concurrent" / "runs" / name / "result.json").read_text())
        assert con["metrics"] == seq["metrics"] and con["convergence"] == seq["convergence"], name
    # optimizer steps counted in ultralytics' trainer equal the rule's prediction (warmup included: 5 of 8)
    predicted = recipe.optimizer_steps(nb=4, epochs=2, batch=2, nbs=4, warmup_epochs=3)[0]
    rows = list(csv.DictReader((tmp_path / "concurrent" / "gain.csv").open()))
    assert predicted == 5 and {r["optimizer_steps"] for r in rows} == {"5"}
    assert f"{predicted} optimizer steps" in seq_out
    assert [(r["arm"], r["share"], r["real_budget"], r["negative_control"]) for r in rows] == [
        ("real", "0", "4", ""),
        ("synthetic", "50", "4", ""),
        ("positive_control", "50", "6", ""),
        ("negative_control", "50", "4", "blank_images"),
    ]
    assert all(r["iterations"] == "8" and r["checkpoint_iteration"] == "6" for r in rows)
    assert all(r["converged"] in ("true", "false") for r in rows)
    # composition: the positive control's extra frames are real train frames outside the real arm, never val
    runs = tmp_path / "concurrent" / "runs"
    pos = list(csv.DictReader((runs / "positive50_seed0" / "composition.csv").open()))
    base_real = {r["source"] for r in csv.DictReader((runs / "share0_seed0" / "composition.csv").open())}
    extra = {r["source"] for r in pos if r["kind"] == "extra real"}
    assert len(extra) == 2 and not extra & base_real
    train_dir, val_dir = real.parent / "images" / "train", real.parent / "images" / "val"
    assert all(Path(p).parent == train_dir for p in extra) and not {Path(p).name for p in extra} & {
        p.name for p in val_dir.iterdir()
    }
    # the negative control trained on grey images with the synthetic labels
    blanks = sorted((runs / "negative_blank_images50_seed0" / "data" / "images" / "train").glob("s__*.png"))
    assert len(blanks) == 2
    from PIL import Image

    with Image.open(blanks[0]) as im:
        assert im.getextrema() == ((128, 128),) * 3
    report = json.loads((tmp_path / "concurrent" / "gain.json").read_text())
    assert [c["real_budget"] for c in report["real_curve"]] == [4, 6]  # the baseline and the positive control
    assert set(report["controls"]) == {
        "50 % synthetic", "positive control (50 %: real frames instead)", "negative control (50 %: blank images)"
    }  # fmt: skip
    md = (tmp_path / "concurrent" / "gain.md").read_text()
    assert "## Controls" in md and "## Real-data learning curve" in md
    # 8 iterations at 2 images from scratch learn nothing: no signal, and the budget warnings
    if report["signal"]:
        assert "no signal" in md.lower() and "Gains are not ranked" in md
    assert any("optimizer step(s)" in w for w in report["warnings"])
    assert any("no mosaic in any arm" in w for w in report["warnings"])
    assert (tmp_path / "concurrent" / "gain.png").read_bytes()[:4] == b"\x89PNG"

    # another host sharing the output folder holds an unfinished run: this one skips it, reports it as not finished,
    # and a later rerun trains only that run, to the same figures
    concurrent = tmp_path / "concurrent"
    first = json.loads((runs / "share50_seed0" / "result.json").read_text())
    (runs / "share50_seed0" / "result.json").unlink()
    other_host = runner.RunLock(runs / ".share50_seed0.lock")
    assert other_host.acquire()
    again = [*base, "--out", concurrent, "--devices", "cpu,cpu", "--positive_control", "--negative_control",
             "blank_images"]  # fmt: skip
    code, stdout, err = run(capsys, *again)
    assert code == 0, err
    assert "training on device" not in stdout and stdout.count(": kept (finished") == 3
    assert "50 % synthetic, seed 0: skipped, another process is training it" in stdout
    assert "Not finished (rerun to complete): share50_seed0." in (concurrent / "gain.md").read_text()
    other_host.release()
    code, stdout, err = run(capsys, *again)
    assert code == 0, err
    assert stdout.count("training on device cpu") == 1 and "50 % synthetic, seed 0: training" in stdout
    assert json.loads((runs / "share50_seed0" / "result.json").read_text())["metrics"] == first["metrics"]
    assert "Not finished" not in (concurrent / "gain.md").read_text()
