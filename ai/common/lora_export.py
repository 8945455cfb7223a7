"""LoRA weights on disk: diffusers format (``pytorch_lora_weights.safetensors``) and a kohya-format copy.

* diffusers: ``StableDiffusionXLPipeline.save_lora_weights`` with PEFT state dicts and the adapter config as
  metadata (so ``lora_alpha`` survives); loads with ``pipe.load_lora_weights(folder)``.
* kohya (what ComfyUI and AUTOMATIC1111 load): ``lora_unet_<module path with _>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (and ``lora_te1_`` / ``lora_te2_`` for the text encoders). diffusers'
  ``convert_state_dict_to_kohya`` writes alpha = rank, which is wrong when alpha != rank, so the real alpha
  is written here. diffusers' ``load_lora_weights`` reads these files too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def peft_state(model) -> dict[str, torch.Tensor]:
    """The LoRA weights of a PEFT-adapted diffusers/transformers model (no adapter name in the keys)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def to_kohya(parts: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """PEFT state dicts per component ('unet', 'text_encoder', 'text_encoder_2') -> one kohya state dict."""
    out: dict[str, torch.Tensor] = {}
    for component, state in parts.items():
        prefix = _KOHYA_PREFIX[component]
        for key, tensor in state.items():
            module, kind = key.rsplit(".lora_", 1)  # "down_blocks.1...to_q", "A.weight"
            name = f"{prefix}_{module.replace('.', '_')}"
            if kind == "A.weight":
                out[f"{name}.lora_down.weight"] = tensor.contiguous()
                out[f"{name}.alpha"] = torch.tensor(float(alphas[component]))
            elif kind == "B.weight":
                out[f"{name}.lora_up.weight"] = tensor.contiguous()
            else:
                raise ValueError(f"cannot export {component} key {key!r} to kohya format")
    return out


def save_lora(
    folder: str | os.PathLike,
    unet,
    text_encoder=None,
    text_encoder_2=None,
    kohya: bool = True,
) -> list[Path]:
    """Write the diffusers-format LoRA (and the kohya copy) into ``folder``; returns the files written."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from ai.common.io import canonicalize_safetensors

    folder = Path(folder)
    parts = {"unet": peft_state(unet)}
    metadata = {"unet_lora_adapter_metadata": _adapter_metadata(unet)}
    for name, te in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if te is not None:
            parts[name] = peft_state(te)
            metadata[f"{name}_lora_adapter_metadata"] = _adapter_metadata(te)
    # PEFT keys as they are: convert_state_dict_to_diffusers mangles some module names (verified: a LoRA on
    # proj_in/ff layers no longer loaded back), and load_lora_weights reads PEFT keys directly
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=parts["unet"],
        text_encoder_lora_layers=parts.get("text_encoder"),
        text_encoder_2_lora_layers=parts.get("text_encoder_2"),
        **metadata,
    )
    written = [folder / DIFFUSERS_NAME]
    canonicalize_safetensors(folder / DIFFUSERS_NAME)
    if kohya:
        alphas = {
            name: float(m.peft_config["default"].lora_alpha)
            for name, m in _models(unet, text_encoder, text_encoder_2)
        }
        save_file(to_kohya(parts, alphas), folder / KOHYA_NAME)
        canonicalize_safetensors(folder / KOHYA_NAME)
        written.append(folder / KOHYA_NAME)
    return written


def _adapter_metadata(model) -> dict:
    """The PEFT config for the file's metadata, with sets sorted: PEFT keeps target_modules as a set, whose order
    changes with Python's hash seed, so the same weights would give files with different bytes and hashes."""
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in config.items()}


def _models(unet, te1, te2):
    yield "unet", unet
    if te1 is not None:
        yield "text_encoder", te1
    if te2 is not None:
        yield "text_encoder_2", te2
