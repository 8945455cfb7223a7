"""ControlNet inference from a generation plan (paths.plan) on the tiny SDXL (CPU): the planned boxes condition the
ControlNet as a box layout, records carry the planned labels that stage 4 reads, resume and extension, refusals.

The plan is convert/plan_generation.py's on the mini BDD100K (320x180 frames); the ControlNet is a box-layout one
as training saves it (layout recorded in config.json), one-hot with random output convolutions so that the layout
steers. Images are 64x64 with 2 steps.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sdxl_fixtures import pixels, records, steer_outputs, watch_controlnet_conditions

from ai.controlnet import conditioning as cond
from ai.controlnet import infer_controlnet_sdxl
from convert import plan_generation as pg
from convert.planning import PLAN_FILE
from core.cli import run_main
from vocab import bdd, box_layout, layouts

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "config" / "demo" / "controlnet_infer.yaml"
SMALL = ("resolution.width=64", "resolution.height=64")
TARGETS = {
    "seed": 0,
    "targets": [
        {"name": "night_rain", "weather": "rainy", "timeofday": "night", "require": {"pedestrian": 1}},
    ],
    "edits": {"mirror": 0.5, "remove": 0.3, "move": 0.5, "duplicate": 0.5},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def controlnets(model, tmp_path_factory) -> dict[str, Path]:
    """A box-layout ControlNet (one-hot, 11 channels, steering) and a mask one (nothing recorded: masks)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ai.controlnet import control

    root = tmp_path_factory.mktemp("plan_controlnets")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
    boxes = steer_outputs(ControlNetModel.from_unet(unet, conditioning_channels=11), seed=2)
    control.record_conditioning(boxes, "boxes", "one_hot").save_pretrained(root / "boxes")
    ControlNetModel.from_unet(unet, conditioning_channels=3).save_pretrained(root / "seg")
    return {"boxes": root / "boxes", "seg": root / "seg"}


def make_plan(mini_bdd: Path, out: Path, scenes: int) -> Path:
    targets = out.parent / "targets.yaml"
    targets.write_text(yaml.safe_dump(TARGETS), encoding="utf-8")
    args = [
        "--bdd_data_dir",
        str(mini_bdd),
        "--targets",
        str(targets),
        "--out",
        str(out),
        "--scenes",
        str(scenes),
    ]
    assert pg.main(args) == 0
    return out / PLAN_FILE


def plan_rows(plan: Path) -> list[dict]:
    return [json.loads(line) for line in plan.read_text(encoding="utf-8").splitlines()]


def args_for(model, controlnet, plan: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "--config",
        str(DEMO_CONFIG),
        f"model.pretrained_model={model}",
        f"paths.controlnet_path={controlnet}",
        f"paths.plan={plan}",
        f"paths.masks_path={out / 'no_masks_here'}",  # not read with a plan
        "paths.source_labels=/nowhere/det_val.json",  # nor this
        f"paths.infer_path={out}",
        "on_error=stop",
        *SMALL,
        *overrides,
    ]


@pytest.fixture(scope="module")
def planned(model, controlnets, mini_bdd, tmp_path_factory):
    """A 3-scene plan generated with the box ControlNet, watching what the ControlNet is given."""
    root = tmp_path_factory.mktemp("planned")
    plan = make_plan(mini_bdd, root / "plan", 3)
    mp = pytest.MonkeyPatch()
    seen = watch_controlnet_conditions(mp)
    try:
        out = root / "run"
        args = args_for(model, controlnets["boxes"], plan, out, "batch_size=1")
        assert infer_controlnet_sdxl.main(args) == 0
    finally:
        mp.undo()
    return plan, out, seen


def expected_ids(row: dict, size=(64, 64)):
    ids = box_layout.render_box_layout(row["labels"], tuple(row["size"]))
    return cond.resize_ids(cond.Image.fromarray(ids), size)


