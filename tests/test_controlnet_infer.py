"""ai/controlnet/infer_controlnet_sdxl.py on the tiny SDXL (CPU): outputs, resume, seeds, ControlNet effect, errors.

ControlNets are made with ``ControlNetModel.from_unet`` on the tiny UNet (3 and 19 conditioning channels; a fresh
one has zero output convolutions) and one with random output convolutions, so the mask visibly steers the image.
Masks are the mini BDD100K's validation masks (320x180); most runs are 64x64 with 2 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sdxl_fixtures import (
    pixels,
    records,
    run_launcher,
    save_random_lora,
    steer_outputs,
    watch_controlnet_conditions,
)

from ai.common.pipelines import model_fingerprint
from ai.controlnet import conditioning as cond
from ai.controlnet import infer_controlnet_sdxl
from ai.controlnet.infer_controlnet_sdxl import ControlNetInferConfig
from core.cli import run_main
from core.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "config" / "demo" / "controlnet_infer.yaml"
USER_CONFIG = REPO / "config" / "controlnet_infer.yaml"
CAPTIONS = ("a city street at night, wet road", "a highway on a clear day")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def controlnets(model, tmp_path_factory) -> dict[str, Path]:
    """Fresh palette / one-hot ControlNets, a 'steering' one (random output convs) and one for another UNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
    out = {}
    for name, channels in (("palette", 3), ("one_hot", 19)):
        ControlNetModel.from_unet(unet, conditioning_channels=channels).save_pretrained(root / name)
        out[name] = root / name
    steering = ControlNetModel.from_unet(unet, conditioning_channels=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # output convs non-zero; the condition embedding at a gain that lets masks differ
        for name, param in steering.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif name.startswith("controlnet_cond_embedding") and param.ndim == 4:
                param.copy_(torch.randn(param.shape, generator=generator) * 2 / param[0].numel() ** 0.5)
    run = root / "steering_run"  # a training run folder: <run>/controlnet
    steering.save_pretrained(run / "controlnet")
    out["steering_run"] = run
    other = ControlNetModel(  # an SD1.5-like layout: 32-dim cross-attention, no text_time embedding
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    other.save_pretrained(root / "other")
    out["other"] = root / "other"
    return out


@pytest.fixture(scope="module")
def masks(mini_bdd, tmp_path_factory) -> Path:
    """Two validation masks and their captions: <root>/masks/*.png, <root>/captions/*.txt."""
    root = tmp_path_factory.mktemp("cn_inputs")
    (root / "masks").mkdir()
    (root / "captions").mkdir()
    for path, caption in zip(
        sorted((mini_bdd / "labels/sem_seg/masks/val").glob("*.png"))[:2], CAPTIONS, strict=True
    ):
        shutil.copy(path, root / "masks" / path.name)
        (root / "captions" / f"{path.stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def mask_names(masks: Path) -> list[str]:
    return sorted(p.stem for p in (masks / "masks").glob("*.png"))


def base_args(model, controlnet, masks: Path, out: Path) -> list[str]:
    return [
        "--config",
        str(DEMO_CONFIG),
        f"model.pretrained_model={model}",
        f"paths.controlnet_path={controlnet}",
        f"paths.masks_path={masks / 'masks'}",
        f"paths.captions_path={masks / 'captions'}",
        "paths.source_labels=null",
        f"paths.infer_path={out}",
        "on_error=stop",  # the demo leaves out masks without captions; the tests see every error
    ]


def infer(model, controlnet, masks, out: Path, *overrides: str) -> Path:
    """Run the script in-process; returns the generations folder."""
    assert infer_controlnet_sdxl.main([*base_args(model, controlnet, masks, out), *overrides]) == 0
    return out / "generations"


SMALL = ("resolution.width=64", "resolution.height=64")


@pytest.fixture(scope="module")
def palette_output(model, controlnets, masks, mini_bdd, tmp_path_factory) -> Path:
    """The demo config (each mask's bucket: 160x96), 2 masks x 2 images, batch 2, det_20 labels recorded."""
    out = tmp_path_factory.mktemp("cn_out") / "run"
    return infer(
        model,
        controlnets["palette"],
        masks,
        out,
        "images_per_prompt=2",
        f"paths.source_labels={mini_bdd / 'labels/det_20/det_val.json'}",
    )


def test_writes_images_sheets_and_stage4_metadata(palette_output, model, controlnets, masks, mini_bdd):
    from annotation.layout import read_metadata

    gen, names = palette_output, mask_names(masks)
    files = [f"{name}_{i:02d}.png" for name in names for i in (0, 1)]
    assert sorted(p.name for p in gen.iterdir()) == [*files, "metadata.jsonl"]
    sheets = gen.parent / "side_by_side"
    assert sorted(p.name for p in sheets.iterdir()) == files
    for name in files:
        with Image.open(gen / name) as im:
            assert (im.format, im.mode, im.size) == (
                "PNG",
                "RGB",
                (160, 96),
            )  # 320x180 -> the tiny 16:9 bucket
        mask_path = masks / "masks" / f"{name.rsplit('_', 1)[0]}.png"
        preview = np.asarray(cond.ids_to_preview(cond.resize_ids(cond.read_ids(mask_path), (160, 96))))
        sheet = pixels(sheets / name)
        assert sheet.shape == (96, 320, 3)
        assert np.array_equal(sheet[:, :160], preview) and np.array_equal(sheet[:, 160:], pixels(gen / name))

    recs = records(gen)
    assert [(r["file"], r["prompt"], r["seed"]) for r in recs] == [
        (files[0], CAPTIONS[0], 0),
        (files[1], CAPTIONS[0], 1),
        (files[2], CAPTIONS[1], 2),
        (files[3], CAPTIONS[1], 3),
    ]
    first = recs[0]
    labels = mini_bdd / "labels/det_20/det_val.json"
    assert first["mask_path"] == str((masks / "masks" / f"{names[0]}.png").resolve())
    assert first["source_frame"] == f"{names[0]}.jpg" and first["source_size"] == [320, 180]
    assert first["source_labels"] == str(labels.resolve())
    assert (first["width"], first["height"], first["resolution"]) == (160, 96, "auto")
    assert first["prompt_source"] == str(masks / "captions" / f"{names[0]}.txt")
    assert first["conditioning"] == "palette" and first["controlnet_conditioning_scale"] == 1.0
    assert (first["control_guidance_start"], first["control_guidance_end"]) == (0.0, 1.0)
    assert first["controlnet_fingerprint"] == model_fingerprint(str(controlnets["palette"]))
    assert first["base_model_fingerprint"] == model_fingerprint(str(model))
    assert first["controlnet_path"] == str(controlnets["palette"]) and first["lora_sha256"] is None

    refs = read_metadata(gen / "metadata.jsonl")  # what stage 4 reads
    assert (
        refs[files[2]].source_frame == f"{names[1]}.jpg" and refs[files[2]].source_labels == labels.resolve()
    )
    assert refs[files[2]].mask_path == (masks / "masks" / f"{names[1]}.png").resolve()
    resolved = yaml.safe_load((gen.parent / "config.resolved.yaml").read_text())
    cfg = ControlNetInferConfig.model_validate(resolved)  # loads back through the schema
    assert cfg.paths.controlnet_path == str(controlnets["palette"]) and cfg.resolution.fixed is None


def test_rerun_skips_and_redoes_only_a_deleted_image(
    palette_output, model, controlnets, masks, mini_bdd, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(palette_output.parent, out)
    gen = out / "generations"
    args = ("images_per_prompt=2", f"paths.source_labels={mini_bdd / 'labels/det_20/det_val.json'}")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in gen.iterdir()}
    capsys.readouterr()
    infer(model, controlnets["palette"], masks, out, *args)
    assert "nothing to do: all 4 images are in" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in gen.iterdir()} == before

    name = f"{mask_names(masks)[1]}_00.png"
    (gen / name).unlink()
    (out / "side_by_side" / name).unlink()
    infer(model, controlnets["palette"], masks, out, *args)
    assert "1 generated, 3 already done, 0 failed, 4 in the work list" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in gen.iterdir()}
    assert sorted(n for n in after if after[n] != before[n][1]) == [name, "metadata.jsonl"]
    # made alone now, in a batch of 2 before: the same seed; batched float rounding moves pixels 1 level at most
    assert np.abs(pixels(gen / name) - pixels(palette_output / name)).max() <= 1
    assert (out / "side_by_side" / name).is_file()
    assert [r["file"] for r in records(gen)] == [r["file"] for r in records(palette_output)]

    (out / "side_by_side" / name).unlink()  # a lost sheet is remade from its image and mask, no generation
    infer(model, controlnets["palette"], masks, out, *args)
    assert "nothing to do" in capsys.readouterr().out
    assert np.array_equal(pixels(out / "side_by_side" / name)[:, 160:], pixels(gen / name))


def test_same_seed_same_pixels_and_seeds_are_per_image(
    palette_output, model, controlnets, masks, mini_bdd, tmp_path
):
    again = infer(
        model,
        controlnets["palette"],
        masks,
        tmp_path / "again",
        "images_per_prompt=2",
        f"paths.source_labels={mini_bdd / 'labels/det_20/det_val.json'}",
    )
    first = mask_names(masks)[0]
    assert np.array_equal(pixels(again / f"{first}_00.png"), pixels(palette_output / f"{first}_00.png"))
    assert np.abs(pixels(again / f"{first}_00.png") - pixels(again / f"{first}_01.png")).mean() > 5


def base_sdxl_image(model: Path, prompt: str, seed: int, size=(64, 64)) -> np.ndarray:
    """The plain StableDiffusionXLPipeline's image for the same settings as the demo config."""
    from ai.common.models import ModelSource
    from ai.common.pipelines import build_sdxl_pipeline, make_scheduler

    pipe = build_sdxl_pipeline(ModelSource(pretrained_model=str(model)), "fp32")
    pipe.scheduler = make_scheduler("euler", pipe.scheduler)
    with torch.inference_mode():
        image = pipe(
            prompt=[prompt],
            num_inference_steps=2,
            guidance_scale=7.5,
            width=size[0],
            height=size[1],
            generator=[torch.Generator("cpu").manual_seed(seed)],
        ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def one_mask(masks, tmp_path_factory) -> Path:
    """Just the first mask (index 0, so its image's seed is the config's seed)."""
    root = tmp_path_factory.mktemp("one_mask")
    (root / "masks").mkdir()
    shutil.copytree(masks / "captions", root / "captions")
    name = mask_names(masks)[0]
    shutil.copy(masks / "masks" / f"{name}.png", root / "masks" / f"{name}.png")
    return root


def test_fresh_controlnet_equals_the_base_model_for_both_kinds(model, controlnets, one_mask, tmp_path):
    name = mask_names(one_mask)[0]
    base = base_sdxl_image(model, CAPTIONS[0], seed=5)
    for kind in ("palette", "one_hot"):
        gen = infer(model, controlnets[kind], one_mask, tmp_path / kind, *SMALL, "seed=5")
        assert records(gen)[0]["conditioning"] == kind and records(gen)[0]["seed"] == 5
        # zero convolutions add exact zeros to the UNet's residuals: the same image as without a ControlNet
        assert np.abs(pixels(gen / f"{name}_00.png") - base).max() <= 1, kind


def test_the_mask_steers_the_image_and_scale_zero_turns_it_off(model, controlnets, masks, one_mask, tmp_path):
    steering = controlnets["steering_run"]  # a run folder: its controlnet/ subfolder is used
    prompt = ("paths.captions_path=null", "prompt=a street", "seed=3", *SMALL)
    first = mask_names(masks)[0]
    gen = infer(model, steering, masks, tmp_path / "steered", *prompt, "images_per_prompt=1")
    assert records(gen)[0]["controlnet_path"] == str(steering / "controlnet")
    base = base_sdxl_image(model, "a street", seed=3)
    steered = pixels(gen / f"{first}_00.png")
    assert np.abs(steered - base).mean() > 5
    # another mask with the same prompt and seed (the only mask of a folder: index 0, seed 3) gives another image
    other = tmp_path / "other_mask"
    (other / "masks").mkdir(parents=True)
    second = mask_names(masks)[1]
    shutil.copy(masks / "masks" / f"{second}.png", other / "masks" / f"{first}.png")
    moved = infer(model, steering, other, tmp_path / "moved", *prompt)
    assert records(moved)[0]["seed"] == 3
    assert np.abs(pixels(moved / f"{first}_00.png") - steered).mean() > 2
    off = infer(model, steering, one_mask, tmp_path / "off", *prompt, "controlnet_conditioning_scale=0")
    assert np.abs(pixels(off / f"{first}_00.png") - base).max() <= 1


def test_condition_tensors_reach_the_controlnet_unchanged(model, controlnets, masks):
    """The pipeline's control image processor leaves (B, C, H, W) tensors as they are, 3 or 19 channels."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from ai.common.models import ModelSource
    from ai.common.pipelines import build_sdxl_pipeline

    ids = cond.resize_ids(cond.read_ids(masks / "masks" / f"{mask_names(masks)[0]}.png"), (64, 64))
    for kind in ("palette", "one_hot"):
        controlnet = ControlNetModel.from_pretrained(controlnets[kind], local_files_only=True)
        pipe = build_sdxl_pipeline(
            ModelSource(pretrained_model=str(model)),
            "fp32",
            pipeline_cls=StableDiffusionXLControlNetPipeline,
            controlnet=controlnet,
        )
        seen: list[torch.Tensor] = []
        controlnet.register_forward_pre_hook(
            lambda _m, _a, kw, seen=seen: seen.append(kw["controlnet_cond"].clone()), with_kwargs=True
        )
        condition = torch.stack([cond.ids_to_tensor(ids, kind)] * 2)
        with torch.inference_mode():
            pipe(prompt=["a", "b"], image=condition, num_inference_steps=1, width=64, height=64)
        assert len(seen) == 1 and torch.equal(seen[0], torch.cat([condition, condition]))  # CFG: doubled


def test_captions_from_the_stage1_csv_and_missing_ones(model, controlnets, masks, tmp_path, capsys):
    first, second = mask_names(masks)
    csv_path = tmp_path / "bdd_hf_dataset_controlnet_val.csv"
    csv_path.write_text(
        "image,conditioning_image,text\n"
        f"images/{first}.jpg,conditioning_rgb/val/{first}.png,a snowy road\n"
        "images/zzz.jpg,conditioning_rgb/val/zzz.png,a frame without mask\n",
        encoding="utf-8",
    )
    args = base_args(model, controlnets["palette"], masks, tmp_path / "o")
    code = run_main(infer_controlnet_sdxl.main, [*args, f"paths.captions_path={csv_path}", "--check"])
    err = capsys.readouterr().err
    assert code == 2 and f"1 of 2 mask(s) have no caption in {csv_path}: {second}.png; add" in err
    gen = infer(
        model,
        controlnets["palette"],
        masks,
        tmp_path / "csv",
        *SMALL,
        f"paths.captions_path={csv_path}",
        "on_error=skip",
    )
    assert [(r["file"], r["prompt"], r["prompt_source"]) for r in records(gen)] == [
        (f"{first}_00.png", "a snowy road", f"{csv_path}:2")
    ]
    assert "1 mask(s) without a caption left out (on_error=skip)" in capsys.readouterr().out


def test_bad_masks_stop_or_are_skipped(model, controlnets, masks, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "masks").mkdir(parents=True)
    shutil.copytree(masks / "captions", bad / "captions")
    first, second = mask_names(masks)
    out_of_range = np.asarray(cond.read_ids(masks / "masks" / f"{first}.png")).copy()
    out_of_range[:4, :4] = 40
    Image.fromarray(out_of_range).save(bad / "masks" / f"{first}.png")
    photo = np.zeros((180, 320, 3), np.uint8)
    photo[..., 1] = 200  # (0, 200, 0): no BDD class has this colour
    Image.fromarray(photo).save(bad / "masks" / f"{second}.png")
    args = [*base_args(model, controlnets["palette"], bad, tmp_path / "o"), *SMALL]
    code = run_main(infer_controlnet_sdxl.main, args)
    err = capsys.readouterr().err
    assert code == 2 and f"mask {(bad / 'masks' / f'{first}.png').resolve()} has values [40] outside" in err
    code = run_main(infer_controlnet_sdxl.main, [*args, "on_error=skip"])
    out = capsys.readouterr()
    assert code == 0 and "0 generated, 0 already done, 2 failed, 2 in the work list" in out.out
    assert "is RGB and not an official BDD100K palette rendering" in out.out
    assert "label ids were expected" in out.out


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = run_main(infer_controlnet_sdxl.main, list(argv))
    return code, capsys.readouterr().err


def test_bad_inputs_give_clear_errors_before_any_output(model, controlnets, masks, tmp_path, capsys):
    out = tmp_path / "o"
    args = base_args(model, controlnets["palette"], masks, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    cases = [
        (
            [f"paths.controlnet_path={controlnets['other']}"],
            f"ControlNet {controlnets['other']} does not fit the base model {model}: "
            "cross_attention_dim 32 vs the UNet's 64; addition_embed_type None vs the UNet's text_time",
        ),
        (
            ["conditioning=one_hot"],
            f"conditioning=one_hot needs a ControlNet with 19 conditioning channels, but {controlnets['palette']} "
            "has conditioning_channels=3 (it takes palette input); set conditioning=palette or conditioning=auto",
        ),
        (
            [f"paths.controlnet_path={controlnets['one_hot']}", "conditioning=palette"],
            "conditioning=palette needs a ControlNet with 3 conditioning channels",
        ),
        ([f"paths.controlnet_path={tmp_path / 'nope'}"], f"ControlNet folder not found: {tmp_path / 'nope'}"),
        (
            [f"paths.controlnet_path={empty}"],
            f"{empty} is not a ControlNet folder (no config.json; found: notes.txt)",
        ),
        ([f"paths.masks_path={tmp_path / 'nomasks'}"], f"masks folder not found: {tmp_path / 'nomasks'}"),
        ([f"paths.masks_path={empty}"], f"no .png masks in {empty} (found: notes.txt)"),
        (["prompt=a road"], "set either paths.captions_path (captions per mask) or prompt"),
        (["paths.captions_path=null"], "no prompts: set paths.captions_path"),
        ([f"paths.captions_path={tmp_path / 'nocaps'}"], f"captions not found: {tmp_path / 'nocaps'}"),
        (["prompts=[a]"], "prompts: Value error, prompts is not used by ControlNet inference"),
        (
            ["resolution.width=100", "resolution.height=64"],
            "resolution.width: Value error, must be a positive multiple of 8",
        ),
        (["resolution.width=64"], "resolution.height: Value error, set both width and height"),
        (
            ["control_guidance_start=0.5", "control_guidance_end=0.5"],
            "control_guidance_end: Value error, must be greater",
        ),
        (["controlnet_conditioning_scal=1"], "unknown key (did you mean 'controlnet_conditioning_scale'"),
        (["conditioning=rgb"], "conditioning: Input should be 'auto', 'palette' or 'one_hot'"),
        (
            [f"paths.source_labels={tmp_path / 'det.json'}"],
            f"paths.source_labels not found: {tmp_path / 'det.json'}",
        ),
        (["dtype=fp16", "device=cpu"], "dtype fp16 needs a GPU (the device is cpu)"),
        ([f"paths.lora_weights_path={tmp_path / 'lora'}"], f"LoRA weights not found: {tmp_path / 'lora'}"),
    ]
    for overrides, message in cases:
        code, err = run_cli(capsys, *args, *overrides)
        assert code == 2 and message in err, (overrides, err)
    assert not out.exists()  # every error came before any output
    code, err = run_cli(capsys, *args, f"paths.controlnet_path={controlnets['steering_run']}", "--check")
    assert code == 0
    # a folder of 2018 per-image label files is a source too (stage 4 reads it like det_20)
    per_image = tmp_path / "labels_100k_val"
    per_image.mkdir()
    code, err = run_cli(
        capsys, *args, f"paths.controlnet_path={controlnets['steering_run']}", f"paths.source_labels={per_image}",
        "--check",
    )  # fmt: skip
    assert code == 0, err


def test_optional_lora_changes_the_image_and_scale_zero_does_not(model, controlnets, one_mask, tmp_path):
    save_random_lora(model, tmp_path / "lora")
    name = f"{mask_names(one_mask)[0]}_00.png"
    lora = (f"paths.lora_weights_path={tmp_path / 'lora'}", *SMALL, "seed=5")
    styled = infer(model, controlnets["palette"], one_mask, tmp_path / "styled", *lora)
    zero = infer(model, controlnets["palette"], one_mask, tmp_path / "zero", *lora, "lora_scale=0")
    base = base_sdxl_image(model, CAPTIONS[0], seed=5)
    assert records(styled)[0]["lora_sha256"] == sha256_file(
        tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    )
    assert np.abs(pixels(styled / name) - base).mean() > 5
    assert np.abs(pixels(zero / name) - base).max() <= 1


@pytest.mark.slow
def test_channels_last_and_torch_compile_keep_the_images(model, controlnets, one_mask, tmp_path, monkeypatch):
    """Both switches reach the ControlNet as well as the UNet (CPU here: about a minute of compiling)."""
    from torch._dynamo.utils import counters

    steering = controlnets["steering_run"]  # its residuals change the image: a wrong compile would show
    args = (*SMALL, "images_per_prompt=2", "seed=3")
    plain = infer(model, steering, one_mask, tmp_path / "plain", *args)
    compiling: list[bool] = []  # per ControlNet call: was it running under dynamo?
    load_controlnet = infer_controlnet_sdxl.load_controlnet

    def load_and_watch(*a, **kw):
        controlnet = load_controlnet(*a, **kw)
        controlnet.register_forward_pre_hook(lambda *_: compiling.append(torch.compiler.is_compiling()))
        return controlnet

    monkeypatch.setattr(infer_controlnet_sdxl, "load_controlnet", load_and_watch)
    graphs_before = counters["stats"]["unique_graphs"]
    fast = infer(
        model,
        steering,
        one_mask,
        tmp_path / "fast",
        *args,
        "speed.channels_last=true",
        "speed.torch_compile=true",
    )
    assert counters["stats"]["unique_graphs"] > graphs_before
    assert compiling and all(compiling)  # the ControlNet itself went through dynamo, not only the UNet
    name = mask_names(one_mask)[0]
    for i in range(2):
        assert np.abs(pixels(fast / f"{name}_{i:02d}.png") - pixels(plain / f"{name}_{i:02d}.png")).max() <= 2


@pytest.mark.slow
def test_launcher_two_processes_split_the_work_and_match_one(
    palette_output, model, controlnets, masks, mini_bdd, tmp_path
):
    env = dict(
        os.environ,
        ACCELERATE_CONFIG=str(REPO / "config/accelerate_config_cpu_2proc.yaml"),
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
    )
    out = tmp_path / "two"
    cmd = [
        "bash",
        str(REPO / "ai/controlnet/run_controlnet_infer.sh"),
        *base_args(model, controlnets["palette"], masks, out)[1:],
        "images_per_prompt=2",
        f"paths.source_labels={mini_bdd / 'labels/det_20/det_val.json'}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 generated, 0 already done, 0 failed, 4 in the work list" in proc.stdout
    gen = out / "generations"
    assert sorted(p.name for p in gen.iterdir()) == sorted(p.name for p in palette_output.iterdir())
    assert sorted(p.name for p in (out / "side_by_side").iterdir()) == sorted(
        p.name for p in (palette_output.parent / "side_by_side").iterdir()
    )
    assert [(r["file"], r["seed"]) for r in records(gen)] == [
        (r["file"], r["seed"]) for r in records(palette_output)
    ]
    for rec in records(gen):
        assert np.abs(pixels(gen / rec["file"]) - pixels(palette_output / rec["file"])).max() <= 1, rec[
            "file"
        ]


def test_launcher_checks_config_before_accelerate(tmp_path):
    proc = run_launcher("ai/controlnet/run_controlnet_infer.sh", DEMO_CONFIG, "control_guidance_ends=0.5")
    assert proc.returncode == 2
    assert "control_guidance_ends: unknown key (did you mean 'control_guidance_end'" in proc.stderr
    assert "accelerate" not in proc.stderr.lower()


def test_default_size_is_the_nearest_sdxl_bucket_at_the_models_native_size(tmp_path):
    """Configs only (no weights): SDXL base -> 1344x768 for a 1280x720 BDD mask, as training buckets it; with
    generate_at_bucket the image is generated there and saved at the requested size (fixed, or the mask's)."""
    from ai.common.models import ModelSource
    from ai.controlnet.infer_controlnet_sdxl import ControlNetResolution, Geometry

    for sub, config in (
        ("unet", {"sample_size": 128, "block_out_channels": [320, 640, 1280]}),
        ("vae", {"block_out_channels": [128, 256, 512, 512]}),
    ):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config))
    paths = ModelSource(pretrained_model=str(tmp_path))
    geometry = Geometry.for_model(paths, ControlNetResolution())
    assert geometry.native == 1024 and geometry.label == "auto"
    assert geometry.size_for((1280, 720)) == (1344, 768) and geometry.size_for((720, 1280)) == (768, 1344)
    assert geometry.size_for((1000, 1000)) == (1024, 1024)
    assert geometry.sizes_for((1280, 720)).generated == (1344, 768)
    fixed = Geometry.for_model(paths, ControlNetResolution(width=1280, height=720))
    assert fixed.size_for((320, 180)) == (1280, 720) and fixed.label == "1280x720"
    assert fixed.sizes_for((320, 180)).generated == (1280, 720)
    at_bucket = Geometry.for_model(paths, ControlNetResolution(generate_at_bucket=True))
    sizes = at_bucket.sizes_for((1280, 720))
    assert (sizes.generated, sizes.saved) == ((1344, 768), (1280, 720))  # BDD's frame size, its boxes' pixels
    fixed_at_bucket = Geometry.for_model(
        paths, ControlNetResolution(width=1280, height=720, generate_at_bucket=True)
    )
    sizes = fixed_at_bucket.sizes_for((320, 180))
    assert (sizes.generated, sizes.saved) == ((1344, 768), (1280, 720))


def test_user_config_documents_every_key(monkeypatch):
    from core.config import load_config

    for name in ("MODEL_DIR", "VAE_DIR", "BDD_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BDD_SDXL_ENV_FILE", "")  # no .env: the defaults of the ${VAR:-default} values
    data = yaml.safe_load(USER_CONFIG.read_text(encoding="utf-8"))
    cfg = load_config(ControlNetInferConfig, USER_CONFIG)
    assert cfg.model.pretrained_model == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.dtype == "fp16"
    assert cfg.paths.source_labels == "bdd100k/labels/det_20/det_val.json"  # stage 4's layout check is on
    flat = {f"{k}.{sub}" for k, v in data.items() if isinstance(v, dict) for sub in v}
    flat |= {k for k, v in data.items() if not isinstance(v, dict)}
    expected = {
        f"{name}.{sub}" if hasattr(value, "model_fields") else name
        for name in ControlNetInferConfig.model_fields
        for value in [getattr(cfg, name)]
        for sub in (type(value).model_fields if hasattr(value, "model_fields") else [None])
    }
    assert flat == expected
    for line in USER_CONFIG.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"uncommented key line: {line!r}"


# --- box layouts ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def box_controlnets(model, tmp_path_factory) -> dict[str, Path]:
    """Box-layout ControlNets as training saves them (the layout recorded in config.json): one-hot with random
    output convolutions (so the layout steers) and a fresh palette one."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ai.controlnet import control

    root = tmp_path_factory.mktemp("box_controlnets")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
    one_hot = steer_outputs(ControlNetModel.from_unet(unet, conditioning_channels=11), seed=1)
    control.record_conditioning(one_hot, "boxes", "one_hot").save_pretrained(root / "one_hot")
    palette = ControlNetModel.from_unet(unet, conditioning_channels=3)
    control.record_conditioning(palette, "boxes", "palette").save_pretrained(root / "palette")
    return {"one_hot": root / "one_hot", "palette": root / "palette"}


@pytest.fixture(scope="module")
def box_layouts(mini_bdd, tmp_path_factory) -> Path:
    """Box layouts of two val frames (rendered from det_val at their images' size) and captions:
    <root>/masks/*.png, <root>/captions/*.txt."""
    from vocab import bdd, box_layout, layouts

    root = tmp_path_factory.mktemp("box_layouts")
    (root / "masks").mkdir()
    (root / "captions").mkdir()
    frames = [f for f in bdd.load_frames(mini_bdd / "labels/det_20/det_val.json") if len(f.label_list()) >= 3]
    for frame, caption in zip(frames[:2], CAPTIONS, strict=True):
        with Image.open(mini_bdd / "images/100k/val" / frame.name) as im:
            size = im.size
        layouts.save_png(
            box_layout.render_box_layout(frame.label_list(), size),
            root / "masks" / f"{frame.stem}.png",
            "boxes",
        )
        (root / "captions" / f"{frame.stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def test_generates_from_box_layouts_with_stage4_metadata(
    model, box_controlnets, box_layouts, mini_bdd, tmp_path, monkeypatch
):
    """The layout reaches the ControlNet as the 11-channel one-hot of the resized ids; sheets show the box preview;
    each record says the layout and the source frame, so stage 4 checks the image against the frame's boxes."""
    from annotation.layout import LayoutSources, read_metadata
    from vocab import bdd, layouts

    seen = watch_controlnet_conditions(monkeypatch)
    labels = mini_bdd / "labels/det_20/det_val.json"
    gen = infer(
        model, box_controlnets["one_hot"], box_layouts, tmp_path / "boxes", f"paths.source_labels={labels}",
        "batch_size=1", "num_inference_steps=1",
    )  # fmt: skip
    names = mask_names(box_layouts)
    recs = records(gen)
    assert [r["file"] for r in recs] == [f"{n}_00.png" for n in names]
    for rec, name in zip(recs, names, strict=True):
        assert rec["layout"] == "boxes" and rec["conditioning"] == "one_hot"
        assert rec["mask_path"] == str((box_layouts / "masks" / f"{name}.png").resolve())
        assert rec["source_frame"] == f"{name}.jpg" and rec["source_size"] == [320, 180]
        assert rec["source_labels"] == str(labels.resolve())
    # the condition the ControlNet saw (CFG doubles the batch): the one-hot of the layout at the 160x96 bucket
    assert len(seen) == 2
    for cond_seen, name in zip(seen, names, strict=True):
        ids = cond.resize_ids(cond.read_ids(box_layouts / "masks" / f"{name}.png", layout="boxes"), (160, 96))
        expected = cond.ids_to_tensor(ids, "one_hot", "boxes")
        assert cond_seen.shape == (2, 11, 96, 160) and torch.equal(cond_seen[0], expected)
        sheet = pixels(gen.parent / "side_by_side" / f"{name}_00.png")
        assert np.array_equal(sheet[:, :160], np.asarray(layouts.get("boxes").preview(np.asarray(ids))))
    # stage 4 reads the records and finds each source frame's boxes, scaled to the generated image
    refs = read_metadata(gen / "metadata.jsonl")
    boxes, why = LayoutSources().source_boxes(refs[f"{names[0]}_00.png"], (160, 96), set(range(10)))
    assert boxes, why
    frame = next(f for f in bdd.load_frames(labels) if f.stem == names[0])
    assert len(boxes) == len([lab for lab in frame.label_list() if lab.category in bdd.DET_CLASSES])
    # a lost sheet is remade from the record's layout with the box preview, nothing generated
    sheet_path = gen.parent / "side_by_side" / f"{names[1]}_00.png"
    before = pixels(sheet_path)
    sheet_path.unlink()
    infer(
        model, box_controlnets["one_hot"], box_layouts, tmp_path / "boxes", f"paths.source_labels={labels}",
        "batch_size=1", "num_inference_steps=1",
    )  # fmt: skip
    assert np.array_equal(pixels(sheet_path), before)


def test_a_box_controlnet_refuses_masks_and_a_mask_controlnet_refuses_box_layouts(
    model, controlnets, box_controlnets, masks, box_layouts, tmp_path, capsys
):
    out = tmp_path / "o"
    boxes_cn, seg_cn = box_controlnets["palette"], controlnets["palette"]
    code, err = run_cli(capsys, *base_args(model, boxes_cn, masks, out))
    assert code == 2
    assert (
        f"ControlNet {boxes_cn} was trained on box layouts (its config.json says _bdd_conditioning.layout=boxes), "
        f"but 2 of 2 file(s) in paths.masks_path {masks / 'masks'} are not box layouts (no bdd_layout=boxes marker)"
    ) in err
    assert "--layout boxes" in err
    code, err = run_cli(capsys, *base_args(model, seg_cn, box_layouts, out))
    assert code == 2
    assert (
        f"ControlNet {seg_cn} was trained on segmentation masks (no layout recorded in its config.json: a "
        f"ControlNet trained on masks), but 2 of 2 file(s) in paths.masks_path {box_layouts / 'masks'} are box "
        "layouts (marked bdd_layout=boxes)"
    ) in err
    code, err = run_cli(capsys, *base_args(model, seg_cn, masks, out), "layout=boxes")
    assert code == 2
    assert (
        f"layout=boxes needs a ControlNet trained on box layouts, but {seg_cn} was trained on segmentation"
        in err
    )
    code, err = run_cli(capsys, *base_args(model, boxes_cn, box_layouts, out), "layout=seg")
    assert code == 2 and "set layout=boxes or layout=auto" in err
    code, err = run_cli(
        capsys, *base_args(model, box_controlnets["one_hot"], box_layouts, out), "conditioning=palette"
    )
    assert code == 2 and "conditioning=palette needs a ControlNet with 3 conditioning channels" in err
    assert not out.exists()  # every refusal came before any output
    args = [*base_args(model, boxes_cn, box_layouts, out), "layout=boxes", "--check"]
    assert run_main(infer_controlnet_sdxl.main, args) == 0
    assert "(box layouts as palette input)" in capsys.readouterr().out


def test_a_hub_controlnet_is_matched_to_the_inputs_like_a_local_one(
    model, box_controlnets, masks, box_layouts, tmp_path, capsys, monkeypatch
):
    """A hub ControlNet's config is read through diffusers in main, after the torch-free checks: its layout and
    conditioning kind are taken, and inputs of the other layout refused, as for a local folder (here a local
    box-layout ControlNet served under a hub id)."""
    hub_id, local = "org/box-controlnet", box_controlnets["one_hot"]
    read = infer_controlnet_sdxl.read_model_config
    monkeypatch.setattr(
        infer_controlnet_sdxl,
        "read_model_config",
        lambda src, *sub: read(local if src == hub_id else src, *sub),
    )
    out = tmp_path / "o"
    code, err = run_cli(capsys, *base_args(model, hub_id, masks, out))
    assert (
        code == 2
        and f"ControlNet {hub_id} was trained on box layouts" in err
        and "are not box layouts" in err
    )
    assert run_main(infer_controlnet_sdxl.main, [*base_args(model, hub_id, box_layouts, out), "--check"]) == 0
    assert "(box layouts as one_hot input)" in capsys.readouterr().out
    assert not out.exists()
