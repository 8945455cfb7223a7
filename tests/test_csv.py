"""Stage 1 CSV scripts on small hand-built folders: rows, paths, matching report, palette, bad input, reruns."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from convert import controlnet_bdd_to_huggingface_csv as controlnet_csv
from convert import hf_csv
from convert import lora_bdd_to_huggingface_csv as lora_csv
from core.cli import run_main
from vocab import bdd

SIZE = (32, 18)  # (width, height)
CAPTIONS = {
    "a": 'Traffic scene, clear daytime, city street. 3 cars, a "bus", 1 pedestrian.',
    "b": "Night, rainy highway: 2 trucks; café lights, Straße",
    "c": "Residential street, overcast.",
}


def write_image(path: Path, size=SIZE, color=(90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_mask(path: Path, ids: np.ndarray | None = None, size=SIZE, mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if ids is None:
        ids = np.full((size[1], size[0]), 13, dtype=np.uint8)
    Image.fromarray(ids.astype(np.uint8)).convert(mode).save(path)
    return path


def write_caption(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else (text + "\n").encode("utf-8"))
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """a.jpg, b.png, c.webp with captions and L masks; paths of the three input folders and an output folder."""
    root = tmp_path / "data"
    out = {
        "images": root / "images",
        "captions": root / "captions",
        "masks": root / "masks",
        "out": tmp_path / "csv",
    }
    for name, ext in (("a", ".jpg"), ("b", ".png"), ("c", ".webp")):
        write_image(out["images"] / f"{name}{ext}")
        write_caption(out["captions"] / f"{name}.txt", CAPTIONS[name])
        write_mask(out["masks"] / f"{name}.png")
    return out


def lora_args(f: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--images_path",
        str(f["images"]),
        "--captions_path",
        str(f["captions"]),
        "--output_folder",
        str(f["out"]),
        "--split",
        "train",
        *extra,
    ]


def controlnet_args(f: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--images_path",
        str(f["images"]),
        "--captions_path",
        str(f["captions"]),
        "--conditions_path",
        str(f["masks"]),
        "--output_folder",
        str(f["out"]),
        "--split",
        "train",
        *extra,
    ]


def run_error(main, argv: list[str], capsys) -> str:
    """Run a script's main as the CLI does; assert exit code 2 and return the one error line."""
    capsys.readouterr()
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_hf(path: Path):
    from datasets import load_dataset

    return load_dataset("csv", data_files=str(path), split="train")


def is_string_columns(ds, names: list[str]) -> bool:
    """datasets 5 reads CSV text columns as large_string (older versions: string)."""
    return ds.column_names == names and all(ds.features[n].dtype in ("string", "large_string") for n in names)


# ---------------------------------------------------------------------------------------------------------------
# Rows, columns and paths
# ---------------------------------------------------------------------------------------------------------------


def test_lora_csv_rows_exact_and_loads_in_pandas_and_datasets(folders, capsys):
    assert lora_csv.main(lora_args(folders)) == 0
    csv_path = folders["out"] / "bdd_hf_dataset_lora_train.csv"
    images = folders["images"]
    expected = [
        {"image": str(images / "a.jpg"), "text": CAPTIONS["a"]},
        {"image": str(images / "b.png"), "text": CAPTIONS["b"]},
        {"image": str(images / "c.webp"), "text": CAPTIONS["c"]},
    ]
    assert read_rows(csv_path) == expected
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "image,text"

    frame = pd.read_csv(csv_path)
    assert list(frame.columns) == ["image", "text"]
    assert frame.to_dict("records") == expected

    ds = load_hf(csv_path)
    assert ds.column_names == ["image", "text"]
    assert is_string_columns(ds, ["image", "text"])
    assert ds.to_list() == expected

    out = capsys.readouterr().out
    assert "found 3 images, 3 captions; matched 3 rows" in out
    assert f"wrote: {csv_path} (3 rows)" in out
    assert (folders["out"] / "unmatched_lora_train.txt").read_text() == ""


