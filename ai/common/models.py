"""SDXL-architecture models: build from config (no downloads) and load real ones, with the same code.

Presets:

* ``tiny``: the real SDXL structure (two CLIP text encoders, pooled text embeds + ``text_time`` added conditioning,
  x8 VAE, the real CLIP BPE tokenizers) at a few MB, for tests and the CPU demo.
* ``sdxl-base``: the full stabilityai/stable-diffusion-xl-base-1.0 architecture with random weights, for honest
  speed and memory benchmarks on a GPU.

Usage::

    python -m ai.common.build_model --preset tiny --out models/tiny-sdxl

Loading (:func:`load_components`) takes that folder, a local copy of stabilityai/stable-diffusion-xl-base-1.0, or a
hub id on an online host, plus an optional separate VAE (e.g. an fp16-safe one).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai.common.cli import UserError

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "sdxl-base")
#: Subfolders a diffusers SDXL folder has (model_index.json beside them).
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
SDXL_VAE_SCALING_FACTOR = 0.13025

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


def _preset_configs(preset: str) -> dict[str, dict[str, Any]]:
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

    from convert.clip_tokenizer import build_clip_tokenizer

    cfg = _preset_configs(preset)
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

    from ai.common.io import atomic_dir

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


def check_model_folder(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a complete diffusers SDXL folder; the error lists what is missing and what was found."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    missing = [name for name in ("model_index.json", *SDXL_SUBFOLDERS) if not (path / name).exists()]
    if missing:
        found = sorted(p.name for p in path.iterdir())
        raise UserError(
            f"{path} is not a complete SDXL folder (diffusers layout): missing {', '.join(missing)}; found "
            f"{', '.join(found) or 'nothing'}. Build one with `python -m ai.common.build_model --preset tiny --out {path}` "
            "or download stabilityai/stable-diffusion-xl-base-1.0 on an online host"
        )
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights = [
            p
            for p in (path / sub).glob("*")
            if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
        ]
        if not weights:
            raise UserError(f"{path / sub} has no weights (*.safetensors or *.bin); the folder is incomplete")
    return path


def is_local(path_or_id: str | os.PathLike) -> bool:
    return Path(path_or_id).exists() or str(path_or_id).startswith((".", "/", "~"))


def local_files_only(path_or_id: str | os.PathLike) -> bool:
    """``from_pretrained``'s ``local_files_only``: a local folder, or any id when HF_HUB_OFFLINE=1 (no hub calls)."""
    return is_local(path_or_id) or os.environ.get("HF_HUB_OFFLINE") == "1"


@dataclass
class SDXLComponents:
    """The frozen parts training and inference share."""

    tokenizer: Any
    tokenizer_2: Any
    text_encoder: Any
    text_encoder_2: Any
    vae: Any
    unet: Any
    scheduler: Any
    source: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


_SAME = object()


def load_components(
    base: str | os.PathLike,
    vae: str | os.PathLike | None = None,
    dtype=None,
    variant: str | None = None,
    vae_dtype=_SAME,
) -> SDXLComponents:
    """Load SDXL parts from a local folder or (on an online host) a hub id.

    Args:
        base: diffusers-layout folder or hub id such as ``stabilityai/stable-diffusion-xl-base-1.0``.
        vae: optional separate VAE folder or hub id (e.g. an fp16-safe SDXL VAE).
        dtype: torch dtype for the weights (None keeps what is stored). Each tensor is cast as it is read, so
            loading in bf16 holds half the host memory of loading in fp32 and casting, with the same values.
        variant: weight variant such as ``fp16`` (hub folders that ship one).
        vae_dtype: the VAE's dtype, if not ``dtype`` (the stock SDXL VAE stays fp32: it overflows in fp16).
    """
    if vae_dtype is _SAME:
        vae_dtype = dtype
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = is_local(base)
    if local:
        check_model_folder(base)
    kw: dict[str, Any] = {"local_files_only": local_files_only(base)}
    if variant:
        kw["variant"] = variant
    wkw = dict(kw, **({"dtype": dtype} if dtype is not None else {}))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(
            base, subfolder="tokenizer", local_files_only=kw["local_files_only"]
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(
            base, subfolder="tokenizer_2", local_files_only=kw["local_files_only"]
        )
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **wkw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **wkw)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **wkw)
        scheduler = EulerDiscreteScheduler.from_pretrained(
            base, subfolder="scheduler", local_files_only=kw["local_files_only"]
        )
        if vae is not None:
            vae_local = is_local(vae)
            if vae_local and not Path(vae).is_dir():
                raise UserError(f"VAE folder not found: {vae}")
            vae_model = AutoencoderKL.from_pretrained(
                vae,
                local_files_only=vae_local or kw["local_files_only"],
                **({"dtype": vae_dtype} if vae_dtype is not None else {}),
            )
        else:
            vae_kw = dict(kw, **({"dtype": vae_dtype} if vae_dtype is not None else {}))
            vae_model = AutoencoderKL.from_pretrained(base, subfolder="vae", **vae_kw)
    except (OSError, ValueError) as exc:
        hint = (
            "the hub is unreachable here (HF_HUB_OFFLINE=1): pass a local folder"
            if not local
            else "the folder looks incomplete or corrupt"
        )
        raise UserError(f"cannot load SDXL from {base}: {exc} ({hint})".replace("\n", " ")) from None
    return SDXLComponents(
        tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae_model, unet, scheduler, str(base)
    )


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' variant file names: the variant goes before the last suffix (``x.safetensors`` ->
    ``x.fp16.safetensors``, ``x.safetensors.index.json`` -> ``x.safetensors.index.fp16.json``)."""
    if not variant:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def safetensors_files(
    base: str | os.PathLike, subfolder: str, variant: str | None = None
) -> list[Path] | None:
    """The safetensors files holding a component's weights in a local diffusers folder (one file, or the shards
    of its index), or None where there are none (a hub id, ``.bin`` weights)."""
    import json

    if not is_local(base):
        return None
    folder = Path(base) / subfolder
    single = folder / _with_variant("diffusion_pytorch_model.safetensors", variant)
    if single.is_file():
        return [single]
    index = folder / _with_variant("diffusion_pytorch_model.safetensors.index.json", variant)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in shards]
    return None


def vae_config_path(base: str | os.PathLike, vae: str | os.PathLike | None) -> Path | None:
    """The config.json of the VAE a run loads (``vae`` folder, else ``base``/vae), or None for a hub id."""
    source, sub = (vae, "") if vae is not None else (base, "vae")
    if not is_local(source):
        return None
    return Path(source) / sub / "config.json"


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