def test_plan_scenes_become_images_whose_records_carry_the_planned_labels(planned):
    from annotation.layout import LayoutSources, read_metadata

    plan, out, seen = planned
    gen, rows = out / "generations", plan_rows(plan)
    files = [f"{r['id']}_00.png" for r in rows]
    assert sorted(p.name for p in gen.iterdir()) == ["metadata.jsonl", *files]
    recs = records(gen)
    for rec, row, i in zip(recs, rows, range(3), strict=True):
        assert (rec["file"], rec["prompt"], rec["seed"]) == (files[i], row["caption"], i)
        assert rec["labels"] == row["labels"] and rec["plan_id"] == row["id"]
        assert rec["source_size"] == row["size"] == [320, 180] and (rec["width"], rec["height"]) == (64, 64)
        assert (
            rec["attributes"]
            == row["attributes"]
            == {**row["attributes"], "weather": "rainy", "timeofday": "night"}
        )
        assert rec["plan_source_frame"] == row["source_frame"] and rec["plan_edits"] == row["edits"]
        assert rec["source_frame"] is None and rec["source_labels"] is None and rec["mask_path"] is None
        assert rec["layout"] == "boxes" and rec["conditioning"] == "one_hot"
        assert rec["prompt_source"] == f"{plan.resolve()}:{i + 1}"
    # the ControlNet saw each scene's planned boxes as the one-hot box layout (CFG doubles the batch)
    assert len(seen) == 3 * 2  # 2 steps per image
    for k, row in enumerate(rows):
        expected = cond.ids_to_tensor(expected_ids(row), "one_hot", "boxes")
        assert seen[2 * k].shape == (2, 11, 64, 64) and torch.equal(seen[2 * k][0], expected)
        sheet = pixels(out / "side_by_side" / files[k])
        assert np.array_equal(
            sheet[:, :64], np.asarray(layouts.get("boxes").preview(np.asarray(expected_ids(row))))
        )

    # stage 4 takes the inline labels as the source layout, scaled from source_size to the image
    refs = read_metadata(gen / "metadata.jsonl")
    for rec, row in zip(recs, rows, strict=True):
        boxes, why = LayoutSources().source_boxes(refs[rec["file"]], (64, 64), set(range(10)))
        expected = []
        for lab in row["labels"]:
            cat = bdd.canonical_category(lab["category"])
            if cat.det_class is None or cat.ignored:
                continue
            b = lab["box2d"]
            sx, sy = 64 / 320, 64 / 180
            expected.append((bdd.DET_CLASS_YOLO_ID[cat.det_class],
                             [b["x1"] * sx, b["y1"] * sy, (b["x2"] + 1) * sx, (b["y2"] + 1) * sy]))  # fmt: skip
        assert boxes is not None, why
        assert [(c, pytest.approx(box)) for c, box in boxes] == expected


def test_rerun_resumes_and_a_longer_plan_adds_only_its_new_scenes(
    planned, model, controlnets, mini_bdd, tmp_path, capsys
):
    shutil.copytree(planned[0].parent, tmp_path / "plan")
    shutil.copytree(planned[1], tmp_path / "run")
    plan, out = tmp_path / "plan" / PLAN_FILE, tmp_path / "run"
    gen = out / "generations"
    args = args_for(model, controlnets["boxes"], plan, out, "batch_size=1")
    before = {p.name: p.stat().st_mtime_ns for p in gen.iterdir() if p.suffix == ".png"}
    capsys.readouterr()
    assert infer_controlnet_sdxl.main(args) == 0
    assert "nothing to do: all 3 images are in" in capsys.readouterr().out
    sheet = out / "side_by_side" / "plan_00001_00.png"
    kept = pixels(sheet)
    sheet.unlink()  # a lost sheet comes back from the record's labels, nothing generated
    assert infer_controlnet_sdxl.main(args) == 0
    assert np.array_equal(pixels(sheet), kept)

    make_plan(mini_bdd, plan.parent, 5)  # the plan extended: its first 3 scenes unchanged
    assert infer_controlnet_sdxl.main(args) == 0
    assert "2 generated, 3 already done, 0 failed, 5 in the work list" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in gen.iterdir() if p.suffix == ".png"}
    assert {n: after[n] for n in before} == before
    assert sorted(after) == [f"plan_{i:05d}_00.png" for i in range(5)]
    assert [r["seed"] for r in records(gen)] == list(range(5))


def test_a_plan_needs_a_box_controlnet_and_a_readable_plan(planned, model, controlnets, tmp_path, capsys):
    plan, _, _ = planned
    out = tmp_path / "o"

    def error(*overrides, controlnet=controlnets["boxes"], plan_path=plan):
        code = run_main(infer_controlnet_sdxl.main, args_for(model, controlnet, plan_path, out, *overrides))
        err = capsys.readouterr().err
        assert code == 2, err
        return err

    err = error(controlnet=controlnets["seg"])
    assert (
        f"paths.plan {plan} needs a ControlNet trained on box layouts (each planned scene's boxes are rendered as "
        f"one), but {controlnets['seg']} was trained on segmentation masks" in err
    )
    assert "layout=seg needs a ControlNet trained on segmentation masks" in error("layout=seg")
    assert "set either paths.plan (each planned scene has its caption) or prompt" in error("prompt=a road")
    assert f"paths.plan not found: {tmp_path / 'nope.jsonl'}" in error(plan_path=tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    row = plan_rows(plan)[0]
    bad.write_text(
        json.dumps(row) + "\n" + json.dumps({**row, "id": "x", "size": [320]}) + "\n", encoding="utf-8"
    )
    assert f"{bad}:2: not a planned scene: size" in error(plan_path=bad)
    bad.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    assert f"{bad}:2: scene id '{row['id']}' is also on line 1" in error(plan_path=bad)
    assert not out.exists()  # every error came before any output

    code = run_main(
        infer_controlnet_sdxl.main, [*args_for(model, controlnets["boxes"], plan, out), "--check"]
    )
    assert code == 0 and "ok (3 planned scene(s) x 1 image(s)" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["bad.jsonl"]
