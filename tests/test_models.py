"""ai/common/models.py: the tiny SDXL builds offline, loads through the real loading code, and generates."""

from __future__ import annotations

import json

import pytest

from core.cli import UserError


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from ai.common.build_model import build_model_folder

    return build_model_folder("tiny", tmp_path_factory.mktemp("models") / "tiny-sdxl")


def test_tiny_folder_has_sdxl_structure(tiny_folder):
    from ai.common.models import SDXL_SUBFOLDERS, load_components

    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert all((tiny_folder / sub).is_dir() for sub in SDXL_SUBFOLDERS)
    parts = load_components(tiny_folder)
    unet_cfg = parts.unet.config
    assert unet_cfg.addition_embed_type == "text_time"
    assert (
        unet_cfg.cross_attention_dim
        == parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    )
    assert unet_cfg.projection_class_embeddings_input_dim == 6 * unet_cfg.addition_time_embed_dim + (
        parts.text_encoder_2.config.projection_dim
    )
    assert parts.vae_scale_factor == 8
    assert parts.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert parts.tokenizer_2.pad_token == "!"
    size_mb = sum(p.stat().st_size for p in tiny_folder.rglob("*") if p.is_file()) / 2**20
    assert size_mb < 40


def test_tiny_vae_latents_carry_the_image_like_a_trained_sdxl_vae(tiny_folder):
    """A random VAE's posterior noise (std ~1) would bury the image; the tiny preset's is sharp and scaled to ~unit
    variance, as SDXL's VAE with its 0.13025 scaling factor is."""
    import numpy as np
    import torch

    from ai.common.models import load_components

    vae = load_components(tiny_folder).vae
    y, x = np.mgrid[0:96, 0:160] / 160.0
    photo = torch.tensor(np.stack([np.sin(6 * x), np.cos(4 * y), x * y]), dtype=torch.float32)[None] * 0.9
    with torch.no_grad():
        posterior = vae.encode(photo).latent_dist
    scaled_std = float(posterior.mean.std() * vae.config.scaling_factor)
    assert 0.4 < scaled_std < 2.5, scaled_std
    assert float(posterior.std.max()) < 0.05 * float(posterior.mean.std())  # sampling noise << image signal


def test_tiny_pipeline_generates_deterministically(tiny_folder):
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return np.asarray(pipe("a car", num_inference_steps=2, width=64, height=96, generator=g).images[0])

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (96, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sdxl_base_preset_has_sdxl_parameter_count():
    """The full architecture on the meta device: same parameter count as stabilityai/stable-diffusion-xl-base-1.0."""
    import torch
    from diffusers import UNet2DConditionModel

    from ai.common.build_model import preset_configs

    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset_configs("sdxl-base")["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_missing_and_incomplete_folders_are_clear(tmp_path):
    from ai.common.models import check_model_folder, load_components

    with pytest.raises(UserError, match="model folder not found"):
        load_components(tmp_path / "nope")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match=r"missing vae, text_encoder.*found model_index.json, unet"):
        check_model_folder(tmp_path / "half")


def test_unknown_preset():
    from ai.common.build_model import build_pipeline

    with pytest.raises(UserError, match="unknown model preset 'huge'"):
        build_pipeline("huge")


def test_frozen_parts_load_in_the_weight_dtype_with_the_values_of_an_fp32_load(tiny_folder):
    """Trainers load UNet and text encoders in the mixed-precision dtype (half the host memory per process) and the
    VAE in fp32: the same values as loading in fp32 and casting, which is what they did before."""
    import torch

    from ai.common.models import load_components

    fp32 = load_components(tiny_folder)
    bf16 = load_components(tiny_folder, dtype=torch.bfloat16, vae_dtype=torch.float32)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        low, full = getattr(bf16, name), getattr(fp32, name)
        assert {p.dtype for p in low.parameters()} == {torch.bfloat16}, name
        assert all(
            torch.equal(a, b.to(torch.bfloat16))
            for a, b in zip(low.parameters(), full.parameters(), strict=True)
        )
    assert {p.dtype for p in bf16.vae.parameters()} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(bf16.vae.parameters(), fp32.vae.parameters(), strict=True))
    assert {p.dtype for p in load_components(tiny_folder, dtype=torch.bfloat16).vae.parameters()} == {
        torch.bfloat16
    }


def test_weight_files_and_vae_config_are_found_without_torch(tiny_folder, tmp_path):
    import json

    from ai.common.models import ModelSource, safetensors_files, vae_config_path

    assert safetensors_files(tiny_folder, "unet") == [
        tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"
    ]
    assert safetensors_files(tiny_folder, "unet", "fp16") is None  # no such variant
    assert safetensors_files("stabilityai/stable-diffusion-xl-base-1.0", "unet") is None  # a hub id
    sharded = tmp_path / "sharded" / "unet"
    sharded.mkdir(parents=True)
    index = {"weight_map": {"a": "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                            "b": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"}}  # fmt: skip
    (sharded / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index))
    assert [p.name for p in safetensors_files(tmp_path / "sharded", "unet", "fp16")] == [
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]

    def source(base, vae=None):
        return ModelSource(pretrained_model=str(base), vae=None if vae is None else str(vae))

    assert vae_config_path(source(tiny_folder)) == tiny_folder / "vae" / "config.json"
    assert vae_config_path(source(tiny_folder, tmp_path / "my_vae")) == tmp_path / "my_vae" / "config.json"
    assert vae_config_path(source("stabilityai/stable-diffusion-xl-base-1.0")) is None
    assert vae_config_path(source(tiny_folder, "madebyollin/sdxl-vae-fp16-fix")) is None