def test_controlnet_csv_points_at_masks_as_they_are(folders):
    mask_bytes = (folders["masks"] / "a.png").read_bytes()
    assert controlnet_csv.main(controlnet_args(folders)) == 0
    csv_path = folders["out"] / "bdd_hf_dataset_controlnet_train.csv"
    expected = [
        {
            "image": str(folders["images"] / f"{n}{ext}"),
            "conditioning_image": str(folders["masks"] / f"{n}.png"),
            "text": CAPTIONS[n],
        }
        for n, ext in (("a", ".jpg"), ("b", ".png"), ("c", ".webp"))
    ]
    assert read_rows(csv_path) == expected
    ds = load_hf(csv_path)
    assert ds.column_names == ["image", "conditioning_image", "text"]
    assert is_string_columns(ds, ["image", "conditioning_image", "text"])
    assert ds.to_list() == expected
    assert pd.read_csv(csv_path).to_dict("records") == expected
    assert (folders["masks"] / "a.png").read_bytes() == mask_bytes  # untouched
    assert not (folders["out"] / "conditioning_rgb").exists()


def test_relative_paths_resolve_from_the_csv_folder(folders):
    folders["out"] = folders["out"] / "deep" / "er"
    assert lora_csv.main(lora_args(folders, "--relative_paths")) == 0
    assert controlnet_csv.main(controlnet_args(folders, "--relative_paths")) == 0
    lora_rows = read_rows(folders["out"] / "bdd_hf_dataset_lora_train.csv")
    cn_rows = read_rows(folders["out"] / "bdd_hf_dataset_controlnet_train.csv")
    assert [r["image"] for r in lora_rows] == [
        "../../../data/images/a.jpg",
        "../../../data/images/b.png",
        "../../../data/images/c.webp",
    ]
    for row in lora_rows + cn_rows:
        for column in ("image", "conditioning_image"):
            if column in row:
                assert not os.path.isabs(row[column])
                assert (folders["out"] / row[column]).resolve().is_file()
    assert [(folders["out"] / r["conditioning_image"]).resolve() for r in cn_rows] == [
        (folders["masks"] / f"{n}.png").resolve() for n in "abc"
    ]


def test_absolute_paths_are_absolute_even_for_relative_arguments(folders, monkeypatch):
    monkeypatch.chdir(folders["images"].parent)
    argv = [
        "--images_path",
        "images",
        "--captions_path",
        "captions",
        "--output_folder",
        "out",
        "--split",
        "val",
    ]
    assert lora_csv.main(argv) == 0
    rows = read_rows(folders["images"].parent / "out" / "bdd_hf_dataset_lora_val.csv")
    assert [r["image"] for r in rows] == [str(folders["images"] / n) for n in ("a.jpg", "b.png", "c.webp")]


# ---------------------------------------------------------------------------------------------------------------
# Matching and the unmatched report
# ---------------------------------------------------------------------------------------------------------------


