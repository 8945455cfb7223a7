"""Single-file SDXL checkpoints (one ``.safetensors`` in the original Stability layout, as community model sites
distribute them) as the base model or VAE, loaded offline through diffusers' single-file loading.

A single file holds weights only: the architecture (UNet, VAE and text-encoder configs), the tokenizers and the
scheduler come from a diffusers-format SDXL folder, ``model.config_from`` (:func:`resolve_config_from`): the
folder given, else ``MODEL_DIR`` (from ``.env``) when that is a diffusers folder, else the project's own SDXL base
configs (:func:`ai.common.build_model.write_config_folder`, weights-free, written once to the user cache).

:func:`check_checkpoint_file` reads only the file's header (its key names) and says what a file that is not an
SDXL checkpoint holds instead; :func:`load_single_file_components` loads the parts. The UNet and VAE load through
``from_single_file`` with ``config=`` the local folder; the two text encoders are converted with diffusers'
own key maps (``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) and loaded strictly, since
diffusers tells the two encoders apart by their width alone, which is ambiguous when both have the same width.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core.cli import UserError

logger = logging.getLogger(__name__)

#: Key prefixes of an SDXL base checkpoint in the original (Stability / sgm) layout, one per part.
SDXL_PARTS = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
#: SDXL's UNet has the size/crop micro-conditioning embedding (``add_embedding`` in diffusers).
SDXL_UNET_MARKER = "model.diffusion_model.label_emb.0.0.weight"
#: Where a VAE file's keys may start (a whole checkpoint, a bare VAE in either layout).
VAE_PREFIXES = ("first_stage_model.", "vae.", "")
#: A weights-only folder of the project's SDXL base configs, written on first use.
CONFIG_CACHE_NAME = "sdxl-base-config"


def is_single_file(path: str | os.PathLike) -> bool:
    """A local file (not a folder) given as a model: a single-file checkpoint."""
    return Path(path).is_file()


def _keys(path: Path, key: str) -> list[str]:
    """The tensor names in a safetensors file's header (no tensor is read)."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise UserError(
            f"{key}: {path} is not a .safetensors file; only safetensors single-file checkpoints are loaded "
            "(pickled .ckpt/.pt/.bin files can run code when read). Convert it to .safetensors or use a "
            "diffusers folder"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise UserError(f"{key}: {path} cannot be read as safetensors: {exc}") from None


