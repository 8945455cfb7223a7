"""convert/bdd_inputs.py: the BDD100K root, labels file and box pixel size that the caption and plan
scripts share."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from convert.bdd_inputs import detect_image_size, parse_image_size, resolve_bdd_inputs
from core.cli import UserError


def test_inputs_under_a_root_take_its_labels_and_its_first_images_size(mini_bdd: Path):
    got = resolve_bdd_inputs(str(mini_bdd), "train", None, None)
    assert got.root == mini_bdd and got.labels_file == mini_bdd / "labels/det_20/det_train.json"
    assert got.image_size == (320, 180) == detect_image_size(mini_bdd, "train")
    sized = resolve_bdd_inputs(mini_bdd, "val", None, "1280x720")
    assert sized.labels_file == mini_bdd / "labels/det_20/det_val.json" and sized.image_size == (1280, 720)


def test_a_labels_file_alone_is_taken_as_given_at_bdds_size(tmp_path: Path):
    got = resolve_bdd_inputs(None, "train", tmp_path / "any.json", None)  # read later, by bdd.load_frames
    assert got.root is None and got.labels_file == tmp_path / "any.json" and got.image_size == (1280, 720)
    assert resolve_bdd_inputs(None, "train", "x.json", "640X360").image_size == (640, 360)


def test_the_first_image_by_name_gives_the_size_100k_before_10k(tmp_path: Path):
    assert detect_image_size(tmp_path, "train") is None and detect_image_size(None, "train") is None
    for sub, name, size in [
        ("10k", "a.jpg", (64, 32)),
        ("100k", "b.png", (40, 20)),
        ("100k", "c.jpg", (8, 8)),
    ]:
        (tmp_path / "images" / sub / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(tmp_path / "images" / sub / "train" / name)
    (tmp_path / "images/100k/train/a.txt").write_text("not an image")
    assert detect_image_size(tmp_path, "train") == (40, 20)


def test_a_missing_root_and_bad_sizes_are_errors_with_the_scripts_messages(tmp_path: Path):
    with pytest.raises(
        UserError, match=r"BDD100K folder not found: .*nope \(expected images/ and labels/ inside\)"
    ):
        resolve_bdd_inputs(tmp_path / "nope", "train", None, None)
    for text, message in [("12x", "expected WIDTHxHEIGHT, e.g. 1280x720"), ("ax3", "expected WIDTHxHEIGHT"),
                          ("0x5", "width and height must be positive")]:  # fmt: skip
        with pytest.raises(UserError, match=f"--image_size '{text}': {message}"):
            parse_image_size(text)
    with pytest.raises(UserError, match="no train label file under"):
        resolve_bdd_inputs(tmp_path, "train", None, None)
