"""SDXL-architecture models: load a diffusers SDXL folder (a local copy of stabilityai/stable-diffusion-xl-base-1.0,
the tiny model ai/common/build_model.py writes), a single-file SDXL checkpoint (:mod:`ai.common.single_file`) or,
on an online host, a hub id, with the same code.

Loading (:func:`load_components`) takes the folder, file or hub id, plus an optional separate VAE (e.g. an
fp16-safe one); :func:`check_model_source` says what an incomplete folder lacks or what a wrong file holds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai.common.model_folder import SDXL_SUBFOLDERS, check_model_folder  # noqa: F401 (their old home)
from core.cli import UserError
from core.config import Section

logger = logging.getLogger(__name__)


class ModelSource(Section):
    """The base model a run loads: ``model:`` in training and generation configs alike."""

    pretrained_model: str = (
        "stabilityai/stable-diffusion-xl-base-1.0"  # SDXL folder, .safetensors file or hub id
    )
    vae: str | None = None  # separate VAE folder, .safetensors file or hub id, e.g. an fp16-safe SDXL VAE
    variant: str | None = None  # weight variant such as "fp16"
    # a single file's architecture, tokenizers and scheduler: a diffusers SDXL folder (None: MODEL_DIR when that is
    # a folder, else the project's own SDXL base configs)
    config_from: str | None = None


def check_model_source(model: ModelSource) -> None:
    """Fast checks of ``model:`` (no torch): a local folder is complete, a single file is an SDXL checkpoint (its
    header is read) with a config folder, a local VAE exists and holds a VAE. Hub ids are checked at load."""
    from ai.common import single_file

    if single_file.is_single_file(model.pretrained_model):
        single_file.check_checkpoint_file(model.pretrained_model, need_vae=not model.vae)
    elif is_local(model.pretrained_model):
        check_model_folder(model.pretrained_model)
    if model.vae and is_local(model.vae):
        if single_file.is_single_file(model.vae):
            single_file.check_vae_file(model.vae)
        elif not Path(model.vae).is_dir():
            raise UserError(
                f"model.vae not found: {model.vae} (a diffusers AutoencoderKL folder or a .safetensors file)"
            )
    if single_file.is_single_file(model.pretrained_model) or (
        model.vae and single_file.is_single_file(model.vae)
    ):
        single_file.resolve_config_from(model.config_from)
    elif model.config_from:
        single_file.check_config_folder(model.config_from)


def config_source(model: ModelSource) -> str:
    """Where the base model's part configs (``unet/config.json`` ...) are read: its folder or hub id, or for a
    single file the config folder it loads with."""
    from ai.common import single_file

    if single_file.is_single_file(model.pretrained_model):
        return str(single_file.resolve_config_from(model.config_from))
    return model.pretrained_model


def fp16_unsafe_vae_error(where: str) -> UserError:
    return UserError(
        f"model.vae_fp16_safe=true but {where} says force_upcast: true: this VAE overflows in fp16 "
        "(black images, NaN losses). Set model.vae_fp16_safe=false (the VAE then runs in fp32), or set "
        "model.vae to an fp16-safe VAE folder (e.g. madebyollin/sdxl-vae-fp16-fix, force_upcast: false; a "
        "single-file VAE takes force_upcast from model.config_from's vae/config.json)"
    )


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
    *,
    config_from: str | None = None,
    vae_fp16_safe: bool = False,
) -> SDXLComponents:
    """Load SDXL parts from a local folder, a single-file checkpoint or (on an online host) a hub id.

    Args:
        base: diffusers-layout folder, single ``.safetensors`` checkpoint (original Stability layout) or hub id
            such as ``stabilityai/stable-diffusion-xl-base-1.0``.
        vae: optional separate VAE folder, ``.safetensors`` file or hub id (e.g. an fp16-safe SDXL VAE).
        dtype: torch dtype for the weights (None keeps what is stored). Each tensor is cast as it is read, so
            loading in bf16 holds half the host memory of loading in fp32 and casting, with the same values.
        variant: weight variant such as ``fp16`` (hub folders that ship one).
        vae_dtype: the VAE's dtype, if not ``dtype`` (the stock SDXL VAE stays fp32: it overflows in fp16).
        config_from: a single file's config folder (:func:`ai.common.single_file.resolve_config_from`).
        vae_fp16_safe: the run means to run the VAE in fp16/bf16: refused when the loaded VAE's config says
            ``force_upcast`` (a hub id or single file is only known here; a local folder already at ``--check``).
    """
    from ai.common import single_file

    if vae_dtype is _SAME:
        vae_dtype = dtype
    vae_file = Path(vae) if vae is not None and single_file.is_single_file(vae) else None
    config = (
        single_file.resolve_config_from(config_from) if vae_file or single_file.is_single_file(base) else None
    )

    def separate_vae(default):
        """The VAE of ``model.vae`` if set, else ``default()``."""
        if vae_file is not None:
            single_file.check_vae_file(vae_file)
            return single_file.load_vae(vae_file, vae_file, config, vae_dtype)
        if vae is not None:
            return _load_vae(vae, vae_dtype)
        return default()

    if single_file.is_single_file(base):
        base_file = Path(base)
        parts = single_file.load_single_file_components(
            base_file,
            config,
            dtype,
            vae_loader=lambda state: separate_vae(
                lambda: single_file.load_vae(state, base_file, config, vae_dtype)
            ),
            scheduler_loader=lambda folder: _scheduler(folder, True),
            need_vae=vae is None,
        )
        comps = SDXLComponents(**parts, source=str(base))
    else:
        comps = _load_folder(base, dtype, variant, vae_dtype, separate_vae)
    if vae_fp16_safe and comps.vae.config.get("force_upcast", False):
        raise fp16_unsafe_vae_error(f"the config of the VAE loaded from {vae or base}")
    return comps


def _scheduler(source, local_only: bool):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=local_only)


def _load_vae(vae: str | os.PathLike, vae_dtype):
    """A separate VAE folder or hub id (a hub VAE downloads beside a local base unless HF_HUB_OFFLINE=1)."""
    from diffusers import AutoencoderKL

    if is_local(vae) and not Path(vae).is_dir():
        raise UserError(f"VAE folder not found: {vae}")
    return AutoencoderKL.from_pretrained(
        vae, local_files_only=local_files_only(vae), **({"dtype": vae_dtype} if vae_dtype is not None else {})
    )


def _load_folder(base, dtype, variant, vae_dtype, separate_vae) -> SDXLComponents:
    """The parts of a diffusers folder or hub id (``separate_vae(default)``: ``model.vae`` or the folder's own)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
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
        scheduler = _scheduler(base, kw["local_files_only"])
        vae_kw = dict(kw, **({"dtype": vae_dtype} if vae_dtype is not None else {}))
        vae_model = separate_vae(lambda: AutoencoderKL.from_pretrained(base, subfolder="vae", **vae_kw))
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


def vae_config_path(model: ModelSource) -> Path | None:
    """The config.json of the VAE a run loads (``vae`` folder, else ``base``/vae; a single file's comes from the
    config folder), or None for a hub id."""
    from ai.common import single_file

    if model.vae is not None and single_file.is_single_file(model.vae):
        return single_file.resolve_config_from(model.config_from) / "vae" / "config.json"
    source, sub = (model.vae, "") if model.vae is not None else (config_source(model), "vae")
    if not is_local(source):
        return None
    return Path(source) / sub / "config.json"
