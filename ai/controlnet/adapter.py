"""What of the ControlNet trains (``controlnet.adapter``): all of it, or LoRA layers on its frozen encoder copy.

``full``: the ControlNet as diffusers trains it, every parameter in fp32 (1.25B at SDXL size: ~10 GB of AdamW
state). ``lora`` (ControlNet-LoRA): the copy of the UNet's encoder stays frozen, in the precision the UNet is
frozen in, with peft LoRA layers on it; only the LoRA layers, the condition encoder
(``controlnet_cond_embedding``) and the zero convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``)
train, so the optimizer state and the checkpoints hold those alone.

A LoRA run exports, beside the merged ``controlnet/`` folder (a plain ``ControlNetModel``, loaded as today), a
``controlnet_adapter/`` folder: the ControlNet's config.json and :data:`ADAPTER_FILE` (the trained tensors, fp32,
and in its metadata the LoRA settings and probes of the base encoder). Inference rebuilds the ControlNet from the
user's base UNet, checks the probes (a different base model is refused) and applies the adapter.

Each kind is one entry of :data:`ADAPTERS`; the trainer and the inference script call its functions only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import UserError

ADAPTER_FILE = "controlnet_adapter.safetensors"
ADAPTER_FOLDER = "controlnet_adapter"
#: The ControlNet modules that train in a ControlNet-LoRA besides the LoRA layers (fresh, not in the UNet).
TRAINED_MODULES = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
#: The encoder's frozen tensors probed to recognise the base model (count, elements read of each).
PROBES, PROBE_ELEMENTS = 16, 4096
#: Probe distance (relative to the probed elements' norm) above which the base is another model: bf16 rounding
#: of the same weights moves a probe by ~2e-3, a fine-tuned SDXL by far more.
PROBE_TOLERANCE = 1e-2


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


def _plain(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _trained(name: str) -> bool:
    return name.split(".", 1)[0] in TRAINED_MODULES


def base_probes(controlnet) -> list[list]:
    """[name, value, norm] of ``PROBES`` frozen encoder tensors: each one's first ``PROBE_ELEMENTS`` values dotted
    with a fixed ±1 vector (and their norm), for recognising the base model across precisions."""
    import torch

    frozen = [
        (_plain(n), p) for n, p in controlnet.named_parameters() if not _trained(n) and ".lora_" not in n
    ]
    frozen.sort(key=lambda item: item[0])
    step = max(1, len(frozen) // PROBES)
    signs = torch.ones(PROBE_ELEMENTS)
    signs[
        torch.randperm(PROBE_ELEMENTS, generator=torch.Generator().manual_seed(0))[: PROBE_ELEMENTS // 2]
    ] = -1
    out = []
    for name, p in frozen[::step][:PROBES]:
        v = p.detach().reshape(-1)[:PROBE_ELEMENTS].float().cpu()
        out.append([name, float(v @ signs[: v.numel()]), float(v.norm())])
    return out


def check_probes(recorded: list[list], controlnet, adapter: str, base: str) -> None:
    """Refuse ``adapter`` on a ControlNet built from a base whose encoder is not the one it was trained on."""
    now = {name: (value, norm) for name, value, norm in base_probes(controlnet)}
    for name, value, norm in recorded:
        if name not in now:
            raise UserError(
                f"{adapter} was trained on a model with {name}, which {base} lacks: another model"
            )
        if abs(now[name][0] - value) > PROBE_TOLERANCE * max(norm, 1e-12):
            raise UserError(
                f"{adapter} was trained on another base model than {base} (its encoder weights differ, e.g. {name}):"
                " a ControlNet-LoRA only fits the base it was trained on. Set model.pretrained_model to that model,"
                " or use the merged ControlNet folder (controlnet/ of the training run) instead"
            )


# ---------------------------------------------------------------------------------------------------------------
# ControlNet-LoRA
# ---------------------------------------------------------------------------------------------------------------


def add_lora(controlnet, settings: LoraSettings, frozen_dtype) -> None:
    """Freeze ``controlnet``, add LoRA layers to its encoder copy, and leave :data:`TRAINED_MODULES` trainable.
    Frozen tensors go to ``frozen_dtype``, trained ones stay fp32."""
    import torch
    from peft import LoraConfig

    controlnet.requires_grad_(False)
    try:
        controlnet.add_adapter(
            LoraConfig(
                r=settings.rank,
                lora_alpha=settings.alpha,
                target_modules=list(settings.target_modules),
                exclude_modules=[n for n, _ in controlnet.named_modules() if _trained(n)] or None,
                init_lora_weights=True,  # B = 0: the ControlNet starts as the fresh full one does
            )
        )
    except ValueError as exc:
        raise UserError(f"controlnet.lora_target_modules {list(settings.target_modules)}: {exc}") from None
    for name, p in controlnet.named_parameters():
        if _trained(name):
            p.requires_grad_(True)
        p.data = p.data.to(torch.float32 if p.requires_grad else frozen_dtype)


def trainable_state(controlnet) -> dict[str, Any]:
    return {n: p for n, p in controlnet.named_parameters() if p.requires_grad}


def load_trainable_state(controlnet, path: Path) -> None:
    """Copy an adapter file's tensors into the trainable parameters (names and shapes must match exactly)."""
    from core.io import load_safetensors_into

    load_safetensors_into(
        trainable_state(controlnet), path, "this ControlNet-LoRA (another rank, targets or layout?)"
    )


