"""ControlNet-LoRA (``controlnet.adapter: lora``) on the tiny SDXL: what trains, checkpoints, exact resume, the
merged folder and the adapter, inference from either, and a base model it does not fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_controlnet_train import run_inprocess, write_config, write_controlnet_csv

from ai.controlnet.adapter import ADAPTER_FILE, ADAPTER_FOLDER, TRAINED_MODULES
from core.cli import UserError

REPO = Path(__file__).resolve().parents[1]
LORA = {"adapter": "lora", "lora_rank": 4, "save_dtype": "float32"}


@pytest.fixture(scope="module")
def lora_runs(tiny_sdxl, mini_bdd, tmp_path_factory) -> Path:
    """Two ControlNet-LoRA runs of 4 steps on the mini-BDD masks: uninterrupted, and 2 steps + a resume to 4."""
    root = tmp_path_factory.mktemp("cn_lora")
    csv = write_controlnet_csv(mini_bdd, "train", root / "train.csv")
    runs = root / "runs"
    full = write_config(root / "full.yaml", tiny_sdxl, csv, runs, "full", controlnet=LORA,
                        validation={"every_n_steps": 4, "loss_rows": 2, "num_images": 1, "num_inference_steps": 2})  # fmt: skip
    assert run_inprocess(full) == 0
    part = write_config(root / "part.yaml", tiny_sdxl, csv, runs, "part", controlnet=LORA,
                        validation={"every_n_steps": 4, "loss_rows": 2, "num_images": 1, "num_inference_steps": 2},
                        train={"max_train_steps": 2})  # fmt: skip
    assert run_inprocess(part) == 0
    assert run_inprocess(part, "train.max_train_steps=4", "checkpoint.resume_from=latest") == 0
    return runs


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.slow
def test_only_lora_and_new_modules_train_checkpoints_are_small_and_resume_is_exact(lora_runs):
    run = lora_runs / "full"
    adapter = tensors(run / ADAPTER_FOLDER / ADAPTER_FILE)
    assert adapter and all(".lora_" in k or k.split(".")[0] in TRAINED_MODULES for k in adapter)
    assert any(".lora_A." in k for k in adapter) and any(
        k.startswith("controlnet_cond_embedding") for k in adapter
    )
    assert any("resnets" in k and ".conv1.lora_A" in k for k in adapter)  # convolutions get LoRA layers too
    # the checkpoint holds the trained tensors only: no full ControlNet folder
    ckpt = run / "checkpoint-2"
    assert (ckpt / ADAPTER_FOLDER / ADAPTER_FILE).is_file() and not (ckpt / "controlnet").exists()
    assert (
        tensors(ckpt / ADAPTER_FOLDER / ADAPTER_FILE).keys() == adapter.keys()
    )  # (sizes at SDXL scale: README)
    resumed = tensors(lora_runs / "part" / ADAPTER_FOLDER / ADAPTER_FILE)
    assert adapter.keys() == resumed.keys()
    for k in adapter:
        assert torch.equal(adapter[k], resumed[k]), k
    # LoRA B starts at zero; after 4 steps at lr 2e-3 it moved
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if ".lora_B." in k)


@pytest.mark.slow
def test_merged_folder_is_the_base_copy_plus_the_lora_and_the_adapter_rebuilds_it(lora_runs, tiny_sdxl):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ai.controlnet.adapter import controlnet_from_adapter

    run = lora_runs / "full"
    merged = ControlNetModel.from_pretrained(run / "controlnet")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    fresh = ControlNetModel.from_unet(unet, conditioning_channels=merged.config.conditioning_channels)
    m, f = merged.state_dict(), fresh.state_dict()
    assert m.keys() == f.keys()
    # untouched by LoRA and not trained: the base's own tensors; a LoRA target: changed
    assert torch.equal(m["time_embedding.linear_1.weight"], f["time_embedding.linear_1.weight"])
    assert torch.equal(m["conv_in.weight"], f["conv_in.weight"])
    q = next(k for k in m if k.endswith("attn1.to_q.weight"))
    assert not torch.equal(m[q], f[q])
    rebuilt = controlnet_from_adapter(run / ADAPTER_FOLDER, unet, str(tiny_sdxl)).state_dict()
    for k in m:
        torch.testing.assert_close(rebuilt[k], m[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_inference_from_the_adapter_equals_the_merged_folder(lora_runs, tiny_sdxl, mini_bdd, tmp_path):
    from ai.controlnet import infer_controlnet_sdxl

    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(sorted((mini_bdd / "labels/sem_seg/masks/val").glob("*.png"))[0], masks)
    images = {}
    for name, folder in (("merged", "controlnet"), ("adapter", ADAPTER_FOLDER)):
        out = tmp_path / name
        args = [
            "--config", str(REPO / "config/demo/controlnet_infer.yaml"), f"model.pretrained_model={tiny_sdxl}",
            f"paths.controlnet_path={lora_runs / 'full' / folder}", f"paths.masks_path={masks}",
            "paths.captions_path=null", "paths.source_labels=null", f"paths.infer_path={out}", "dtype=fp32",
            "num_inference_steps=2", "prompt=a street",
        ]  # fmt: skip
        assert infer_controlnet_sdxl.main(args) == 0
        (png,) = sorted((out / "generations").glob("*.png"))
        from PIL import Image

        images[name] = np.asarray(Image.open(png), dtype=np.int16)
    assert np.abs(images["merged"] - images["adapter"]).max() <= 1


def test_an_adapter_on_another_base_model_is_refused(tmp_path):
    from diffusers import ControlNetModel

    from ai.common.build_model import build_pipeline
    from ai.controlnet.adapter import (
        LoraSettings,
        add_lora,
        base_probes,
        controlnet_from_adapter,
        save_adapter,
    )

    unet = build_pipeline("tiny", seed=0).unet
    controlnet = ControlNetModel.from_unet(unet)
    settings = LoraSettings(2, 2.0, ("to_q", "to_v"))
    probes = base_probes(controlnet)
    add_lora(controlnet, settings, torch.float32)
    save_adapter(controlnet, tmp_path / "adapter", settings, probes)
    assert controlnet_from_adapter(tmp_path / "adapter", unet, "base") is not None
    in_bf16 = build_pipeline("tiny", seed=0).unet.to(
        torch.bfloat16
    )  # the same base in another precision fits
    assert controlnet_from_adapter(tmp_path / "adapter", in_bf16, "base") is not None
    other = build_pipeline("tiny", seed=1).unet
    with pytest.raises(UserError, match="trained on another base model than other-sdxl"):
        controlnet_from_adapter(tmp_path / "adapter", other, "other-sdxl")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["controlnet.adapter=lora", "controlnet.init_from=somewhere"],
            "controlnet.init_from continues a full",
        ),
        (["controlnet.adapter=lora", "controlnet.fuse_lora=x.safetensors"], "inference cannot rebuild"),
        (["controlnet.adapter=lora", "controlnet.lora_rank=0"], "lora_rank"),
    ],
)
def test_adapter_settings_that_cannot_work_are_refused(tiny_sdxl, mini_bdd, tmp_path, overrides, message):
    csv = write_controlnet_csv(mini_bdd, "train", tmp_path / "train.csv")
    cfg = write_config(tmp_path / "c.yaml", tiny_sdxl, csv, tmp_path / "runs", "x")
    with pytest.raises(UserError, match=message):
        run_inprocess(cfg, "--check", *overrides)