def describe_checkpoint(keys: list[str], need_vae: bool = True) -> str:
    """What a checkpoint's key names say it is, for error messages (``need_vae=False``: a checkpoint without its
    VAE counts as SDXL, for a run that sets ``model.vae``)."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not keys:
        return "an empty file (no tensors)"
    if has("cond_stage_model.transformer."):
        return "a Stable Diffusion 1.x checkpoint (one CLIP text encoder under cond_stage_model.transformer.)"
    if has("cond_stage_model.model."):
        return "a Stable Diffusion 2.x checkpoint (one OpenCLIP text encoder under cond_stage_model.model.)"
    if has("conditioner.embedders.0.model.") and not has(SDXL_PARTS["text_encoder"]):
        return "an SDXL refiner checkpoint (one OpenCLIP text encoder, no CLIP ViT-L)"
    if has("model.diffusion_model.") and SDXL_UNET_MARKER not in keys:
        return "a UNet without SDXL's size/crop conditioning (no model.diffusion_model.label_emb)"
    if has("down_blocks.") or has("unet.down_blocks.") or has("encoder.down_blocks."):
        return "weights in diffusers layout (a single UNet or VAE file), not a whole checkpoint"
    if any("lora" in k for k in keys[:50]):
        return "a LoRA file, not a base model"
    missing = [part for part, prefix in SDXL_PARTS.items() if not has(prefix) and (need_vae or part != "vae")]
    if missing:
        return f"no SDXL {', '.join(missing)} keys; its first keys are {', '.join(sorted(keys)[:3])}"
    return "an SDXL base checkpoint"


def check_checkpoint_file(
    path: str | os.PathLike, key: str = "model.pretrained_model", need_vae: bool = True
) -> Path:
    """Check that ``path`` is an SDXL base checkpoint in the original layout (UNet, VAE, both text encoders; the VAE
    may be missing when ``model.vae`` gives one: ``need_vae=False``)."""
    path = Path(path)
    keys = _keys(path, key)
    what = describe_checkpoint(keys, need_vae)
    if what != "an SDXL base checkpoint":
        no_vae = (
            "; a checkpoint without its VAE needs model.vae" if what.startswith("no SDXL vae keys") else ""
        )
        raise UserError(
            f"{key}: {path} is not an SDXL base checkpoint: found {what}{no_vae}. Give an SDXL checkpoint in the "
            "original (Stability) layout, with model.diffusion_model.*, first_stage_model.*, conditioner.embedders.0.* "
            "and conditioner.embedders.1.*, or a diffusers SDXL folder"
        )
    return path


def check_vae_file(path: str | os.PathLike, key: str = "model.vae") -> Path:
    """Check that ``path`` holds an SDXL-style VAE: alone (original or diffusers layout) or in a whole checkpoint."""
    path = Path(path)
    keys = set(_keys(path, key))
    if not any(f"{prefix}encoder.conv_in.weight" in keys for prefix in VAE_PREFIXES):
        raise UserError(
            f"{key}: {path} holds no VAE (no encoder.conv_in.weight, bare or under first_stage_model.): found "
            f"{describe_checkpoint(sorted(keys))}. Give a VAE .safetensors or a diffusers AutoencoderKL folder"
        )
    return path


def default_config_folder() -> Path:
    """``$XDG_CACHE_HOME/bdd-sdxl/sdxl-base-config`` (``~/.cache`` without XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bdd-sdxl" / CONFIG_CACHE_NAME


def check_config_folder(path: str | os.PathLike, key: str = "model.config_from") -> Path:
    """A diffusers SDXL folder's configs and tokenizers (weights are not needed: they come from the file)."""
    from ai.common.model_folder import SDXL_SUBFOLDERS

    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"{key}: folder not found: {path} (a diffusers-format SDXL folder to read the configs from)"
        )
    wanted = [f"{sub}/config.json" for sub in ("unet", "vae", "text_encoder", "text_encoder_2")]
    wanted += ["scheduler/scheduler_config.json", "tokenizer", "tokenizer_2"]
    missing = [name for name in wanted if not (path / name).exists()]
    if missing:
        raise UserError(
            f"{key}: {path} is not a diffusers SDXL folder: missing {', '.join(missing)} (it needs "
            f"{', '.join(SDXL_SUBFOLDERS)} with their configs; weights are not needed)"
        )
    return path


def resolve_config_from(config_from: str | None) -> Path:
    """The folder a single file's architecture comes from: ``config_from``, else ``MODEL_DIR`` when that is a
    diffusers folder, else the project's own SDXL base configs (written once, offline)."""
    if config_from:
        return check_config_folder(config_from)
    env = os.environ.get("MODEL_DIR")
    if env and Path(env).is_dir() and (Path(env) / "model_index.json").is_file():
        return check_config_folder(env, key="MODEL_DIR (the default of model.config_from)")
    from ai.common.build_model import write_config_folder

    return write_config_folder("sdxl-base", default_config_folder())


def _fit_error(what: str, path: Path, config: Path, exc: Exception) -> UserError:
    # diffusers' shape error goes on about overwriting weights randomly: not an option here
    detail = " ".join(str(exc).split()).split(" If you want to instead")[0][:400]
    return UserError(
        f"{path}: its {what} does not fit the architecture in {config} ({detail}). Set model.config_from to the "
        "diffusers folder of the model this checkpoint was made from (its configs and tokenizers)"
    )