class MergedState(Mapping):
    """A ControlNet-LoRA's tensors as a plain ``ControlNetModel`` state dict, LoRA merged in fp32, computed one
    tensor at a time (for :func:`core.io.save_safetensors`: no second model in host memory)."""

    def __init__(self, controlnet):
        from peft.tuners.lora import LoraLayer

        self.state = controlnet.state_dict()
        self.lora = {n: m for n, m in controlnet.named_modules() if isinstance(m, LoraLayer)}
        self.names = {_plain(n): n for n in self.state if ".lora_" not in n}

    def __getitem__(self, name: str):
        module = name.rsplit(".", 1)[0]
        if module in self.lora and name.endswith(".weight"):
            layer = self.lora[module]
            base = layer.get_base_layer().weight.detach().float()
            return base + layer.get_delta_weight("default").detach().float().reshape(base.shape)
        return self.state[self.names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def save_merged(controlnet, folder: Path, dtype) -> Path:
    """The merged ControlNet as a diffusers folder (``ControlNetModel.from_pretrained`` loads it)."""
    from core.io import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    controlnet.save_config(folder)
    save_safetensors(
        folder / "diffusion_pytorch_model.safetensors", MergedState(controlnet), dtype, {"format": "pt"}
    )
    return folder


def save_adapter(controlnet, folder: Path, settings: LoraSettings, probes: list[list]) -> Path:
    """``folder``/config.json and :data:`ADAPTER_FILE` (trained tensors in fp32, settings and probes in metadata)."""
    from core.io import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    controlnet.save_config(folder)
    meta = {
        "format": "pt",
        "adapter": "lora",
        "rank": str(settings.rank),
        "alpha": str(settings.alpha),
        "target_modules": json.dumps(list(settings.target_modules)),
        "base_probes": json.dumps(probes),
    }
    save_safetensors(folder / ADAPTER_FILE, trainable_state(controlnet), None, meta)
    return folder


def is_adapter_folder(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def read_adapter_meta(path: Path) -> tuple[LoraSettings, list[list]]:
    from safetensors import safe_open

    file = Path(path) / ADAPTER_FILE
    try:
        with safe_open(os.fspath(file), framework="pt") as f:
            meta = f.metadata() or {}
        settings = LoraSettings(
            int(meta["rank"]), float(meta["alpha"]), tuple(json.loads(meta["target_modules"]))
        )
        return settings, json.loads(meta["base_probes"])
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(
            f"{file}: not a ControlNet-LoRA adapter written by ai/controlnet/train_controlnet_sdxl.py ({exc})"
        ) from None


def controlnet_from_adapter(folder: Path, unet, base_name: str):
    """A ControlNet for ``unet`` (the user's base model) with the adapter in ``folder`` merged in, in the UNet's
    dtype; refused when ``unet`` is not the base it was trained on.

    The copy is built in the UNet's precision (no fp32 ControlNet in host memory: 5 GB at SDXL size) and the LoRA
    is fused into it in place (diffusers' ``fuse_lora``/``unload_lora`` on peft's layers)."""
    import torch
    from diffusers import ControlNetModel

    from ai.controlnet.architecture import read_model_config

    config = read_model_config(folder)
    settings, probes = read_adapter_meta(folder)
    extra = {
        k: config[k] for k in ("conditioning_channels", "conditioning_embedding_out_channels") if k in config
    }
    dtype = next(unet.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        controlnet = ControlNetModel.from_unet(unet, **extra)
    finally:
        torch.set_default_dtype(previous)
    check_probes(probes, controlnet, str(folder), base_name)
    add_lora(controlnet, settings, dtype)
    load_trainable_state(controlnet, folder / ADAPTER_FILE)
    controlnet.fuse_lora()
    controlnet.unload_lora()
    return controlnet.to(dtype).requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------------------
# The table the trainer reads
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """How one kind prepares the ControlNet, checkpoints it and exports it. ``settings`` is None for ``full``;
    ``probes`` are :func:`base_probes` of the fresh ControlNet (recorded in LoRA adapters)."""

    #: (controlnet, settings, frozen dtype) -> None: what trains, in which dtype
    prepare: Callable[..., None]
    #: (controlnet, checkpoint folder, settings, probes) -> None, main process: the ControlNet's training state
    save_state: Callable[..., None]
    #: (controlnet, checkpoint folder) -> None
    load_state: Callable[[Any, Path], None]
    #: (controlnet, folder, dtype, settings, probes) -> the folders written in ``folder`` (final export)
    export: Callable[..., list[Path]]


def _full_prepare(controlnet, settings, frozen_dtype) -> None:
    import torch

    controlnet.to(dtype=torch.float32)  # trained in fp32; autocast gives the mixed precision


def _full_save(controlnet, folder: Path, settings, probes) -> None:
    from core.io import save_model

    save_model(controlnet, folder / "controlnet")  # fp32, streamed: no host copy of the model


def _full_load(controlnet, folder: Path) -> None:
    from core.io import load_safetensors_into

    load_safetensors_into(controlnet, folder / "controlnet" / "diffusion_pytorch_model.safetensors")


def _full_export(controlnet, folder: Path, dtype, settings, probes) -> list[Path]:
    from core.io import save_model

    return [save_model(controlnet, folder / "controlnet", dtype)]


def _lora_save(controlnet, folder: Path, settings, probes) -> None:
    save_adapter(controlnet, folder / ADAPTER_FOLDER, settings, probes)  # inference can use it as it is


def _lora_load(controlnet, folder: Path) -> None:
    load_trainable_state(controlnet, folder / ADAPTER_FOLDER / ADAPTER_FILE)


def _lora_export(controlnet, folder: Path, dtype, settings, probes) -> list[Path]:
    return [
        save_merged(controlnet, folder / "controlnet", dtype),
        save_adapter(controlnet, folder / ADAPTER_FOLDER, settings, probes),
    ]


ADAPTERS: dict[str, Adapter] = {
    "full": Adapter(_full_prepare, _full_save, _full_load, _full_export),
    "lora": Adapter(add_lora, _lora_save, _lora_load, _lora_export),
}