def test_controlnet_matching_lists_every_unmatched_file_with_its_reason(folders, capsys):
    write_image(folders["images"] / "d.jpg")  # caption and mask missing
    write_image(folders["images"] / "e.jpg")
    write_caption(folders["captions"] / "e.txt", "only a caption for e")  # mask missing
    write_image(folders["images"] / "f.jpg")
    write_mask(folders["masks"] / "f.png")  # caption missing
    write_caption(folders["captions"] / "zz.txt", "caption without image")
    write_mask(folders["masks"] / "yy.png")
    (folders["masks"] / "c.png").rename(folders["masks"] / "c_train_id.png")  # legacy suffix still matches
    write_image(folders["images"] / "a.png")  # same base name as a.jpg: duplicate
    (folders["masks"] / "notes.md").write_text("not a mask")  # ignored: masks are PNGs

    assert controlnet_csv.main(controlnet_args(folders)) == 0
    rows = read_rows(folders["out"] / "bdd_hf_dataset_controlnet_train.csv")
    assert [(Path(r["image"]).name, Path(r["conditioning_image"]).name) for r in rows] == [
        ("a.jpg", "a.png"),
        ("b.png", "b.png"),
        ("c.webp", "c_train_id.png"),
    ]
    unmatched = (folders["out"] / "unmatched_controlnet_train.txt").read_text(encoding="utf-8")
    assert unmatched.splitlines() == [
        f"caption without image\t{folders['captions'] / 'zz.txt'}",
        f"duplicate image name\t{folders['images'] / 'a.png'}",
        f"image without caption\t{folders['images'] / 'f.jpg'}",
        f"image without caption and mask\t{folders['images'] / 'd.jpg'}",
        f"image without mask\t{folders['images'] / 'e.jpg'}",
        f"mask without image\t{folders['masks'] / 'yy.png'}",
    ]
    out = capsys.readouterr().out
    assert "found 7 images, 5 captions, 5 masks; matched 3 rows" in out
    assert "unmatched: 6 files" in out
    assert "  image without mask: 1 (e.jpg)" in out


def test_lora_report_shows_first_names_and_counts(folders, capsys):
    for i in range(8):
        write_caption(folders["captions"] / f"x{i}.txt", f"orphan {i}")
    write_image(folders["images"] / "no_caption.jpg")
    assert lora_csv.main(lora_args(folders)) == 0
    out = capsys.readouterr().out
    assert "  caption without image: 8 (x0.txt, x1.txt, x2.txt, x3.txt, x4.txt ... and 3 more)" in out
    assert "  image without caption: 1 (no_caption.jpg)" in out
    lines = (folders["out"] / "unmatched_lora_train.txt").read_text().splitlines()
    assert len(lines) == 9
    assert lines[-1] == f"image without caption\t{folders['images'] / 'no_caption.jpg'}"


def test_empty_caption_is_listed_and_its_row_skipped(folders, capsys):
    write_caption(folders["captions"] / "b.txt", "  \n\n")
    assert lora_csv.main(lora_args(folders)) == 0
    rows = read_rows(folders["out"] / "bdd_hf_dataset_lora_train.csv")
    assert [Path(r["image"]).name for r in rows] == ["a.jpg", "c.webp"]
    assert (folders["out"] / "unmatched_lora_train.txt").read_text().splitlines() == [
        f"empty caption\t{folders['captions'] / 'b.txt'}"
    ]
    assert "  empty caption: 1 (b.txt)" in capsys.readouterr().out


def test_zero_matched_rows_is_an_error_that_says_why(folders, capsys):
    for p in folders["captions"].iterdir():
        p.rename(p.with_name("other_" + p.name))
    msg = run_error(lora_csv.main, lora_args(folders), capsys)
    assert msg.startswith("error: no rows: no image has a matching caption by base name (3 images in ")
    assert "image without caption: a.jpg, b.png, c.webp" in msg
    assert "caption without image: other_a.txt, other_b.txt, other_c.txt" in msg
    assert not folders["out"].exists()

    for p in folders["captions"].iterdir():
        p.rename(p.with_name(p.name.removeprefix("other_")))
    for p in folders["masks"].iterdir():
        p.unlink()
    msg = run_error(controlnet_csv.main, controlnet_args(folders), capsys)
    assert "no image has a matching caption and mask" in msg and "0 masks in" in msg


def test_all_captions_empty_is_an_error(folders, capsys):
    for name in "abc":
        write_caption(folders["captions"] / f"{name}.txt", "")
    msg = run_error(lora_csv.main, lora_args(folders), capsys)
    assert msg.startswith("error: no rows: all 3 matched captions are empty")


# ---------------------------------------------------------------------------------------------------------------
# Palette renderings
# ---------------------------------------------------------------------------------------------------------------


