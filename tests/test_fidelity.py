"""annotation/evaluate_fidelity.py: layout fidelity of "generations" that are the real frames themselves (ratio 1.0),
source boxes scaled to a generation's size with size bins judged in the real frame's pixels, the optional mask mIoU
(a tiny random SegFormer built here) and FID/KID (random InceptionV3 weights built here), and every bad input.

The detector is the tests' cached demo detector (tests/yolo_fixture.py), trained on the mini-BDD train frames'
cars, so on those frames it finds cars and the real mAP is well above 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from yolo_fixture import DetectorParams, cached_detector

from annotation.evaluate_fidelity import main
from core.cli import run_main
from vocab import bdd

PARAMS = DetectorParams()
RUN = ["--classes", "car", "--imgsz", str(PARAMS.imgsz), "--batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def detector(mini_bdd, tmp_path_factory) -> Path:
    return cached_detector(mini_bdd, tmp_path_factory.mktemp("fidelity_detector"), PARAMS)


def evaluate(capsys, *argv) -> tuple[int, str, str]:
    code = run_main(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_frames(mini_bdd: Path) -> list[bdd.Frame]:
    images = mini_bdd / "images" / "100k" / "train"
    frames = bdd.load_frames(mini_bdd / "labels" / "det_20" / "det_train.json")
    return [f for f in frames if f.labels_state == "ok" and (images / f.name).is_file()]


def make_generations(mini_bdd: Path, folder: Path, frames: list[bdd.Frame], scale: int = 1) -> list[dict]:
    """'Generations' that are real train frames: the JPEG bytes as they are (scale 1) or upscaled PNGs."""
    folder.mkdir(parents=True)
    records = []
    for i, frame in enumerate(frames):
        src = mini_bdd / "images" / "100k" / "train" / frame.name
        if scale == 1:
            name = f"{i:06d}.jpg"
            shutil.copyfile(src, folder / name)
        else:
            name = f"{i:06d}.png"
            with Image.open(src) as im:
                im.resize((im.width * scale, im.height * scale), Image.Resampling.BICUBIC).save(folder / name)
        mask = mini_bdd / "labels" / "sem_seg" / "masks" / "train" / f"{frame.stem}.png"
        record = {
            "file": name,
            "source_frame": frame.name,
            "source_labels": str(mini_bdd / "labels" / "det_20" / "det_train.json"),
            "source_size": [320, 180],
        }
        if mask.is_file():
            record["mask_path"] = str(mask)
        records.append(record)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def tiny_segformer(folder: Path) -> None:
    """A randomly initialised SegFormer with Cityscapes' 19 classes and its image processor, saved locally."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    cfg = SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[7], strides=[4],
        num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=19,
        id2label={c.train_id: c.name for c in bdd.SEG_CLASSES}, label2id={c.name: c.train_id for c in bdd.SEG_CLASSES},
    )  # fmt: skip
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(cfg).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


