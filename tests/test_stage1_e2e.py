"""Stage 1 end to end on the mini-BDD100K: captions -> LoRA CSV and ControlNet CSV -> datasets loads both."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from convert import controlnet_bdd_to_huggingface_csv as controlnet_csv
from convert import lora_bdd_to_huggingface_csv as lora_csv
from core.cli import run_main
from vocab import bdd


@pytest.mark.slow
def test_stage1_captions_then_both_csvs_load_in_datasets(mini_bdd: Path, tmp_path: Path):
    from datasets import load_dataset

    from convert import generate_bdd_captions

    captions = tmp_path / "captions" / "train"
    out = tmp_path / "csv"
    images_100k = mini_bdd / "images" / "100k" / "train"
    images_10k = mini_bdd / "images" / "10k" / "train"
    masks = mini_bdd / "labels" / "sem_seg" / "masks" / "train"

    argv = ["--bdd_data_dir", str(mini_bdd), "--caption_txt_output_folder", str(captions), "--split", "train"]
    assert run_main(generate_bdd_captions.main, argv) == 0
    caption_files = {bdd.stem(p): p for p in captions.glob("*.txt")}
    assert caption_files, f"no captions written to {captions}"

    argv = ["--images_path", str(images_100k), "--captions_path", str(captions), "--output_folder", str(out)]
    assert run_main(lora_csv.main, [*argv, "--split", "train"]) == 0
    argv = ["--images_path", str(images_10k), "--captions_path", str(captions), "--output_folder", str(out)]
    argv += ["--conditions_path", str(masks), "--split", "train", "--relative_paths"]
    assert run_main(controlnet_csv.main, argv) == 0

    # LoRA: one row per 100K train image that has a caption, absolute paths, captions equal to the files.
    lora = load_dataset("csv", data_files=str(out / "bdd_hf_dataset_lora_train.csv"), split="train")
    assert lora.column_names == ["image", "text"]
    expected = sorted(
        (p for p in bdd.list_images(images_100k) if bdd.stem(p) in caption_files), key=lambda p: p.name
    )
    assert expected
    assert lora["image"] == [str(p) for p in expected]
    for row in lora:
        assert Path(row["image"]).is_file()
        assert row["text"] == caption_files[bdd.stem(row["image"])].read_text(encoding="utf-8").strip()

    # ControlNet: 10K images with caption and mask; relative paths resolve from the CSV's folder.
    cn = load_dataset("csv", data_files=str(out / "bdd_hf_dataset_controlnet_train.csv"), split="train")
    assert cn.column_names == ["image", "conditioning_image", "text"]
    mask_stems = {bdd.stem(p) for p in masks.glob("*.png")}
    expected = sorted(
        (
            p
            for p in bdd.list_images(images_10k)
            if bdd.stem(p) in caption_files and bdd.stem(p) in mask_stems
        ),
        key=lambda p: p.name,
    )
    assert expected
    assert [(out / p).resolve() for p in cn["image"]] == [p.resolve() for p in expected]
    for row in cn:
        image, mask = out / row["image"], out / row["conditioning_image"]
        assert image.is_file() and mask.is_file()
        assert mask.resolve().parent == masks.resolve() and bdd.stem(mask) == bdd.stem(image)
        assert row["text"] == caption_files[bdd.stem(image)].read_text(encoding="utf-8").strip()
        with Image.open(image) as im, Image.open(mask) as mk:
            assert mk.mode == "L"
            assert mk.size == im.size

    # Every 10K image without a row is listed with its reason.
    unmatched = (out / "unmatched_controlnet_train.txt").read_text(encoding="utf-8").splitlines()
    listed_images = {Path(line.split("\t")[1]).name for line in unmatched if line.startswith("image without")}
    assert listed_images == {p.name for p in bdd.list_images(images_10k)} - {p.name for p in expected}