def test_palette_rgb_writes_official_colours(folders):
    ids = np.full((SIZE[1], SIZE[0]), 255, dtype=np.uint8)
    ids[0:4, :] = 0  # road
    ids[4:8, 0:10] = 13  # car
    ids[8:12, :] = 18  # bicycle
    ids[12:14, :] = 10  # sky
    write_mask(folders["masks"] / "a.png", ids)
    assert controlnet_csv.main(controlnet_args(folders, "--palette_rgb", "--relative_paths")) == 0

    rows = read_rows(folders["out"] / "bdd_hf_dataset_controlnet_train.csv")
    assert [r["conditioning_image"] for r in rows] == [f"conditioning_rgb/train/{n}.png" for n in "abc"]
    with Image.open(folders["out"] / rows[0]["conditioning_image"]) as im:
        assert im.mode == "RGB" and im.size == SIZE
        rgb = np.asarray(im)
    # Official BDD100K/Cityscapes palette (bdd100k/label/label.py); 255 (ignore) is black.
    assert rgb[0, 0].tolist() == [128, 64, 128]
    assert rgb[5, 3].tolist() == [0, 0, 142]
    assert rgb[5, 20].tolist() == [0, 0, 0]
    assert rgb[9, 31].tolist() == [119, 11, 32]
    assert rgb[13, 0].tolist() == [70, 130, 180]
    assert rgb[17, 17].tolist() == [0, 0, 0]
    assert (rgb[0:4] == [128, 64, 128]).all() and (rgb[8:12] == [119, 11, 32]).all()


def test_palette_rgb_rerun_skips_up_to_date_renderings(folders):
    assert controlnet_csv.main(controlnet_args(folders, "--palette_rgb")) == 0
    rendering = folders["out"] / "conditioning_rgb" / "train" / "a.png"
    before = rendering.stat().st_mtime_ns
    assert controlnet_csv.main(controlnet_args(folders, "--palette_rgb")) == 0
    assert rendering.stat().st_mtime_ns == before

    ids = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)  # mask edited later: rendering redone
    write_mask(folders["masks"] / "a.png", ids)
    os.utime(folders["masks"] / "a.png", ns=(before + 10**9, before + 10**9))
    assert controlnet_csv.main(controlnet_args(folders, "--palette_rgb")) == 0
    with Image.open(rendering) as im:
        assert np.asarray(im)[0, 0].tolist() == [128, 64, 128]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("images", "image folder not found"),
        ("captions", "caption folder not found"),
        ("masks", "mask folder not found"),
    ],
)
def test_missing_input_folder(folders, capsys, key, expected):
    folders[key] = folders[key].parent / "nope"
    msg = run_error(controlnet_csv.main, controlnet_args(folders), capsys)
    assert msg == f"error: {expected}: {folders[key]}"
    assert not folders["out"].exists()


def test_caption_not_utf8_names_file_and_byte(folders, capsys):
    write_caption(folders["captions"] / "b.txt", "Stra\xdfe".encode("latin-1"))
    msg = run_error(lora_csv.main, lora_args(folders), capsys)
    path = folders["captions"] / "b.txt"
    assert msg.startswith(f"error: caption {path} is not valid UTF-8: byte 0xdf at position 4 ")
    assert "re-save the file as UTF-8" in msg
    assert not folders["out"].exists()


def test_read_caption_strips_whitespace_and_bom(tmp_path):
    path = write_caption(tmp_path / "x.txt", "\ufeff  hello, world \r\n".encode())
    assert hf_csv.read_caption(path) == "hello, world"


def test_rgb_mask_is_refused_with_the_hint(folders, capsys):
    write_mask(folders["masks"] / "b.png", mode="RGB")
    write_mask(
        folders["masks"] / "c.png", mode="RGB"
    )  # masks run in parallel: the first in row order is named
    msg = run_error(controlnet_csv.main, controlnet_args(folders), capsys)
    assert f"mask {folders['masks'] / 'b.png'} is mode RGB" in msg
    # colormaps are mode P (index = id) and accepted: the hint names both one-channel forms
    assert "use labels/sem_seg/masks (mode L) or the colormaps (mode P)" in msg
    assert not (folders["out"] / "bdd_hf_dataset_controlnet_train.csv").exists()


