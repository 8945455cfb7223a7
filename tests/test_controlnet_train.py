"""ControlNet training on the tiny SDXL and mini-BDD100K masks: conditioning geometry, zero-init, launcher run,
exact resume, the control-fidelity learning check, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sdxl_fixtures import run_launcher, watch_text_encoder_release

from vocab import bdd

REPO = Path(__file__).resolve().parents[1]


def write_controlnet_csv(
    bdd_root: Path, split: str, out: Path, caption: str = "a dashcam photo of a street"
) -> Path:
    """image,conditioning_image,text over the mini-BDD 10K images that have masks (absolute paths)."""
    images = {p.stem: p for p in bdd.list_images(bdd_root / "images" / "10k" / split)}
    masks = sorted((bdd_root / "labels" / "sem_seg" / "masks" / split).glob("*.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "conditioning_image", "text"])
        for mask in masks:
            writer.writerow([str(images[mask.stem]), str(mask), caption])
    return out


def write_config(path: Path, model: Path, train_csv: Path, runs: Path, name: str, **sections) -> Path:
    cfg = {
        "model": {"pretrained_model": str(model)},
        "data": {"train_csv": str(train_csv), "resolution": 64, "bucket_step": 16, "num_workers": 0},
        "cache": {"dir": str(runs / "cache"), "dtype": "float32"},
        "optim": {"learning_rate": 2e-3, "lr_warmup_steps": 0},
        "train": {"batch_size": 2, "max_train_steps": 4, "mixed_precision": "no"},
        "checkpoint": {"every_n_steps": 2, "total_limit": 3, "resume_from": None},
        "validation": {"every_n_steps": 0},
        "log": {"report_to": "none", "every_n_steps": 1},
        "controlnet": {"save_dtype": "float32"},
        "output": {"runs_dir": str(runs), "name": name},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_inprocess(config: Path, *overrides: str) -> int:
    from ai.controlnet.train_controlnet_sdxl import main

    return main(["--config", str(config), *overrides])


def check_config(config: Path, *overrides: str) -> str:
    from core.cli import UserError

    try:
        run_inprocess(config, "--check", *overrides)
    except UserError as exc:
        return str(exc)
    return ""


def launch(config: Path, accelerate_config: str, **env) -> subprocess.CompletedProcess:
    """ai/controlnet/run_controlnet_train.sh with ``accelerate_config`` (and extra environment, e.g. ACCELERATE_ARGS)."""
    return run_launcher(
        "ai/controlnet/run_controlnet_train.sh", config, accelerate_config=accelerate_config, **env
    )


@pytest.fixture(scope="module")
def controlnet_csvs(mini_bdd, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("controlnet_csv")
    return write_controlnet_csv(mini_bdd, "train", out / "train.csv"), write_controlnet_csv(
        mini_bdd, "val", out / "val.csv"
    )


# --- conditioning geometry -----------------------------------------------------------------------------------


def test_conditioning_keeps_valid_ids_and_stays_aligned_with_its_image(mini_bdd, tmp_path):
    """Random crop + flip + bucket resize: the condition holds only the mask's ids and lines up with the image."""
    from ai.common import data
    from ai.controlnet import conditioning, control

    mask_path = sorted((mini_bdd / "labels" / "sem_seg" / "masks" / "train").glob("*.png"))[0]
    ids = np.asarray(Image.open(mask_path))
    # an "image" that is the mask's palette rendering: aligned pixels must show the same colour as the condition
    image_path = tmp_path / "rendering.png"
    Image.fromarray(bdd.ids_to_palette_rgb(ids)).save(image_path)
    row = data.Row(0, str(image_path), "x", (ids.shape[1], ids.shape[0]), str(mask_path), image_path.name)
    geometry = data.Geometry(((96, 64), (64, 96), (80, 80)), "random", True, seed=3)
    dataset = data.SDXLDataset([row], geometry, conditioning_fn=control.RowCondition("palette"))
    cond_ids = control.RowCondition("palette")
    flips = set()
    for epoch in range(6):
        plan = geometry.plan(row, epoch)
        flips.add(plan.flip)
        got = np.asarray(cond_ids.ids(row, plan))
        assert got.shape == (64, 96)
        assert set(np.unique(got)) <= set(np.unique(ids)), "nearest-neighbour must not invent class ids"
        item = dataset[(0, epoch)]
        cond = item["conditioning"].numpy()
        pixels = (item["pixel_values"].numpy() + 1) / 2
        assert cond.shape == pixels.shape == (3, 64, 96)
        agree = (np.abs(cond - pixels).max(axis=0) < 0.1).mean()
        assert agree > 0.85, f"epoch {epoch}: condition and image disagree on {1 - agree:.0%} of pixels"
        np.testing.assert_array_equal(cond, conditioning.ids_to_tensor(got, "palette").numpy())
    assert flips == {True, False}  # both branches seen


