"""Object-weighted diffusion loss (ai/common/loss_weights.py): the weight map by hand after crop, flip and resize,
bit-identical default loss, cached = uncached, short LoRA and ControlNet runs, and the --check errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import test_controlnet_train
import torch
from PIL import Image
from sdxl_fixtures import make_image_csv
from test_controlnet_train import box_csv

from ai.common import data, diffusion, loss_weights, trainer
from ai.common.train_config import LossConfig
from core.cli import UserError
from vocab import bdd, box_layout, layouts

__all__ = ["box_csv"]  # the module fixture of the ControlNet training tests

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def det20(path: Path, frames: dict[str, list[tuple[str, float, float, float, float]]]) -> Path:
    """A det_20-style labels file: image name -> (category, x1, y1, x2, y2) boxes."""
    doc = [
        {
            "name": name,
            "labels": [
                {"id": str(i), "category": cat, "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}
                for i, (cat, x1, y1, x2, y2) in enumerate(boxes)
            ],
        }
        for name, boxes in frames.items()
    ]
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def row_of(size, name="a.jpg", index=0, mask=None) -> data.Row:
    return data.Row(index, f"/nonexistent/{name}", "", size, name=name, mask=mask)


# --- the map, by hand ---------------------------------------------------------------------------------------------


def test_box_map_equals_a_hand_computation_after_resize_crop_and_flip(tmp_path):
    # a 40x20 image in a 16x16 bucket: x0.8 to 32x16, centre crop from x=8, mirrored; latents 2x2 (f=8)
    plan = data.plan_crop((40, 20), (16, 16), "center", True)
    assert (plan.resized, plan.left, plan.top, plan.flip) == ((32, 16), 8, 0, True)
    labels = det20(tmp_path / "det.json", {"a.jpg": [
        ("car", 10, 0, 19, 9),     # [10,20]x[0,10] -> x0.8 [8,16]x[0,8] -> crop [0,8] -> mirror: cols 8-15, rows 0-7
        ("traffic light", 20, 10, 24, 14),  # -> [16,20]x[8,12] -> [8,12] -> mirror [4,8]: cols 4-7, rows 8-11
        ("pedestrian", 0, 10, 4, 19),  # -> x [0,4] -> crop [-8,-4]: cut away
        ("drivable area", 0, 0, 39, 19),  # not a detection class
    ]})  # fmt: skip
    row = row_of((40, 20))
    objects = loss_weights.BoxObjects.from_labels_file(labels, [row])
    loss = LossConfig(object_weight=3.0, small_object_boost=0.5, small_object_cap=4.0)
    pixels = objects(row, plan, loss)
    # car: 64 of 256 crop pixels, 1/sqrt(1/4) - 1 = 1 -> 3 * (1 + 0.5) = 4.5; light: 16 pixels -> 3 * (1 + 1.5) = 7.5
    expected_pixels = np.ones((16, 16), np.float32)
    expected_pixels[0:8, 8:16] = 4.5
    expected_pixels[8:12, 4:8] = 7.5
    np.testing.assert_array_equal(pixels, expected_pixels)
    latent = np.array(
        [[1.0, 4.5], [(16 * 7.5 + 48) / 64, 1.0]]
    )  # the light covers a quarter of its latent pixel
    got = loss_weights.WeightMap(loss, objects, 8)(row, plan)
    assert got.shape == (1, 2, 2) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), latent / latent.mean(), rtol=1e-6)
    assert got.mean().item() == pytest.approx(1.0)
    # unmirrored, the car is in the top-left latent pixel
    plain = loss_weights.WeightMap(loss, objects, 8)(row, data.plan_crop((40, 20), (16, 16), "center", False))
    assert plain[0, 0, 0] > plain[0, 0, 1] and plain[0, 0, 0] == plain.max()


def test_small_object_weight_grows_as_the_area_shrinks_up_to_the_cap_and_overlaps_take_the_larger():
    loss = LossConfig(object_weight=2.0, small_object_boost=0.05, small_object_cap=4.0)
    crop = 1344 * 768
    car = loss_weights.object_pixel_weight(100 * 80 / crop, loss)
    light = loss_weights.object_pixel_weight(12 * 12 / crop, loss)
    assert car == pytest.approx(2.0 * (1 + 0.05 * ((crop / 8000) ** 0.5 - 1)))  # +0.52: the config's example
    assert light == 2.0 * (1 + 4.0)  # capped
    assert loss_weights.object_pixel_weight(1.0, loss) == 2.0  # an object filling the crop gets no boost
    # a small box inside a large one: the small one's (larger) weight wins where they overlap
    plan = data.CropPlan((16, 16), (16, 16), (16, 16), 0, 0, False)
    w = loss_weights.box_pixel_weights([(0, 0, 15, 15), (4, 4, 5, 5)], plan, loss)
    assert w[4, 4] == loss_weights.object_pixel_weight(4 / 256, loss) > w[0, 0] == 2.0


def test_a_box_layout_gives_the_map_of_its_boxes(tmp_path):
    """The ControlNet's source (regions of the cropped layout) and the LoRA's (the boxes) agree on the same boxes."""
    size, plan = (48, 32), data.CropPlan((48, 32), (48, 32), (32, 32), 0, 8, True)
    boxes = [("car", 10, 4, 29, 19), ("traffic sign", 34, 22, 37, 25), ("car", 6, 2, 9, 5)]
    labels = [{"category": c, "box2d": {"x1": a, "y1": b, "x2": x, "y2": y}} for c, a, b, x, y in boxes]
    layout_file = layouts.save_png(box_layout.render_box_layout(labels, size), tmp_path / "a.png", "boxes")
    row = data.Row(0, "/nonexistent/a.jpg", "", size, str(layout_file), "a.jpg")
    read = lambda r, p: data.apply_plan(Image.open(r.conditioning), p, Image.Resampling.NEAREST)  # noqa: E731
    loss = LossConfig(object_weight=3.0)
    from_layout = loss_weights.LayoutObjects(read, "boxes")(row, plan, loss)
    objects = loss_weights.BoxObjects.from_labels_file(det20(tmp_path / "d.json", {"a.jpg": boxes}), [row])
    from_boxes = objects(row, plan, loss)
    np.testing.assert_array_equal(from_layout, from_boxes)
    assert (from_boxes == 3.0).sum() == 20 * 16 + 4 * 4 + 2 * 4  # the second car is half cut by the crop


def test_segmentation_objects_are_the_thing_classes_each_region_sized_alone():
    ids = np.full((16, 16), bdd.SEG_ID["road"], np.uint8)
    ids[0:8, 0:8] = bdd.SEG_ID["car"]  # a large car
    ids[12:14, 12:14] = bdd.SEG_ID["car"]  # a small car, not touching it
    ids[0:2, 14:16] = bdd.SEG_ID["building"]  # stuff: background
    loss = LossConfig(object_weight=2.0, small_object_boost=1.0, small_object_cap=10.0)
    w = loss_weights.region_pixel_weights(ids, loss_weights.OBJECT_IDS["seg"], loss)
    assert w[0, 0] == 2.0 * (1 + 1.0 * (2 - 1))  # 64/256 of the crop
    assert w[12, 12] == 2.0 * (1 + 1.0 * (8 - 1))  # 4/256
    assert w[0, 15] == w[15, 0] == 1.0


def test_a_row_mask_scales_the_map(tmp_path):
    Image.fromarray(np.array([[255, 0], [255, 255]], np.uint8).repeat(8, 0).repeat(8, 1)).save(
        tmp_path / "m.png"
    )
    row = row_of((16, 16), mask=str(tmp_path / "m.png"))
    plan = data.CropPlan((16, 16), (16, 16), (16, 16), 0, 0, True)  # mirrored: the zero block moves left
    got = loss_weights.WeightMap(LossConfig(mask="mask"), None, 8)(row, plan)[0].numpy()
    np.testing.assert_allclose(got, [[0.0, 4 / 3], [4 / 3, 4 / 3]], rtol=1e-6)
    with pytest.raises(
        UserError, match=r"loss.mask=mask: 1 mask\(s\) unusable: .* is 16x16, its image a.jpg 32x16"
    ):
        loss_weights.check_masks([row_of((32, 16), mask=str(tmp_path / "m.png"))], "mask")


# --- the loss ----------------------------------------------------------------------------------------------------


def test_defaults_build_no_map_and_reproduce_the_plain_loss_bit_for_bit(tmp_path):
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 6, 8, generator=gen), torch.randn(3, 4, 6, 8, generator=gen)
    timesteps = torch.tensor([10, 500, 990])
    scheduler = DDPMScheduler()
    # the loss before this feature: fp32 MSE per sample, Min-SNR weights, mean
    plain = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    plain = (plain * diffusion.min_snr_weights(scheduler, timesteps, 5.0, "epsilon")).mean()
    out = trainer.Denoised(pred, pred, timesteps, pred, target)
    cfg = type("Cfg", (), {"loss": LossConfig()})()
    assert torch.equal(trainer.diffusion_term(cfg, {}, out, scheduler), plain)
    # defaults: no map is built, so dataset items carry none
    fn, note = trainer.loss_weight_map(cfg, [], lambda rows: pytest.fail("objects read with defaults"), 8)
    assert fn is None and note == "plain mean"
    rows = data.load_rows(make_image_csv(tmp_path, n=1)).rows
    ds = data.SDXLDataset(rows, data.Geometry(tuple(data.sdxl_buckets(128, 16))), loss_weight_fn=fn)
    assert "loss_weight" not in ds[(0, 0)]
    # a uniform map is the plain loss (up to rounding); a weighted one differs
    ones = torch.ones(3, 1, 6, 8)
    torch.testing.assert_close(trainer.diffusion_term(cfg, {"loss_weight": ones}, out, scheduler), plain)
    heavy = ones.clone()
    heavy[:, :, :3] = 1.5
    heavy[:, :, 3:] = 0.5
    assert not torch.allclose(trainer.diffusion_term(cfg, {"loss_weight": heavy}, out, scheduler), plain)


@pytest.fixture(scope="module")
def components(tiny_sdxl):
    from ai.common.models import load_components

    return load_components(tiny_sdxl)


def test_cached_latents_give_the_map_and_the_weighted_loss_of_the_uncached_path(components, tmp_path):
    from ai.common import caches
    from ai.common.train_config import TrainingConfig

    comps = components
    csv_path = make_image_csv(tmp_path / "imgs", n=3)
    rows = data.load_rows(csv_path).rows  # 320x180, 180x320, 256x256
    labels = det20(tmp_path / "det.json", {
        "img00.jpg": [("car", 20, 100, 119, 169), ("traffic light", 250, 20, 259, 39)],
        "img01.jpg": [("pedestrian", 10, 10, 40, 90)],
        "img02.jpg": [("bus", 0, 0, 60, 255)],
    })  # fmt: skip
    geo = data.Geometry(
        tuple(data.sdxl_buckets(128, 16)), "center", True, seed=0
    )  # flips: both latents cached
    cfg = TrainingConfig(
        data={"train_csv": str(csv_path)},
        loss={"object_weight": 3.0, "small_object_boost": 0.2, "snr_gamma": 5.0},
    )
    fn, _ = trainer.loss_weight_map(
        cfg, rows, lambda r: loss_weights.BoxObjects.from_labels_file(labels, r), 8
    )
    cache = caches.FeatureCache(tmp_path / "cache", "latents")
    vae_id = caches.module_fingerprint(comps.vae)
    hashes, _ = caches.build_latent_cache(
        rows, geo, cache, comps.vae, vae_id, store_dtype=torch.float32, progress=False
    )
    lookup = caches.LatentLookup(cache, hashes, vae_id, "float32")
    cached = data.SDXLDataset(rows, geo, latent_lookup=lookup, loss_weight_fn=fn)
    uncached = data.SDXLDataset(rows, geo, loss_weight_fn=fn)
    scheduler = trainer.noise_scheduler(comps)

    def encode_text(prompts):
        return diffusion.encode_prompts(
            [comps.text_encoder, comps.text_encoder_2], [comps.tokenizer, comps.tokenizer_2], prompts
        )

    def loss_of(item, weighted=True):
        batch = data.collate([item if weighted else {k: v for k, v in item.items() if k != "loss_weight"}])
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            out = trainer.denoise(
                cfg, batch, gen, comps.unet, scheduler, comps.vae, torch.float32, torch.float32, encode_text
            )
        return trainer.diffusion_term(cfg, batch, out, scheduler)

    flips = set()
    for epoch in range(4):
        for pos, row in enumerate(rows):
            a, b = cached[(pos, epoch)], uncached[(pos, epoch)]
            flips.add(geo.plan(row, epoch).flip)
            assert "latent_mean" in a and "pixel_values" in b
            assert torch.equal(a["loss_weight"], b["loss_weight"])
            assert a["loss_weight"].shape == (1, *a["latent_mean"].shape[1:])
            if epoch == 0:
                weighted = loss_of(a)
                torch.testing.assert_close(weighted, loss_of(b), rtol=2e-4, atol=1e-6)
                assert not torch.isclose(weighted, loss_of(a, weighted=False), rtol=1e-3)
    assert flips == {False, True}


# --- training runs and --check -------------------------------------------------------------------------------------


def lora_csv(bdd_root: Path, out: Path) -> Path:
    """image,text over the mini-BDD100K's 100K train images (their det_20 labels are det_train.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text"])
        for image in bdd.list_images(bdd_root / "images" / "100k" / "train")[:6]:
            writer.writerow([str(image), "a dashcam photo of a street"])
    return out