def test_mask_size_mismatch_names_both_files(folders, capsys):
    write_mask(folders["masks"] / "c.png", size=(16, 9))
    msg = run_error(controlnet_csv.main, controlnet_args(folders, "--skip_mask_check"), capsys)
    assert msg == (
        f"error: mask {folders['masks'] / 'c.png'} is 16x9 but its image {folders['images'] / 'c.webp'} "
        "is 32x18; a mask must have its image's size"
    )
    assert not (folders["out"] / "bdd_hf_dataset_controlnet_train.csv").exists()


def test_mask_values_out_of_range_unless_skipped(folders, capsys):
    ids = np.full((SIZE[1], SIZE[0]), 13, dtype=np.uint8)
    ids[0, 0], ids[1, 1] = 19, 200
    write_mask(folders["masks"] / "a.png", ids)
    msg = run_error(controlnet_csv.main, controlnet_args(folders), capsys)
    assert msg.startswith(
        f"error: mask {folders['masks'] / 'a.png'} has values [19, 200] outside the BDD100K trainIds"
    )
    assert not (folders["out"] / "bdd_hf_dataset_controlnet_train.csv").exists()
    # --skip_mask_check reads headers only: the same folder now passes.
    assert controlnet_csv.main(controlnet_args(folders, "--skip_mask_check")) == 0
    assert len(read_rows(folders["out"] / "bdd_hf_dataset_controlnet_train.csv")) == 3


def test_unreadable_image_is_named(folders, capsys):
    (folders["images"] / "b.png").write_bytes(b"not a png")
    msg = run_error(controlnet_csv.main, controlnet_args(folders), capsys)
    assert msg.startswith(f"error: cannot read image {folders['images'] / 'b.png'}")


def test_bad_output_name(folders, capsys):
    argv = lora_args(folders)
    argv[argv.index("--split") + 1] = "../train"
    msg = run_error(lora_csv.main, argv, capsys)
    assert msg == "error: --split '../train': use letters, digits, '.', '_' or '-' only (e.g. train, val)"


# ---------------------------------------------------------------------------------------------------------------
# Reruns: identical is a no-op, different content is not clobbered
# ---------------------------------------------------------------------------------------------------------------


def test_identical_rerun_leaves_files_untouched(folders, capsys):
    assert controlnet_csv.main(controlnet_args(folders)) == 0
    csv_path = folders["out"] / "bdd_hf_dataset_controlnet_train.csv"
    unmatched = folders["out"] / "unmatched_controlnet_train.txt"
    stamps = (csv_path.stat().st_mtime_ns, unmatched.stat().st_mtime_ns)
    capsys.readouterr()
    assert controlnet_csv.main(controlnet_args(folders)) == 0
    assert (csv_path.stat().st_mtime_ns, unmatched.stat().st_mtime_ns) == stamps
    assert f"unchanged (identical to the existing file): {csv_path} (3 rows)" in capsys.readouterr().out
    assert sorted(p.name for p in folders["out"].iterdir()) == [
        csv_path.name,
        unmatched.name,
    ]  # no temp files


def test_different_content_is_refused_unless_overwrite(folders, capsys):
    assert lora_csv.main(lora_args(folders)) == 0
    csv_path = folders["out"] / "bdd_hf_dataset_lora_train.csv"
    before = csv_path.read_bytes()
    write_caption(folders["captions"] / "a.txt", "a new caption")

    msg = run_error(lora_csv.main, lora_args(folders), capsys)
    assert msg == (
        f"error: {csv_path} already exists with different content; pass --overwrite to replace it "
        "or choose another --output_folder"
    )
    assert csv_path.read_bytes() == before

    assert lora_csv.main(lora_args(folders, "--overwrite")) == 0
    assert read_rows(csv_path)[0]["text"] == "a new caption"


