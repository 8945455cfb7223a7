"""Build an SDXL-architecture model folder from config, no downloads: the tiny model of the tests and the demo, and
the full SDXL architecture with random weights for benchmarks.

Presets:

* ``tiny``: the real SDXL structure (two CLIP text encoders, pooled text embeds + ``text_time`` added conditioning,
  x8 VAE, the real CLIP BPE tokenizers) at a few MB, for tests and the CPU demo.
* ``sdxl-base``: the full stabilityai/stable-diffusion-xl-base-1.0 architecture with random weights, for honest
  speed and memory benchmarks on a GPU.

Usage:
    python -m ai.common.build_model --preset tiny --out models/tiny-sdxl
    python -m ai.common.build_model --preset sdxl-base --out models/sdxl-base-random --dtype bfloat16

The folder it writes is loaded like any diffusers SDXL folder (ai/common/models.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ai.common.model_folder import check_model_folder
from core.cli import UserError, run_main

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "sdxl-base")
SDXL_VAE_SCALING_FACTOR = 0.13025  # SDXL base's VAE config

_SCHEDULER_CONFIG: dict[str, Any] = dict(  # SDXL base's scheduler_config.json
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def preset_configs(preset: str) -> dict[str, dict[str, Any]]:
    if preset == "tiny":
        te1 = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        )
        te2 = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        )
        time_dim = 8
        unet = dict(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            norm_num_groups=8,
        )
        vae = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128)
        te_act = "quick_gelu", "gelu"
    elif preset == "sdxl-base":
        te1 = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        )
        te2 = dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
        )
        time_dim = 256
        unet = dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            norm_num_groups=32,
        )
        vae = dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024
        )
        te_act = "quick_gelu", "gelu"
    else:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unet.update(
        in_channels=4,
        out_channels=4,
        cross_attention_dim=te1["hidden_size"]
        + te2["hidden_size"],  # penultimate states of both encoders, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # 6 micro-conditioning numbers (original size, crop top-left, target size) + TE2's pooled projection
        projection_class_embeddings_input_dim=6 * time_dim + te2["projection_dim"],
    )
    vae.update(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(vae["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(vae["block_out_channels"]),
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
        force_upcast=True,
    )
    common_te = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    te1.update(common_te, hidden_act=te_act[0], pad_token_id=49407)
    te2.update(common_te, hidden_act=te_act[1], pad_token_id=0)
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def build_pipeline(preset: str = "tiny", seed: int = 0, tokenizer_dir: str | os.PathLike | None = None):
    """Build a ``StableDiffusionXLPipeline`` of the given preset with random weights (seeded)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from vocab.clip_tokenizer import build_clip_tokenizer

    cfg = preset_configs(preset)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    tokenizer_2 = build_clip_tokenizer(tokenizer_dir, pad_token="!")
    scheduler = EulerDiscreteScheduler(**_SCHEDULER_CONFIG)
    if preset == "tiny":
        _sharpen_random_vae(vae, seed)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def _sharpen_random_vae(vae, seed: int) -> None:
    """Give a random VAE the latent statistics of a trained one, so small models learn from images as SDXL does.

    A random encoder's posterior has log-variance ~0 (std 1), which buries the image (latent std ~0.25) under
    sampling noise: a ControlNet could then never learn a layout. A trained SDXL VAE's posterior is sharp, and its
    scaling factor brings latents to unit variance. Shift the log-variance output down and calibrate the scaling
    factor on smooth, seeded test images the same way.
    """
    import torch

    channels = vae.config.latent_channels
    with torch.no_grad():
        out_conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        out_conv.bias[channels:] -= 12.0  # posterior std ~exp(-6) instead of ~1
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.rand(8, 3, 8, 8, generator=gen, device="cpu").to(vae.device) * 2 - 1
        images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
        latents = vae.encode(images).latent_dist.mean
    vae.register_to_config(scaling_factor=round(float(1.0 / latents.std()), 5))


def build_model_folder(
    preset: str, out: str | os.PathLike, seed: int = 0, dtype: str = "float32", device: str = "cpu"
) -> Path:
    """Write a diffusers-layout SDXL folder for ``preset`` (atomically; an existing complete folder is kept).

    ``device``: where the random weights are drawn (``cuda`` draws sdxl-base's 3.5B in seconds instead of
    minutes on a CPU; the weights then differ from a CPU build of the same seed).
    """
    import torch

    from core.io import atomic_dir

    out = Path(out)
    if (out / "model_index.json").is_file():
        check_model_folder(out)
        logger.info("model folder %s already exists; keeping it", out)
        return out
    with torch.device(device):
        pipe = build_pipeline(preset, seed=seed)
    if dtype != "float32":
        pipe.to(dtype=getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def write_config_folder(preset: str, out: str | os.PathLike) -> Path:
    """A weights-free diffusers SDXL folder of ``preset``: model_index.json, every part's config, the tokenizers
    and the scheduler (the architecture a single-file checkpoint loads into). Written atomically, kept if there."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from core.io import atomic_dir, atomic_write_text
    from vocab.clip_tokenizer import build_clip_tokenizer

    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    cfg = preset_configs(preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        with torch.device("meta"):  # the configs without allocating 3.5B weights
            UNet2DConditionModel(**cfg["unet"]).save_config(tmp / "unet")
            AutoencoderKL(**cfg["vae"]).save_config(tmp / "vae")
        CLIPTextConfig(**cfg["text_encoder"], architectures=["CLIPTextModel"]).save_pretrained(
            tmp / "text_encoder"
        )
        CLIPTextConfig(
            **cfg["text_encoder_2"], architectures=["CLIPTextModelWithProjection"]
        ).save_pretrained(tmp / "text_encoder_2")
        build_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        build_clip_tokenizer(pad_token="!").save_pretrained(tmp / "tokenizer_2")
        EulerDiscreteScheduler(**_SCHEDULER_CONFIG).save_config(tmp / "scheduler")
        index = {  # what StableDiffusionXLPipeline.save_pretrained writes
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    """CLI: ``python -m ai.common.build_model --preset tiny --out models/tiny-sdxl``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ai.common.build_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="architecture size (default: tiny)")
    parser.add_argument("--out", required=True, help="folder to write (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument(
        "--device", default="cpu", help="where to draw the random weights (cuda: seconds for sdxl-base)"
    )
    args = parser.parse_args(argv)
    out = build_model_folder(args.preset, args.out, seed=args.seed, dtype=args.dtype, device=args.device)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{args.preset} SDXL written to {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