def random_inception_weights(path: Path) -> None:
    """torch-fidelity's InceptionV3 with random weights, saved where its real weights file would be."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(
        Unloaded("inception-v3-compat", ["64"], feature_extractor_weights_path=str(empty)).state_dict(), path
    )


def test_real_frames_as_generations_give_a_ratio_of_one(mini_bdd, detector, tmp_path, capsys):
    frames = train_frames(mini_bdd)[:5]
    gen = tmp_path / "infer" / "generations"
    records = make_generations(mini_bdd, gen, frames)
    assert any("mask_path" in r for r in records)
    seg = tmp_path / "segformer"
    tiny_segformer(seg)
    inception = tmp_path / "inception.pth"
    random_inception_weights(inception)
    code, stdout, err = evaluate(
        capsys, "--generations", gen, "--detector", detector, "--bdd_data_dir", mini_bdd, *RUN,
        "--seg_model", seg, "--fid_features", inception, "--fid_dims", "64",
    )  # fmt: skip
    assert code == 0, err
    out = tmp_path / "infer" / "fidelity"  # the default: beside the generations
    result = json.loads((out / "fidelity.json").read_text())
    det = result["detection"]
    assert det["real"]["map50"] > 0.3  # the detector knows these frames' cars
    for key in ("map", "map50", "per_class", "per_size", "gt_boxes", "images"):
        assert det["generated"][key] == det["real"][key], key
    assert det["ratio"]["map50"] == pytest.approx(1.0) and det["ratio"]["map"] == pytest.approx(1.0)
    assert det["ratio"]["per_class"]["car"]["map50"] == pytest.approx(1.0)
    assert list(det["generated"]["per_class"]) == ["car"] and result["classes"] == ["car"]
    cars = sum(1 for f in frames for lb in f.label_list() if lb.category == "car")
    assert det["generated"]["gt_boxes"] == cars and result["counts"]["generations"] == 5
    # the ignore regions of car (the one class scored): det_20's "other vehicle"
    crowd = sum(1 for f in frames for lb in f.label_list() if lb.category == "other vehicle")
    assert det["generated"]["crowd_boxes"] == det["real"]["crowd_boxes"] == crowd
    assert "pycocotools' COCOeval" in (out / "fidelity.md").read_text()

    segm = result["segmentation"]
    assert segm["images"] == sum("mask_path" in r for r in records)
    assert segm["miou_generated"] == segm["miou_real"] and 0.0 <= segm["miou_real"] <= 1.0
    present = set()
    for r in records:
        if "mask_path" in r:
            ids = np.asarray(Image.open(r["mask_path"]))
            present |= {bdd.SEG_CLASSES[i].name for i in np.unique(ids) if i != bdd.SEG_IGNORE_ID}
    assert set(segm["per_class"]) == present

    dist = result["distribution"]  # the same five images on both sides; the other train frames are not used
    assert (dist["real_images"], dist["generated_images"], dist["dims"]) == (5, 5, 64)
    assert abs(dist["fid"]) < 1e-6  # identical sets
    assert dist["kid_mean"] <= 1e-6  # KID's unbiased estimate of identical sets is not above 0

    table = (out / "fidelity.md").read_text()
    assert "| **all** | " in table and "| 1.00 |" in table and "| car |" in table
    assert (out / "fidelity_per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratio 1.00" in stdout and f"table: {out / 'fidelity.md'}" in stdout


def test_layout_boxes_follow_the_generated_size_and_bins_the_real_frames(
    mini_bdd, detector, tmp_path, capsys
):
    """Generations at twice the frame's size: the layout boxes are scaled up for them (else the detector's boxes
    would not match), and each box lands in the size bin it has in the real frame."""
    frames = train_frames(mini_bdd)[:4]
    gen = tmp_path / "generations"
    make_generations(mini_bdd, gen, frames, scale=2)
    out = tmp_path / "report"
    code, _, err = evaluate(
        capsys, "--generations", gen, "--detector", detector, "--bdd_data_dir", mini_bdd, "--out", out, *RUN
    )
    assert code == 0, err
    det = json.loads((out / "fidelity.json").read_text())["detection"]
    gen_sizes = {s: v["gt_boxes"] for s, v in det["generated"]["per_size"].items()}
    assert gen_sizes == {s: v["gt_boxes"] for s, v in det["real"]["per_size"].items()}
    assert gen_sizes["small"] > 0  # small in the 320x180 frame, medium if judged at 640x360
    assert det["generated"]["map50"] > 0.3  # the scaled boxes sit where the upscaled cars are


def test_bad_inputs_are_one_clear_line(mini_bdd, detector, tmp_path, capsys):
    frames = train_frames(mini_bdd)[:2]
    gen = tmp_path / "gen"
    records = make_generations(mini_bdd, gen, frames)
    base = ["--generations", gen, "--bdd_data_dir", mini_bdd, "--out", tmp_path / "o", *RUN]

    code, _, err = evaluate(capsys, *base, "--detector", tmp_path / "missing.pt")
    assert (
        code == 2 and f"model weights not found: {tmp_path / 'missing.pt'}. This tool never downloads" in err
    )

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(gen / records[0]["file"], bare / "a.jpg")
    code, _, err = evaluate(capsys, *base[2:], "--generations", bare, "--detector", detector)
    assert code == 2 and f"no metadata.jsonl in {bare}: fidelity needs each generation's source layout" in err

    (bare / "metadata.jsonl").write_text(json.dumps({"file": "a.jpg", "prompt": "a LoRA image"}) + "\n")
    code, _, err = evaluate(capsys, *base[2:], "--generations", bare, "--detector", detector)
    assert (
        code == 2 and "none of its 1 record(s) names a source layout (source_frame and source_labels)" in err
    )
    # a generation plan's images: their layout is inline, there is no real frame (not a missing config key)
    planned = {"file": "a.jpg", "source_frame": None, "source_labels": None, "source_size": [320, 180],
               "labels": [{"category": "car", "box2d": {"x1": 10, "y1": 20, "x2": 50, "y2": 60}}]}  # fmt: skip
    (bare / "metadata.jsonl").write_text(json.dumps(planned) + "\n")
    code, _, err = evaluate(capsys, *base[2:], "--generations", bare, "--detector", detector)
    assert code == 2 and "1 carry a generation plan's inline layout, which has no real frame" in err
    assert "paths.source_labels" not in err
    assert not (tmp_path / "o").exists()  # each refused before the report folder was made

    elsewhere = tmp_path / "real_elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(mini_bdd / "images" / "100k" / "train" / frames[0].name, elsewhere / frames[0].name)
    argv = [
        "--generations",
        gen,
        "--detector",
        detector,
        "--real_images",
        elsewhere,
        "--out",
        tmp_path / "o",
        *RUN,
    ]
    code, _, err = evaluate(capsys, *argv)
    assert (
        code == 2
        and f"1 generation(s) name a source frame not found under {elsewhere} ({frames[1].name})" in err
    )
    code, stdout, err = evaluate(capsys, *argv, "--allow_missing_real")
    assert code == 0 and "skipped: real frame missing: 1" in stdout

    code, _, err = evaluate(capsys, *base, "--detector", detector, "--seg_model", tmp_path / "no_model")
    assert code == 2 and f"segmentation model folder not found: {tmp_path / 'no_model'}" in err
    assert "huggingface-cli download" in err
    code, _, err = evaluate(capsys, *base, "--detector", detector, "--fid_features", tmp_path / "no.pth")
    assert code == 2 and f"--fid_features file not found: {tmp_path / 'no.pth'}" in err
    assert "weights-inception-2015-12-05-6726825d.pth" in err
    code, _, err = evaluate(capsys, *base, "--detector", detector, "--classes", "cars")
    assert code == 2 and "--classes: 'cars' is not a BDD100K detection class (did you mean 'car'?)" in err
    code, _, err = evaluate(capsys, *base[2:], "--generations", tmp_path / "nope", "--detector", detector)
    assert code == 2 and f"--generations folder not found: {tmp_path / 'nope'}" in err


def test_box_layouts_are_left_out_of_the_mask_miou(mini_bdd, detector, tmp_path, capsys):
    """A box-layout ControlNet records its layout PNG as mask_path; its ids (detection classes, outlines) pass as
    trainIds by value, so without its marker they would be scored as a Cityscapes mask."""
    from vocab import layouts
    from vocab.box_layout import render_box_layout

    masks = mini_bdd / "labels" / "sem_seg" / "masks" / "train"
    frames = [f for f in train_frames(mini_bdd) if (masks / f"{f.stem}.png").is_file()][:2]
    gen = tmp_path / "gen"
    records = make_generations(mini_bdd, gen, frames)
    seg = tmp_path / "segformer"
    tiny_segformer(seg)

    def with_box_layouts(n: int) -> None:
        for i, (record, frame) in enumerate(zip(records[:n], frames, strict=False)):
            layout = render_box_layout(frame.label_list(), tuple(record["source_size"]))
            record["mask_path"] = str(layouts.save_png(layout, tmp_path / f"layout{i}.png", "boxes"))
        (gen / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    with_box_layouts(1)
    argv = [
        "--generations",
        gen,
        "--detector",
        detector,
        "--bdd_data_dir",
        mini_bdd,
        *RUN,
        "--seg_model",
        seg,
    ]
    code, _, err = evaluate(capsys, *argv, "--out", tmp_path / "mixed")
    assert code == 0, err
    segm = json.loads((tmp_path / "mixed" / "fidelity.json").read_text())["segmentation"]
    assert (segm["images"], segm["box_layouts_left_out"]) == (1, 1)
    assert "(1 box layouts left out)" in (tmp_path / "mixed" / "fidelity.md").read_text()

    with_box_layouts(2)
    code, _, err = evaluate(capsys, *argv, "--out", tmp_path / "boxes")
    assert code == 2 and "(all 2 name box layouts, whose ids are detection classes" in err


def test_a_segmentation_model_of_other_classes_is_refused(mini_bdd, detector, tmp_path, capsys):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    model = tmp_path / "ade"
    cfg = SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[7], strides=[4],
        num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=3,
        id2label={0: "wall", 1: "building", 2: "sky"}, label2id={"wall": 0, "building": 1, "sky": 2},
    )  # fmt: skip
    SegformerForSemanticSegmentation(cfg).save_pretrained(model)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(model)
    frames = [
        f
        for f in train_frames(mini_bdd)
        if (mini_bdd / "labels/sem_seg/masks/train" / f"{f.stem}.png").is_file()
    ]
    gen = tmp_path / "gen"
    make_generations(mini_bdd, gen, frames[:1])
    code, _, err = evaluate(
        capsys,
        "--generations",
        gen,
        "--detector",
        detector,
        "--bdd_data_dir",
        mini_bdd,
        *RUN,
        "--seg_model",
        model,
    )
    assert (
        code == 2
        and f"{model} predicts 3 classes (wall, building, sky, ...); mask fidelity needs Cityscapes' 19"
        in err
    )


def test_a_yaml_config_flags_and_overrides_are_one_setting(mini_bdd, detector, tmp_path, capsys):
    """config/fidelity.yaml's keys, the flags (other spellings of them) and key=value overrides: YAML < flags <
    overrides; --check validates without scoring; a typo is refused with did-you-mean, naming the dotted key."""
    frames = train_frames(mini_bdd)[:2]
    gen = tmp_path / "gen"
    make_generations(mini_bdd, gen, frames)
    config = tmp_path / "fidelity.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "paths": {
                    "generations": str(gen),
                    "bdd_data_dir": str(mini_bdd),
                    "out": str(tmp_path / "yaml"),
                },
                "detector": {"model": str(detector), "imgsz": 320, "device": "cpu", "classes": ["car"]},
            }
        )  # fmt: skip
    )
    code, stdout, err = evaluate(capsys, "--config", config, "--check")
    assert code == 0 and "ok (2 record(s)" in stdout and not (tmp_path / "yaml").exists(), err
    # flags win over the file, overrides over both
    code, _, err = evaluate(
        capsys, "--config", config, "--imgsz", "256", "scoring.max_images=1", "--batch", "2"
    )
    assert code == 0, err
    result = json.loads((tmp_path / "yaml" / "fidelity.json").read_text())
    assert result["settings"]["imgsz"] == 256 and result["settings"]["batch"] == 2
    assert result["counts"]["generations"] == 1 and result["classes"] == ["car"]
    resolved = yaml.safe_load((tmp_path / "yaml" / "config.resolved.yaml").read_text())
    assert resolved["detector"]["imgsz"] == 256 and resolved["scoring"]["max_images"] == 1
    code, _, err = evaluate(capsys, "--config", config, "detector.imgsze=256")
    assert code == 2 and "detector.imgsze: unknown key (did you mean 'imgsz'?)" in err
    code, _, err = evaluate(capsys, "--config", config, "--real_images", tmp_path)
    assert code == 2 and "set paths.bdd_data_dir (--bdd_data_dir) or paths.real_images (--real_images)" in err