# ---------------------------------------------------------------------------------------------------------------
# Both ways of running the scripts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "convert/lora_bdd_to_huggingface_csv.py"],
        [
            sys.executable,
            "-m",
            "convert.controlnet_bdd_to_huggingface_csv",
            "--conditions_path",
            "x",
            "--split",
            "t",
        ],
    ],
)
def test_scripts_run_from_the_command_line(folders, repo_root, command):
    missing = str(folders["images"].parent / "missing")
    argv = ["--images_path", missing, "--captions_path", missing, "--output_folder", str(folders["out"])]
    if "--split" not in command:
        argv += ["--split", "train"]
    proc = subprocess.run(command + argv, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: image folder not found: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# --layout boxes: box layouts rendered from the labels of every labeled frame
# ---------------------------------------------------------------------------------------------------------------


def box_args(images: Path, captions: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--layout", "boxes", "--images_path", str(images), "--captions_path", str(captions),
        "--labels_file", str(labels), "--output_folder", str(out), "--split", "train", *extra,
    ]  # fmt: skip


@pytest.fixture
def box_inputs(mini_bdd: Path, tmp_path: Path) -> dict[str, Path]:
    """The mini-BDD100K's 100K train images, a caption for each, and a copy of det_train (editable)."""
    images = mini_bdd / "images" / "100k" / "train"
    for image in bdd.list_images(images):
        write_caption(tmp_path / "captions" / f"{image.stem}.txt", f"a street, frame {image.stem}")
    import json

    frames = json.loads((mini_bdd / "labels" / "det_20" / "det_train.json").read_text())
    frames.append(
        {
            "name": "0000-no-image.jpg",
            "labels": [{"id": "1", "category": "car", "box2d": {"x1": 1, "y1": 1, "x2": 9, "y2": 9}}],
        }
    )
    labels = tmp_path / "det_train.json"
    labels.write_text(json.dumps(frames))
    return {"images": images, "captions": tmp_path / "captions", "labels": labels, "out": tmp_path / "csv"}


def test_box_csv_renders_one_layout_per_labeled_frame(box_inputs, capsys):
    from vocab import box_layout

    f = box_inputs
    assert controlnet_csv.main(box_args(f["images"], f["captions"], f["labels"], f["out"])) == 0
    frames = {fr.stem: fr for fr in bdd.load_frames(f["labels"]) if fr.stem != "0000-no-image"}
    images = bdd.list_images(f["images"])
    labeled = [p for p in images if p.stem in frames]
    assert 0 < len(labeled) < len(images)  # the mini set has images without a frame in det_train
    rows = read_rows(f["out"] / "bdd_hf_dataset_controlnet_boxes_train.csv")
    layouts = f["out"] / "box_layouts" / "train"
    assert rows == [
        {
            "image": str(p),
            "conditioning_image": str(layouts / f"{p.stem}.png"),
            "text": f"a street, frame {p.stem}",
        }
        for p in labeled
    ]
    drawn = 0
    for p in labeled:
        with Image.open(p) as im:
            size = im.size
        with Image.open(layouts / f"{p.stem}.png") as lay:
            assert lay.mode == "P" and lay.size == size and lay.info["bdd_layout"] == "boxes"
            ids = np.asarray(lay)
        assert np.array_equal(ids, box_layout.render_box_layout(frames[p.stem].label_list(), size))
        drawn += len(box_layout.layout_boxes(frames[p.stem].label_list(), size))
    unmatched = (f["out"] / "unmatched_controlnet_boxes_train.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in unmatched} <= {"image without labels", "labels without image"}
    listed = {Path(line.split("\t")[1]).name for line in unmatched if line.startswith("image without labels")}
    assert listed == {p.name for p in images} - {p.name for p in labeled}
    assert len(rows) == len(frames) == len(labeled)  # every labeled frame with an image, empty ones too
    assert f"labels without image\t{f['labels']}/0000-no-image.jpg" in unmatched  # a frame without its image
    out = capsys.readouterr().out
    assert f"found {len(images)} images, {len(images)} captions, {len(frames) + 1} labeled frames" in out
    assert f"box layouts: {len(labeled)} written, 0 up to date in {layouts}; {drawn} boxes drawn" in out
    assert "warning" not in out
    # the masks CSV of the same folder is another file: both kinds can live in one csv/ folder
    assert not (f["out"] / "bdd_hf_dataset_controlnet_train.csv").exists()


def test_box_csv_rerun_rewrites_only_changed_frames(box_inputs, capsys):
    import json

    f = box_inputs
    argv = box_args(f["images"], f["captions"], f["labels"], f["out"], "--relative_paths")
    assert controlnet_csv.main(argv) == 0
    layouts = f["out"] / "box_layouts" / "train"
    stamps = {p.name: p.stat().st_mtime_ns for p in layouts.iterdir()}
    capsys.readouterr()
    assert controlnet_csv.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in layouts.iterdir()} == stamps
    assert f"box layouts: 0 written, {len(stamps)} up to date" in capsys.readouterr().out

    data = json.loads(f["labels"].read_text())
    frame = next(fr for fr in data if fr.get("labels") and f"{Path(fr['name']).stem}.png" in stamps)
    frame["labels"][0]["box2d"]["x1"] -= 3  # one box moved: only its frame's layout changes
    frame["labels"].append(
        {"id": "x", "category": "car", "box2d": {"x1": 5000, "y1": 10, "x2": 5100, "y2": 50}}
    )
    f["labels"].write_text(json.dumps(data))
    assert controlnet_csv.main(argv) == 0
    changed = sorted(p.name for p in layouts.iterdir() if p.stat().st_mtime_ns != stamps[p.name])
    assert changed == [f"{Path(frame['name']).stem}.png"]
    out = capsys.readouterr().out
    assert f"box layouts: 1 written, {len(stamps) - 1} up to date" in out
    assert (
        f"warning: 1 box(es) lie wholly outside their frames and were left out; many of them mean {f['labels']}"
        in out
    )
    for row in read_rows(f["out"] / "bdd_hf_dataset_controlnet_boxes_train.csv"):
        assert not os.path.isabs(row["conditioning_image"])
        assert (f["out"] / row["conditioning_image"]).resolve().parent == layouts.resolve()
    assert not [p for p in layouts.iterdir() if ".tmp" in p.name]


def test_box_csv_matches_url_and_extensionless_frame_names_as_their_captions_are_named(tmp_path, capsys):
    """Scalabel frame names that are URLs pair with the image named by the URL's decoded file name (as stage 1
    names their captions: bdd.stem), query and escapes included; a 2018 per-image name has no extension."""
    import json

    from vocab import box_layout

    images, captions = tmp_path / "images", tmp_path / "captions"
    for name in ("c d", "plain", "a%20b"):
        write_image(images / f"{name}.jpg")
        write_caption(captions / f"{name}.txt", f"frame {name}")
    car = [{"id": "1", "category": "car", "box2d": {"x1": 2, "y1": 2, "x2": 20, "y2": 12}}]
    bus = [{"id": "2", "category": "bus", "box2d": {"x1": 5, "y1": 4, "x2": 30, "y2": 20}}]
    frames = [
        {"name": "https://host/img/c%20d.jpg?sig=1.2", "labels": car},
        {"name": "plain", "labels": bus},
        {"name": "https://host/img/a%20b.jpg", "labels": car},  # its image would be "a b.jpg"
    ]
    labels = tmp_path / "export.json"
    labels.write_text(json.dumps({"frames": frames, "config": {}}), encoding="utf-8")
    out = tmp_path / "csv"
    assert controlnet_csv.main(box_args(images, captions, labels, out)) == 0
    layouts = out / "box_layouts" / "train"
    assert [
        (r["image"], r["conditioning_image"])
        for r in read_rows(out / "bdd_hf_dataset_controlnet_boxes_train.csv")
    ] == [(str(images / f"{name}.jpg"), str(layouts / f"{name}.png")) for name in ("c d", "plain")]
    for name, boxes in (("c d", car), ("plain", bus)):
        with Image.open(layouts / f"{name}.png") as lay:
            assert np.array_equal(np.asarray(lay), box_layout.render_box_layout(boxes, SIZE))
    unmatched = (out / "unmatched_controlnet_boxes_train.txt").read_text().splitlines()
    assert unmatched == [
        f"image without labels\t{images / 'a%20b.jpg'}",
        f"labels without image\t{labels}/a b.jpg",
    ]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--layout", "boxes"), "error: --layout boxes needs --labels_file"),
        (("--conditions", "boxes"), "error: --layout boxes needs --labels_file"),  # the old spelling
        (
            ("--layout", "boxes", "--labels_file", "L", "--conditions_path", "M"),
            "error: --conditions_path: for",
        ),
        (
            ("--layout", "boxes", "--labels_file", "L", "--palette_rgb"),
            "error: --palette_rgb: for layouts read from files",
        ),
        ((), "error: --conditions_path is required (the masks folder)"),
        (
            ("--conditions_path", "M", "--labels_file", "L"),
            "error: --labels_file is for layouts drawn from labels (--layout boxes)",
        ),
    ],
)
def test_box_csv_flags_are_checked(folders, capsys, extra, message):
    argv = ["--images_path", str(folders["images"]), "--captions_path", str(folders["captions"]),
            "--output_folder", str(folders["out"]), "--split", "train", *extra]  # fmt: skip
    assert run_error(controlnet_csv.main, argv, capsys).startswith(message)