def test_a_short_lora_run_with_object_weights_trains_checkpoints_and_resumes_exactly(
    tiny_sdxl, mini_bdd, tmp_path
):
    from safetensors.torch import load_file
    from test_lora_train import run_inprocess, write_config

    labels = mini_bdd / "labels" / "det_20" / "det_train.json"
    runs = tmp_path / "runs"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_sdxl, lora_csv(mini_bdd, tmp_path / "lora.csv"), runs, "objw",
        data={"labels_file": str(labels), "random_flip": True},
        loss={"object_weight": 3.0, "small_object_boost": 0.1},
        train={"max_train_steps": 4}, checkpoint={"every_n_steps": 2},
    )  # fmt: skip
    assert run_inprocess(cfg) == 0
    run = runs / "objw"
    assert (run / "checkpoint-2").is_dir() and (run / "pytorch_lora_weights.safetensors").is_file()
    losses = step_losses(run)
    assert len(losses) == 4 and all(np.isfinite(losses))
    # resumed mid-epoch from step 2 (the maps follow the same crops and flips): the same LoRA
    assert run_inprocess(cfg, "output.name=resumed", f"checkpoint.resume_from={run / 'checkpoint-2'}") == 0
    full = load_file(run / "pytorch_lora_weights.safetensors")
    resumed = load_file(runs / "resumed" / "pytorch_lora_weights.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    with pytest.raises(UserError, match=r"loss\.object_weight \(3\.0 -> 2\.0\)"):
        run_inprocess(cfg, "checkpoint.resume_from=latest", "loss.object_weight=2", "--check")
    # the same run unweighted (same data, noise and timesteps) has another first-step loss: the map reached it
    assert run_inprocess(cfg, "loss.object_weight=1", "loss.small_object_boost=0", "output.name=plain") == 0
    assert step_losses(runs / "plain")[0] != pytest.approx(losses[0], rel=1e-3)


def step_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_short_box_layout_controlnet_run_with_object_weights_trains_and_checkpoints(
    tiny_sdxl, box_csv, tmp_path
):
    from test_controlnet_train import run_inprocess, write_config

    cfg = write_config(
        tmp_path / "c.yaml", tiny_sdxl, box_csv, tmp_path / "runs", "objw",
        controlnet={"layout": "boxes", "conditioning": "one_hot", "save_dtype": "float32"},
        loss={"object_weight": 3.0, "small_object_boost": 0.1}, train={"max_train_steps": 2},
        data={"num_workers": 2},  # the map is built in the data workers
        checkpoint={"every_n_steps": 2},
    )  # fmt: skip
    assert run_inprocess(cfg) == 0
    run = tmp_path / "runs" / "objw"
    assert (run / "checkpoint-2" / "controlnet").is_dir() and (run / "controlnet").is_dir()
    losses = step_losses(run)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert run_inprocess(cfg, "loss.object_weight=1", "loss.small_object_boost=0", "output.name=plain") == 0
    assert step_losses(tmp_path / "runs" / "plain")[0] != pytest.approx(losses[0], rel=1e-3)


def test_check_refuses_object_weights_without_labels_and_a_missing_mask_column(tiny_sdxl, box_csv, tmp_path):
    from test_lora_train import run_inprocess, write_config

    csv_path = make_image_csv(tmp_path / "imgs", n=2)
    cfg = write_config(tmp_path / "c.yaml", tiny_sdxl, csv_path, tmp_path / "runs", "bad")
    with pytest.raises(UserError, match="loss.object_weight=3 .* set data.labels_file to the det_20"):
        run_inprocess(cfg, "--check", "loss.object_weight=3")
    with pytest.raises(UserError, match="data.labels_file: not found: /nonexistent.json"):
        run_inprocess(cfg, "--check", "loss.object_weight=3", "data.labels_file=/nonexistent.json")
    with pytest.raises(
        UserError, match=r"loss.mask=weights: .* has no such column \(its header: image, text\)"
    ):
        run_inprocess(cfg, "--check", "loss.mask=weights")
    assert run_inprocess(cfg, "--check", f"data.labels_file={det20(tmp_path / 'd.json', {})}") == 0
    cn = test_controlnet_train.write_config(
        tmp_path / "cn.yaml",
        tiny_sdxl,
        box_csv,
        tmp_path / "runs",
        "cn",
        controlnet={"layout": "boxes"},
    )
    assert "loss.mask=m: " in test_controlnet_train.check_config(cn, "loss.mask=m")
    assert test_controlnet_train.check_config(cn, "loss.object_weight=3") == ""  # its objects are its layouts


def test_labels_that_match_no_training_image_are_refused(tmp_path):
    labels = det20(tmp_path / "d.json", {"other.jpg": [("car", 0, 0, 5, 5)]})
    with pytest.raises(UserError, match="none of the 1 training images has a frame in it"):
        loss_weights.BoxObjects.from_labels_file(labels, [row_of((16, 16))])
