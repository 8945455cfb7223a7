"""SDXL-architecture models: load a diffusers SDXL folder (a local copy of stabilityai/stable-diffusion-xl-base-1.0,
the tiny model ai/common/build_model.py writes) or, on an online host, a hub id, with the same code.

Loading (:func:`load_components`) takes the folder or hub id, plus an optional separate VAE (e.g. an fp16-safe one);
:func:`check_model_folder` says what an incomplete folder lacks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import UserError
from core.config import Section

logger = logging.getLogger(__name__)

#: Subfolders a diffusers SDXL folder has (model_index.json beside them).
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class ModelSource(Section):
    """The base model a run loads: ``model:`` in training and generation configs alike."""

    pretrained_model: str = "stabilityai/stable-diffusion-xl-base-1.0"  # diffusers SDXL folder or hub id
    vae: str | None = None  # separate VAE folder or hub id, e.g. an fp16-safe SDXL VAE
    variant: str | None = None  # weight variant such as "fp16"


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