def test_box_csv_missing_labels_file_is_named(folders, capsys):
    missing = folders["images"].parent / "det_train.json"
    argv = box_args(folders["images"], folders["captions"], missing, folders["out"])
    assert run_error(controlnet_csv.main, argv, capsys) == f"error: labels file not found: {missing}"
    assert not folders["out"].exists()


def test_old_flag_spellings_still_work_and_say_the_new_ones(folders, box_inputs, capsys):
    """--type and --conditions masks|boxes (the flags before --split and --layout, as the users' manual and older
    scripts spell them) give the same CSVs, with one warning each that names the new flag; disagreeing spellings
    are refused."""
    new = controlnet_args(folders)
    assert run_main(controlnet_csv.main, new) == 0
    expected = (folders["out"] / "bdd_hf_dataset_controlnet_train.csv").read_bytes()
    capsys.readouterr()
    old = [*new[:-2], "--type", "train", "--conditions", "masks"]
    assert run_main(controlnet_csv.main, old) == 0
    err = capsys.readouterr().err
    assert "warning: --type train is deprecated; use --split train" in err
    assert "warning: --conditions masks is deprecated; use --layout seg" in err
    assert (folders["out"] / "bdd_hf_dataset_controlnet_train.csv").read_bytes() == expected

    f = box_inputs
    args = box_args(f["images"], f["captions"], f["labels"], f["out"])
    old_boxes = ["--conditions" if a == "--layout" else a for a in args]
    assert run_main(controlnet_csv.main, old_boxes) == 0
    assert "warning: --conditions boxes is deprecated; use --layout boxes" in capsys.readouterr().err
    assert len(read_rows(f["out"] / "bdd_hf_dataset_controlnet_boxes_train.csv")) > 0

    assert run_error(controlnet_csv.main, [*new, "--type", "val"], capsys) == (
        "error: --split train and --type val (its old spelling) disagree; pass --split only"
    )