def _check_loaded(model, what: str, path: Path, config: Path) -> None:
    """diffusers leaves weights the file lacks on the meta device (without an error): refuse such a model."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise _fit_error(
            what, path, config, ValueError(f"no weights for {len(missing)} tensors: {missing[:3]}")
        )


def load_unet(state: dict, path: Path, config: Path, dtype):
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_single_file(
            state, config=str(config), subfolder="unet", local_files_only=True, torch_dtype=dtype
        )
    except (ValueError, RuntimeError, KeyError) as exc:
        raise _fit_error("UNet", path, config, exc) from None
    _check_loaded(unet, "UNet", path, config)
    return unet


def load_vae(source: Path | dict, path: Path, config: Path, dtype):
    """The VAE of a whole checkpoint (``source``: its tensors) or of a VAE file, with ``config``'s vae config."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_single_file(
            source if isinstance(source, dict) else str(source),
            config=str(config), subfolder="vae", local_files_only=True, torch_dtype=dtype,
        )  # fmt: skip
    except (ValueError, RuntimeError, KeyError) as exc:
        raise _fit_error("VAE", path, config, exc) from None
    _check_loaded(vae, "VAE", path, config)
    return vae


def _text_encoder(cls, converted: dict, path: Path, config: Path, subfolder: str, dtype):
    """A transformers text encoder from ``config``'s config and the converted weights; every weight must fit."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(config, subfolder=subfolder, local_files_only=True)
    try:
        model, info = cls.from_pretrained(
            None, config=model_config, state_dict=converted, output_loading_info=True,
            **({"dtype": dtype} if dtype is not None else {}),
        )  # fmt: skip
    except (ValueError, RuntimeError, KeyError) as exc:
        raise _fit_error(subfolder, path, config, exc) from None
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    problems = missing + [str(m) for m in info.get("mismatched_keys", [])]
    if problems:
        raise _fit_error(subfolder, path, config, ValueError(f"missing or mismatched: {problems[:3]}"))
    return model.eval()


def load_text_encoders(state: dict, path: Path, config: Path, dtype) -> tuple[Any, Any]:
    """Both text encoders, converted with diffusers' own key maps (CLIP ViT-L: prefix only; OpenCLIP bigG: split
    attention projections, transposed text projection)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1_state = convert_ldm_clip_checkpoint(
        {k: v for k, v in state.items() if k.startswith(SDXL_PARTS["text_encoder"])}
    )
    te1 = _text_encoder(CLIPTextModel, te1_state, path, config, "text_encoder", dtype)
    # convert_open_clip_checkpoint reads only the config off the model it is given (its width)
    te2_config = AutoConfig.from_pretrained(config, subfolder="text_encoder_2", local_files_only=True)
    proxy = SimpleNamespace(config=te2_config)
    te2_state = convert_open_clip_checkpoint(proxy, state, prefix=SDXL_PARTS["text_encoder_2"])
    te2 = _text_encoder(CLIPTextModelWithProjection, te2_state, path, config, "text_encoder_2", dtype)
    return te1, te2


def load_single_file_components(
    path: str | os.PathLike, config: Path, dtype, vae_loader, scheduler_loader, need_vae: bool = True
) -> dict[str, Any]:
    """The SDXL parts of a single-file checkpoint, with the architecture of ``config`` (a checked config folder).

    ``vae_loader(tensors)`` gives the VAE (the file's own, or a separate ``model.vae``); ``scheduler_loader(config)``
    the scheduler. Tokenizers come from the config folder.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    path = check_checkpoint_file(path, need_vae=need_vae)
    logger.info("loading single-file checkpoint %s (architecture from %s)", path, config)
    state = load_file(str(path))  # memory-mapped: tensors are read as each part converts them
    unet = load_unet(state, path, config, dtype)
    te1, te2 = load_text_encoders(state, path, config, dtype)
    vae = vae_loader(state)
    del state
    return dict(
        tokenizer=CLIPTokenizer.from_pretrained(config, subfolder="tokenizer", local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(config, subfolder="tokenizer_2", local_files_only=True),
        text_encoder=te1,
        text_encoder_2=te2,
        vae=vae,
        unet=unet,
        scheduler=scheduler_loader(config),
    )
