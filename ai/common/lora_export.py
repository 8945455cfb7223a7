"""LoRA weights on disk: diffusers format (``pytorch_lora_weights.safetensors``) and a kohya-format copy.

* diffusers: ``StableDiffusionXLPipeline.save_lora_weights`` with PEFT state dicts and the adapter config as
  metadata (so ``lora_alpha`` survives); loads with ``pipe.load_lora_weights(folder)``. Keys:
  ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.text_model.encoder.layers.<n>...`` and
  ``text_encoder_2.text_model.encoder.layers.<n>...``.
* kohya (what ComfyUI and AUTOMATIC1111 load): ``lora_unet_<module path with _>``,
  ``lora_te1_text_model_encoder_layers_<n>_self_attn_q_proj`` and ``lora_te2_text_model_...``, each with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. diffusers' ``convert_state_dict_to_kohya`` writes
  alpha = rank, which is wrong when alpha != rank, so the real alpha is written here. diffusers'
  ``load_lora_weights`` reads these files too.

Text encoders are named as in their checkpoints: transformers 5 flattened ``CLIPTextModel`` (its modules lost the
``text_model.`` prefix that ``CLIPTextModelWithProjection`` keeps) but still reads and writes checkpoints with it,
and ComfyUI and A1111 match only ``text_model`` names: without the prefix they silently drop text-encoder-1's
LoRA. diffusers strips the prefix again when it loads into a flattened model, so files written before this fix
(no prefix) and after both load here.

:func:`file_modules`, :func:`adapted_modules` and :func:`fit_problem` tell which modules of a file got a LoRA layer
when it was loaded (``ai.common.pipelines.load_lora`` refuses a file that only partly fits).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
COMPONENTS = tuple(_KOHYA_PREFIX)  # the SDXL pipeline parts a LoRA file can hold layers for


def peft_state(model) -> dict[str, torch.Tensor]:
    """The LoRA weights of a PEFT-adapted diffusers/transformers model (no adapter name in the keys), keyed by the
    model's own module names (what ``set_peft_model_state_dict`` takes back, e.g. from a training checkpoint)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def export_state(model, text_encoder: bool) -> dict[str, torch.Tensor]:
    """:func:`peft_state` keyed by checkpoint names: ``text_model.`` put back for a flattened CLIP text encoder."""
    state = peft_state(model)
    if text_encoder and not hasattr(model, "text_model"):
        return {f"text_model.{k}": v for k, v in state.items()}
    return state


def to_kohya(parts: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """Exported state dicts per component ('unet', 'text_encoder', 'text_encoder_2') -> one kohya state dict."""
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
    """Write the diffusers-format LoRA (and the kohya copy) into ``folder``; returns the files written.

    Each file is written under a temporary name and renamed when complete, so a killed export leaves no
    truncated file under the final name.
    """
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    folder = Path(folder)
    parts = {"unet": export_state(unet, text_encoder=False)}
    metadata = {"unet_lora_adapter_metadata": _adapter_metadata(unet)}
    for name, te in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if te is not None:
            parts[name] = export_state(te, text_encoder=True)
            metadata[f"{name}_lora_adapter_metadata"] = _adapter_metadata(te)
    # PEFT keys as they are: convert_state_dict_to_diffusers mangles some module names (verified: a LoRA on
    # proj_in/ff layers no longer loaded back), and load_lora_weights reads PEFT keys directly
    tmp = _tmp_name(DIFFUSERS_NAME)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=parts["unet"],
        text_encoder_lora_layers=parts.get("text_encoder"),
        text_encoder_2_lora_layers=parts.get("text_encoder_2"),
        weight_name=tmp,
        **metadata,
    )
    written = [_finish(folder / tmp, folder / DIFFUSERS_NAME)]
    if kohya:
        alphas = {
            name: float(m.peft_config["default"].lora_alpha)
            for name, m in _models(unet, text_encoder, text_encoder_2)
        }
        tmp = _tmp_name(KOHYA_NAME)
        save_file(to_kohya(parts, alphas), folder / tmp)
        written.append(_finish(folder / tmp, folder / KOHYA_NAME))
    return written


def file_modules(pipe, lora_file: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The modules a LoRA file has weights for, per pipeline component, and the keys that belong to no component.

    Read as ``pipe.load_lora_weights`` reads it (``lora_state_dict`` converts kohya files; then the same key
    conversions per component), so the names compare with :func:`adapted_modules` after the load.
    """
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state = pipe.lora_state_dict(
        str(lora_file.parent), weight_name=lora_file.name, unet_config=pipe.unet.config
    )[0]
    wanted: dict[str, set[str]] = {}
    stray = set(state)
    for component in COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in state.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        stray -= {f"{component}.{k}" for k in part}
        model = getattr(pipe, component, None)
        if component == "unet":
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if model is not None and not hasattr(model, "text_model"):  # as diffusers does for a flat CLIP
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        wanted[component] = {k.rsplit(".lora_", 1)[0] for k in part}
    return wanted, sorted(stray)


def adapted_modules(model, adapter_name: str) -> set[str]:
    """Names of the modules of ``model`` that hold a LoRA layer of ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if model is None:
        return set()
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
        and any(adapter_name in getattr(module, layer, {}) for layer in module.adapter_layer_names)
    }


def module_names(model) -> set[str]:
    """Names of all modules of ``model`` (none for a missing component)."""
    return set() if model is None else {name for name, _ in model.named_modules()}


def fit_problem(wanted: dict[str, set[str]], stray: list[str], applied: dict[str, set[str]]) -> str | None:
    """What of a LoRA file did not land (None: every module of the file got its LoRA layer, and no other module did).

    ``wanted`` and ``stray`` from :func:`file_modules`, ``applied`` per component from :func:`adapted_modules`.
    """
    left = sorted(f"{c}.{m}" for c in wanted for m in wanted[c] - applied.get(c, set()))
    extra = sorted(f"{c}.{m}" for c in applied for m in applied[c] - wanted.get(c, set()))
    total = sum(len(m) for m in wanted.values())
    parts = []
    if stray:
        parts.append(
            f"{len(stray)} keys belong to no part of an SDXL pipeline (unet, text_encoder, text_encoder_2), "
            f"e.g. {', '.join(stray[:3])}"
        )
    if left:
        parts.append(
            f"{len(left)} of its {total} LoRA modules match no module of this base model, e.g. {', '.join(left[:3])}"
        )
    if extra:
        parts.append(
            f"{len(extra)} modules got a LoRA layer without weights from the file, e.g. {', '.join(extra[:3])}"
        )
    return "; ".join(parts) or None


def _tmp_name(name: str) -> str:
    return f".{name}.tmp{os.getpid()}"


def _finish(tmp: Path, final: Path) -> Path:
    """Sorted header (equal weights give equal bytes), then the final name."""
    from core.io import canonicalize_safetensors

    canonicalize_safetensors(tmp)
    os.replace(tmp, final)
    return final


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