def test_fresh_controlnet_leaves_the_base_model_unchanged(tiny_sdxl):
    import torch

    from ai.common import diffusion
    from ai.common.models import load_components
    from ai.controlnet import control

    comps = load_components(tiny_sdxl)
    cn = control.build_controlnet(comps.unet, "one_hot")
    assert cn.config.conditioning_channels == bdd.NUM_SEG_CLASSES
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 12, generator=gen)
    emb = torch.randn(2, 77, comps.unet.config.cross_attention_dim, generator=gen)
    pooled = torch.randn(2, comps.text_encoder_2.config.projection_dim, generator=gen)
    tids = diffusion.time_ids([(96, 64, 0, 0, 96, 64)] * 2)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        base = diffusion.unet_forward(comps.unet, noisy, t, emb, pooled, tids)
        cond = torch.rand(1, bdd.NUM_SEG_CLASSES, 64, 96, generator=gen)
        steered = diffusion.unet_forward(
            control.ControlledUNet(comps.unet, cn).set_condition(cond), noisy, t, emb, pooled, tids
        )
    assert torch.equal(base, steered)


# --- training runs -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_launcher_trains_validates_and_exports_a_diffusers_controlnet(tiny_sdxl, controlnet_csvs, tmp_path):
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    train_csv, val_csv = controlnet_csvs
    cfg = write_config(
        tmp_path / "train.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "e2e",
        validation={"every_n_steps": 4, "loss_csv": str(val_csv), "num_images": 2, "seeds": [5],
                    "num_inference_steps": 2},
        log={"report_to": "tensorboard", "every_n_steps": 1},
    )  # fmt: skip
    proc = launch(cfg, "config/accelerate_config_cpu.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config OK" in proc.stdout and "conditioning" in proc.stderr
    run = tmp_path / "runs" / "e2e"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (run / "checkpoint-4" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(run.glob(".tmp*"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gaps = [m for m in metrics if "control_gap" in m]
    assert [m["step"] for m in gaps] == [0, 4]
    assert gaps[0]["control_gap"] == 0.0  # zero convolutions: the blank and the real mask give the same loss
    sheets = sorted((run / "validation" / "step-000004").glob("*.png"))
    assert len(sheets) == 2  # two held-out masks x one seed
    with Image.open(sheets[0]) as im:
        assert im.size == (
            2 * 80,
            48,
        )  # mask | generated, in the 16:9-like bucket (80x48 at base 64 px) of 320x180
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # the final folder loads with diffusers' own classes and steers the pipeline
    cn = ControlNetModel.from_pretrained(run / "controlnet")
    assert cn.config.conditioning_channels == 3
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl, controlnet=cn, local_files_only=True
    )
    cond = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    out = pipe("a street", image=cond, width=96, height=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert out.shape == (64, 96, 3) and np.isfinite(out).all()


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_same_controlnet(tiny_sdxl, controlnet_csvs, tmp_path):
    from safetensors.torch import load_file

    train_csv, _ = controlnet_csvs
    weights = "controlnet/diffusion_pytorch_model.safetensors"
    # 8 rows in one bucket, batch 2: 4 batches per epoch, so step 6 is mid-epoch
    full = write_config(tmp_path / "full.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "full",
                        train={"max_train_steps": 6}, checkpoint={"every_n_steps": 3})  # fmt: skip
    assert run_inprocess(full) == 0
    part = write_config(tmp_path / "part.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "part",
                        train={"max_train_steps": 3}, checkpoint={"every_n_steps": 3})  # fmt: skip
    assert run_inprocess(part) == 0
    assert run_inprocess(part, "train.max_train_steps=6", "checkpoint.resume_from=latest") == 0
    state = json.loads((tmp_path / "runs/part/checkpoint-6/train_state.json").read_text())
    assert state["step"] == 6 and state["epoch"] == 1 and state["batch"] == 2
    a = load_file(tmp_path / "runs/full" / weights)
    b = load_file(tmp_path / "runs/part" / weights)
    assert a.keys() == b.keys()
    changed = load_file(tmp_path / "runs/part/checkpoint-3" / weights)
    assert any(not np.array_equal(a[k].numpy(), changed[k].numpy()) for k in a)  # training moved the weights
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


@pytest.fixture(scope="module")
def larger_mini_bdd(tmp_path_factory) -> Path:
    """A mini-BDD100K big enough that layouts generalise (53 train and 18 val masks at 160x90), in ~2 s."""
    from mini_bdd.make import make_mini_bdd

    root = tmp_path_factory.mktemp("larger_mini_bdd") / "bdd100k"
    make_mini_bdd(root, frames=80, size=(160, 90), seed=1)
    return root


@pytest.mark.slow
def test_controlnet_learns_to_follow_the_mask(tiny_sdxl, larger_mini_bdd, tmp_path):
    """The loss gap between a blank and the real mask on held-out masks starts at 0 and becomes clearly positive.

    v-prediction at high noise makes the target mostly the clean latent, which is what a layout explains; with
    few masks the ControlNet memorises instead (the held-out gap turns negative), hence the larger data set.
    """
    train_csv = write_controlnet_csv(larger_mini_bdd, "train", tmp_path / "train.csv")
    val_csv = write_controlnet_csv(larger_mini_bdd, "val", tmp_path / "val.csv")
    cfg = write_config(
        tmp_path / "learn.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "learn",
        data={"caption_dropout": 1.0},
        loss={"timestep_min": 500, "snr_gamma": None, "prediction_type": "v_prediction"},
        optim={"learning_rate": 1e-3},
        train={"max_train_steps": 150},
        checkpoint={"every_n_steps": 150},
        validation={"every_n_steps": 75, "loss_csv": str(val_csv), "num_images": 0},
    )  # fmt: skip
    assert run_inprocess(cfg) == 0
    metrics = [json.loads(line) for line in (tmp_path / "runs/learn/metrics.jsonl").read_text().splitlines()]
    gaps = [m for m in metrics if "control_gap" in m]
    assert [m["step"] for m in gaps] == [0, 75, 150]
    assert gaps[0]["control_gap"] == 0.0  # zero convolutions: the mask changes nothing yet
    end = gaps[-1]
    assert end["control_gap"] > 0.03 * end["val_loss"], (
        gaps
    )  # the real mask explains > 3 % of the held-out loss
    assert end["val_loss"] < 0.6 * gaps[0]["val_loss"], gaps


# --- bad input -----------------------------------------------------------------------------------------------


def test_mask_of_another_size_names_both_files(tiny_sdxl, mini_bdd, tmp_path):
    from ai.common import data
    from ai.controlnet import control
    from core.cli import UserError

    mask = tmp_path / "small.png"
    Image.new("L", (32, 18)).save(mask)
    row = data.Row(0, "/data/frame.jpg", "x", (320, 180), str(mask), "frame.jpg")
    with pytest.raises(UserError, match=r"small\.png is 32x18 but its image frame\.jpg is 320x180"):
        control.check_mask_sizes([row])


def test_mask_with_ids_outside_the_label_set_is_refused(tmp_path):
    from ai.common import data
    from ai.controlnet import control
    from core.cli import UserError

    mask = tmp_path / "bad.png"
    Image.fromarray(np.full((18, 32), 40, dtype=np.uint8)).save(mask)
    row = data.Row(0, "/data/frame.jpg", "x", (32, 18), str(mask), "frame.jpg")
    plan = data.plan_crop((32, 18), (32, 16), "center", False)
    with pytest.raises(UserError, match=r"bad\.png.*40"):
        control.RowCondition("palette")(row, plan)


def test_controlnet_of_another_architecture_is_refused_before_loading(tiny_sdxl, controlnet_csvs, tmp_path):
    train_csv, _ = controlnet_csvs
    folder = tmp_path / "other_cn"
    folder.mkdir()
    unet_cfg = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    other = dict(
        unet_cfg, _class_name="ControlNetModel", cross_attention_dim=unet_cfg["cross_attention_dim"] * 2
    )
    (folder / "config.json").write_text(json.dumps(other))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")  # the check comes first
    cfg = write_config(tmp_path / "c.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "x")
    message = check_config(cfg, f"controlnet.init_from={folder}")
    assert "does not fit the base model" in message and "cross_attention_dim" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("validation.every_n_steps=10",), "validation needs held-out masks"),
        (("controlnet.conditioning=rgb",), "controlnet.conditioning"),
        (("controlnet.fuse_lora=/nowhere/lora.safetensors",), "controlnet.fuse_lora: LoRA weights not found"),
        (("data.crop=random",), "cache.latents=false"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(tiny_sdxl, controlnet_csvs, tmp_path, overrides, message):
    from core.cli import UserError

    train_csv, _ = controlnet_csvs
    cfg = write_config(tmp_path / "c.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "x")
    try:
        got = check_config(cfg, *overrides)
    except (UserError, SystemExit) as exc:  # load_config reports schema errors as UserError too
        got = str(exc)
    assert message in got, got


def test_a_fused_style_lora_is_in_the_frozen_unet_and_the_controlnet_copy(tiny_sdxl, tmp_path):
    """controlnet.fuse_lora: UNet weights become W + scale * (alpha / r) * B @ A, and a fresh ControlNet copies them."""
    import torch
    from peft import LoraConfig

    from ai.common import lora_export
    from ai.common.models import load_components
    from ai.controlnet import control

    trained = load_components(tiny_sdxl)
    trained.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["conv_in"], init_lora_weights="gaussian")
    )
    with torch.no_grad():  # a "trained" LoRA: B is no longer zero
        trained.unet.conv_in.lora_B["default"].weight.normal_(0, 0.1)
    lora_file = lora_export.save_lora(tmp_path, trained.unet, None, None, kohya=False)[0]
    a = trained.unet.conv_in.lora_A["default"].weight
    b = trained.unet.conv_in.lora_B["default"].weight
    delta = 0.5 * (8 / 4) * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)

    comps = load_components(tiny_sdxl)
    base = comps.unet.conv_in.weight.detach().clone()
    control.fuse_lora(comps, str(lora_file), scale=0.5)
    torch.testing.assert_close(comps.unet.conv_in.weight, base + delta)
    assert not any("lora" in name for name, _ in comps.unet.named_parameters())  # fused, adapters removed
    controlnet = control.build_controlnet(comps.unet, "palette")
    assert torch.equal(controlnet.conv_in.weight, comps.unet.conv_in.weight)


@pytest.mark.slow
def test_two_data_parallel_processes_on_cpu(tiny_sdxl, controlnet_csvs, tmp_path):
    from diffusers import ControlNetModel

    train_csv, val_csv = controlnet_csvs
    cfg = write_config(
        tmp_path / "ddp.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "ddp",
        train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_csv": str(val_csv), "num_images": 1, "num_inference_steps": 1},
    )  # fmt: skip
    proc = launch(cfg, "config/accelerate_config_cpu_2proc.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2 processes" in proc.stderr
    run = tmp_path / "runs" / "ddp"
    state = json.loads((run / "checkpoint-2" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    assert (run / "checkpoint-2" / "random_states_1.pkl").is_file()
    gaps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in gaps if "control_gap" in m] == [
        0,
        2,
    ]  # validation once per step, main process only
    assert ControlNetModel.from_pretrained(run / "controlnet").config.conditioning_channels == 3


@pytest.mark.slow
def test_bf16_mixed_precision_trains_validates_and_saves(tiny_sdxl, controlnet_csvs, tmp_path):
    """bf16 frozen base + fp32 ControlNet under autocast (CPU autocast here): the loop, the fidelity check and the
    validation pipeline (which must not get accelerate's fp32-output wrapper) all run, and the save is fp16."""
    from diffusers import ControlNetModel

    train_csv, val_csv = controlnet_csvs
    cfg = write_config(
        tmp_path / "bf16.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "bf16",
        train={"max_train_steps": 2, "mixed_precision": "bf16"}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_csv": str(val_csv), "num_images": 1, "num_inference_steps": 1},
        controlnet={"save_dtype": "float16"},
    )  # fmt: skip
    # a fresh process: accelerate's state is a per-process singleton, fixed by the first in-process run
    proc = subprocess.run(
        [sys.executable, "-m", "ai.controlnet.train_controlnet_sdxl", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "bf16"
    assert len(list((run / "validation" / "step-000002").glob("*.png"))) == 1
    from safetensors.torch import load_file

    saved = load_file(run / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert {str(v.dtype) for v in saved.values()} == {"torch.float16"}
    assert ControlNetModel.from_pretrained(run / "controlnet").config.conditioning_channels == 3


@pytest.mark.slow
def test_deepspeed_bf16_checkpoints_and_exports_the_fp32_master_weights(tiny_sdxl, controlnet_csvs, tmp_path):
    """The shipped DeepSpeed config in bf16 (one process on CPU): DeepSpeed trains a bf16 copy of the ControlNet and
    keeps fp32 masters; validation runs, and the checkpoint's and the final controlnet/ hold the fp32 masters."""
    import torch
    from safetensors.torch import load_file

    train_csv, val_csv = controlnet_csvs
    cfg = write_config(
        tmp_path / "ds.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "ds",
        train={"max_train_steps": 2, "mixed_precision": "bf16"}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_csv": str(val_csv), "num_images": 1, "num_inference_steps": 1},
    )  # fmt: skip
    proc = launch(cfg, "config/accelerate_config_deepspeed.yaml", ACCELERATE_ARGS="--num_processes 1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ds"
    assert len(list((run / "validation" / "step-000002").glob("*.png"))) == 1
    for folder in (run / "checkpoint-2" / "controlnet", run / "controlnet"):
        saved = load_file(folder / "diffusion_pytorch_model.safetensors").values()
        assert {v.dtype for v in saved} == {torch.float32}
        assert any((v.to(torch.bfloat16).float() != v).any() for v in saved), (
            folder
        )  # masters, not the bf16 copy


@pytest.mark.slow
def test_latent_and_text_caches_are_shared_with_the_lora_trainer(tiny_sdxl, controlnet_csvs, tmp_path):
    """A LoRA run on the same images and captions fills the cache; the ControlNet run then adds no entry."""
    import csv as csv_module

    from ai.lora.train_lora_sdxl import main as lora_main

    train_csv, _ = controlnet_csvs
    with train_csv.open(newline="", encoding="utf-8") as fh:
        rows = list(csv_module.DictReader(fh))
    lora_csv = tmp_path / "lora.csv"
    with lora_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv_module.writer(fh)
        writer.writerow(["image", "text"])
        writer.writerows([r["image"], r["text"]] for r in rows)
    cache = tmp_path / "runs" / "cache"
    lora_cfg = write_config(tmp_path / "lora.yaml", tiny_sdxl, lora_csv, tmp_path / "runs", "lora",
                            train={"max_train_steps": 1}, checkpoint={"every_n_steps": 1})  # fmt: skip
    text = yaml.safe_load(lora_cfg.read_text())
    del text["controlnet"]
    text["lora"] = {"rank": 2, "alpha": 2}
    lora_cfg.write_text(yaml.safe_dump(text))
    assert lora_main(["--config", str(lora_cfg)]) == 0
    before = {p.name for p in cache.rglob("*.safetensors")}
    assert len(list((cache / "latents").rglob("*.safetensors"))) == len(rows)  # one latent per image
    cn_cfg = write_config(tmp_path / "cn.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "cn",
                          train={"max_train_steps": 1}, checkpoint={"every_n_steps": 1})  # fmt: skip
    assert run_inprocess(cn_cfg) == 0
    assert {p.name for p in cache.rglob("*.safetensors")} == before


_BF16_VALIDATION_DRIVER = """
import functools, json, sys
import torch, diffusers
from ai.controlnet.train_controlnet_sdxl import main

built, vae_autocast, residuals = [], [], []
init = diffusers.ControlNetModel.__init__
@functools.wraps(init)  # from_config reads the signature
def counting_init(self, *args, **kwargs):
    built.append(type(self).__name__)
    init(self, *args, **kwargs)
diffusers.ControlNetModel.__init__ = counting_init
for name in ("encode", "decode"):
    def watched(self, *args, _original=getattr(diffusers.AutoencoderKL, name), **kwargs):
        vae_autocast.append(torch.is_autocast_enabled("cpu"))
        return _original(self, *args, **kwargs)
    setattr(diffusers.AutoencoderKL, name, watched)
forward = diffusers.UNet2DConditionModel.forward
def recording(self, *args, **kwargs):
    residuals.extend(str(r.dtype) for r in kwargs.get("down_block_additional_residuals") or ())
    return forward(self, *args, **kwargs)
diffusers.UNet2DConditionModel.forward = recording
rc = main(["--config", sys.argv[1]])
print(json.dumps({"rc": rc, "built": built, "vae_autocast": vae_autocast, "residuals": sorted(set(residuals))}))
"""


@pytest.mark.slow
def test_bf16_validation_reuses_the_trained_controlnet_and_runs_the_vae_in_fp32(
    tiny_sdxl,
    controlnet_csvs,
    tmp_path,
):
    """bf16 with validation at steps 0 and 2: one ControlNet is ever constructed (the trained one; validation used to
    build a fresh copy every time, 1.25B parameters at SDXL size), the UNet gets the ControlNet's residuals in bf16
    in training and in the validation pipeline, and the VAE never runs under autocast (on CUDA fp16 autocast the
    stock SDXL VAE overflows: black images, NaN losses)."""
    train_csv, val_csv = controlnet_csvs
    cfg = write_config(
        tmp_path / "bf16.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "bf16",
        train={"max_train_steps": 2, "mixed_precision": "bf16"}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_csv": str(val_csv), "num_images": 1, "num_inference_steps": 1},
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _BF16_VALIDATION_DRIVER, str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["rc"] == 0
    assert seen["built"] == ["ControlNetModel"]
    assert seen["vae_autocast"] and not any(seen["vae_autocast"]), seen["vae_autocast"]
    assert seen["residuals"] == ["torch.bfloat16"]
    run = tmp_path / "runs" / "bf16"
    for step in ("step-000000", "step-000002"):
        sheets = list((run / "validation" / step).glob("*.png"))
        assert len(sheets) == 1
        with Image.open(sheets[0]) as im:
            generated = np.asarray(im.convert("RGB"))[:, im.width // 2 :]
        assert generated.std() > 0  # not a constant image


# --- box layouts ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def box_csv(mini_bdd, tmp_path_factory) -> Path:
    """Stage 1's box-layout CSV over the mini-BDD100K's 100K train images (one layout per labeled frame)."""
    from convert import controlnet_bdd_to_huggingface_csv
    from core.cli import run_main

    root = tmp_path_factory.mktemp("box_csv")
    images = mini_bdd / "images" / "100k" / "train"
    (root / "captions").mkdir()
    for image in bdd.list_images(images):
        (root / "captions" / f"{image.stem}.txt").write_text(
            "a dashcam photo of a street\n", encoding="utf-8"
        )
    argv = [
        "--layout", "boxes", "--images_path", str(images), "--captions_path", str(root / "captions"),
        "--labels_file", str(mini_bdd / "labels/det_20/det_train.json"), "--output_folder", str(root / "csv"),
        "--split", "train",
    ]  # fmt: skip
    assert run_main(controlnet_bdd_to_huggingface_csv.main, argv) == 0
    return root / "csv" / "bdd_hf_dataset_controlnet_boxes_train.csv"


def test_a_box_layout_controlnet_trains_and_its_folders_record_the_layout(tiny_sdxl, box_csv, tmp_path):
    from diffusers import ControlNetModel

    from ai.controlnet import architecture

    cfg = write_config(
        tmp_path / "boxes.yaml", tiny_sdxl, box_csv, tmp_path / "runs", "boxes",
        controlnet={"layout": "boxes", "conditioning": "one_hot", "save_dtype": "float32"},
        train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_rows": 2, "num_images": 2, "num_inference_steps": 1},
    )  # fmt: skip
    assert run_inprocess(cfg) == 0
    run = tmp_path / "runs" / "boxes"
    for folder in (run / "controlnet", run / "checkpoint-2" / "controlnet"):
        config = json.loads((folder / "config.json").read_text())
        assert config["conditioning_channels"] == 11
        record = config[architecture.CONDITIONING_KEY]
        assert record["layout"] == "boxes" and record["encoding"] == "one_hot" and record["channels"] == 11
        assert record["classes"] == list(bdd.DET_CLASSES)
        assert architecture.recorded_layout(config, str(folder)) == "boxes"
    # diffusers loads the folder (the private key is not an init argument) and keeps the record on a re-save
    loaded = ControlNetModel.from_pretrained(run / "controlnet")
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved[architecture.CONDITIONING_KEY]["layout"] == "boxes"
    # the validation sheet shows the held-out layout in the box palette (mask colours would differ)
    from ai.common import data
    from ai.controlnet import conditioning

    sheets = sorted((run / "validation" / "step-000002").glob("*.png"))
    assert len(sheets) == 2
    bucket, drawn = (80, 48), 0  # 320x180 at base 64 px
    for sheet in sheets:
        layout = box_csv.parent / "box_layouts" / "train" / f"{sheet.stem.rsplit('_seed', 1)[0]}.png"
        ids = conditioning.read_ids(layout, layout="boxes")
        plan = data.plan_crop(ids.size, bucket, "center", False)
        held = np.asarray(data.apply_plan(ids, plan, Image.Resampling.NEAREST))
        with Image.open(sheet) as im:
            assert im.size == (2 * bucket[0], bucket[1])
            left = np.asarray(im.convert("RGB"))[:, : bucket[0]]
        assert np.array_equal(left, np.asarray(conditioning.ids_to_preview(held, "boxes")))
        drawn += len(np.unique(held)) >= 3
    assert drawn  # at least one held-out frame with boxes, not only empty ones


def test_a_mask_controlnet_records_seg(tiny_sdxl):
    from ai.common.models import load_components
    from ai.controlnet import architecture, control

    comps = load_components(tiny_sdxl)
    cn = control.build_controlnet(comps.unet, "palette")
    assert cn.config[architecture.CONDITIONING_KEY] == {"layout": "seg", "encoding": "palette", "channels": 3}


def test_init_from_must_match_the_layout(tiny_sdxl, tmp_path):
    """A ControlNet trained on the other layout would read the ids as other classes: refused when building."""
    from ai.common.models import load_components
    from ai.controlnet import architecture, control
    from core.cli import UserError

    comps = load_components(tiny_sdxl)
    control.build_controlnet(comps.unet, "one_hot", layout="boxes").save_pretrained(tmp_path / "boxes")
    again = control.build_controlnet(comps.unet, "one_hot", str(tmp_path / "boxes"), layout="boxes")
    assert again.config[architecture.CONDITIONING_KEY]["layout"] == "boxes"
    with pytest.raises(UserError, match="set controlnet.conditioning=one_hot"):
        control.build_controlnet(comps.unet, "palette", str(tmp_path / "boxes"), layout="boxes")
    with pytest.raises(UserError) as err:
        control.build_controlnet(comps.unet, "one_hot", str(tmp_path / "boxes"), layout="seg")
    assert str(err.value).startswith(
        f"controlnet.init_from {tmp_path / 'boxes'} was trained on box layouts (its config.json says "
        "_bdd_conditioning.layout=boxes), but controlnet.layout=seg trains on segmentation masks"
    )
    old = tmp_path / "old"  # a mask ControlNet from before the record: 3 channels, nothing recorded
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(comps.unet, conditioning_channels=3).save_pretrained(old)
    assert architecture.CONDITIONING_KEY not in json.loads((old / "config.json").read_text())
    with pytest.raises(
        UserError, match="was trained on segmentation masks \\(no layout recorded in its config.json"
    ):
        control.build_controlnet(comps.unet, "palette", str(old), layout="boxes")
    assert (
        control.build_controlnet(comps.unet, "palette", str(old)).config[architecture.CONDITIONING_KEY][
            "layout"
        ]
        == "seg"
    )


def fake_controlnet(tiny_sdxl: Path, folder: Path, record: dict | None) -> Path:
    """A ControlNet folder whose config fits the tiny UNet (weights never read: the checks come first)."""
    unet_cfg = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    config = dict(unet_cfg, _class_name="ControlNetModel", conditioning_channels=3)
    if record is not None:
        config["_bdd_conditioning"] = record
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")
    return folder


def test_layout_mismatches_are_refused_before_training(tiny_sdxl, box_csv, controlnet_csvs, tmp_path):
    seg_csv, _ = controlnet_csvs
    masks_cfg = write_config(tmp_path / "m.yaml", tiny_sdxl, seg_csv, tmp_path / "runs", "m")
    boxes_cfg = write_config(tmp_path / "b.yaml", tiny_sdxl, box_csv, tmp_path / "runs", "b")
    assert check_config(masks_cfg) == "" and check_config(boxes_cfg, "controlnet.layout=boxes") == ""
    message = check_config(masks_cfg, "controlnet.layout=boxes")
    assert (
        "conditioning image(s) are segmentation masks (by their PNG marker), but controlnet.layout=boxes"
        in message
    )
    assert "--layout boxes writes bdd_hf_dataset_controlnet_boxes_<split>.csv" in message
    message = check_config(boxes_cfg)
    assert "conditioning image(s) are box layouts (by their PNG marker), but controlnet.layout=seg" in message
    assert "set controlnet.layout=boxes" in message

    boxes_cn = fake_controlnet(tiny_sdxl, tmp_path / "boxes_cn", {"layout": "boxes", "encoding": "palette"})
    message = check_config(masks_cfg, f"controlnet.init_from={boxes_cn}")
    assert message.startswith(f"controlnet.init_from {boxes_cn} was trained on box layouts") and (
        "set controlnet.layout=boxes" in message
    )
    old_cn = fake_controlnet(tiny_sdxl, tmp_path / "old_cn", None)
    message = check_config(boxes_cfg, "controlnet.layout=boxes", f"controlnet.init_from={old_cn}")
    assert f"{old_cn} was trained on segmentation masks (no layout recorded in its config.json" in message
    assert check_config(boxes_cfg, "controlnet.layout=boxes", f"controlnet.init_from={boxes_cn}") == ""
    bad_cn = fake_controlnet(tiny_sdxl, tmp_path / "bad_cn", {"layout": "bbox"})
    assert "its layout must be one of seg, boxes" in check_config(masks_cfg, f"controlnet.init_from={bad_cn}")


def test_every_row_is_checked_for_its_layout(box_csv, mini_bdd):
    """Training reads every row's header: a mask among box layouts (past the launcher's first rows) is refused."""
    from ai.common import data
    from ai.controlnet import control
    from core.cli import UserError

    rows = data.load_rows(box_csv, conditioning_column="conditioning_image").rows
    control.check_mask_sizes(rows, layout="boxes")
    mask = sorted((mini_bdd / "labels/sem_seg/masks/train").glob("*.png"))[0]
    size = Image.open(mask).size
    mixed = [*rows, data.Row(len(rows), "/x/frame.jpg", "x", size, str(mask), "frame.jpg")]
    with pytest.raises(UserError, match=rf"1 of {len(mixed)} conditioning image\(s\) are segmentation masks"):
        control.check_mask_sizes(mixed, layout="boxes")
    with pytest.raises(
        UserError, match=rf"{len(rows)} of {len(mixed)} conditioning image\(s\) are box layouts"
    ):
        control.check_mask_sizes(mixed, layout="seg")
    # and a row read in a data worker refuses the other layout too
    plan = data.plan_crop(
        rows[0].size, (rows[0].size[0] // 16 * 16, rows[0].size[1] // 16 * 16), "center", True
    )
    tensor = control.RowCondition("one_hot", "boxes")(rows[0], plan)
    assert tensor.shape[0] == 11
    with pytest.raises(UserError, match="is a box layout"):
        control.RowCondition("one_hot")(rows[0], plan)


def test_text_encoders_are_released_before_the_loop(tiny_sdxl, controlnet_csvs, tmp_path, monkeypatch):
    """With the text cache full nothing references the frozen text encoders once validation's captions are encoded:
    their memory goes back before the first step (1.6 GB per process at SDXL size)."""

    alive_at_loop = watch_text_encoder_release(monkeypatch)
    train_csv, val_csv = controlnet_csvs
    cfg = write_config(tmp_path / "c.yaml", tiny_sdxl, train_csv, tmp_path / "runs", "te", train={"max_train_steps": 2},
                       validation={"every_n_steps": 2, "loss_csv": str(val_csv), "num_images": 1, "seeds": [0],
                                   "num_inference_steps": 2})  # fmt: skip
    assert run_inprocess(cfg) == 0
    assert alive_at_loop == [False, False]
    metrics = [json.loads(line) for line in (tmp_path / "runs/te/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "control_gap" in m] == [0, 2]  # validation ran without them
