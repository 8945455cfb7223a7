"""ControlNet pieces shared by training and inference: building one, checking it fits the base UNet, and the
"UNet steered by a ControlNet" forward pass.

* :func:`build_controlnet`: a fresh ControlNet copied from the UNet's encoder (zero convolutions, so it changes
  nothing until trained) or an existing ControlNet folder, with the conditioning channels the input kind needs.
* :func:`check_fits_unet`: a ControlNet config that cannot steer this UNet is refused with the differing keys,
  before any weights are loaded.
* :class:`ControlledUNet`: wraps UNet + ControlNet behind the UNet's own call signature, so the shared numerics
  (``ai.common.diffusion.unet_forward`` / ``fixed_noise_loss``) work unchanged for ControlNet training and the
  blank-versus-real condition fidelity check.
* :class:`RowCondition`: a training row's mask -> condition tensor, cropped with the image's own plan (nearest
  neighbour), for :class:`ai.common.data.SDXLDataset` (picklable, so data workers can run it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ai.common import data
from ai.common.cli import UserError
from ai.controlnet import conditioning

#: UNet config keys a ControlNet copies from its UNet (``ControlNetModel.from_unet``): all must agree.
ARCHITECTURE_KEYS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "use_linear_projection",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


def read_model_config(path_or_id: str | Path, subfolder: str | None = None) -> dict[str, Any]:
    """A diffusers model's config.json: read from disk for a local folder, via diffusers for a hub id."""
    from ai.common.models import is_local, local_files_only

    if is_local(path_or_id):
        path = Path(path_or_id) / (subfolder or "") / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
    from diffusers import ConfigMixin

    try:
        return dict(
            ConfigMixin.load_config(
                str(path_or_id),
                subfolder=subfolder,
                local_files_only=local_files_only(path_or_id),
            )
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of {path_or_id}: {exc}".replace("\n", " ")) from None


def resolve_controlnet(path: str) -> Path | str:
    """The ControlNet folder (``config.json`` + weights): ``path`` itself or its ``controlnet/`` (a training run)."""
    from ai.common.models import is_local

    if not is_local(path):
        return path  # hub id: checked when its config is read
    p = Path(path)
    if not p.is_dir():
        parent = p.parent
        found = ", ".join(sorted(c.name for c in parent.iterdir())) if parent.is_dir() else "does not exist"
        raise UserError(
            f"ControlNet folder not found: {p} ({parent}: {found or 'empty'}); set paths.controlnet_path to the "
            "folder training writes (<runs_dir>/<name>/controlnet)"
        )
    for folder in (p, p / "controlnet"):
        if (folder / "config.json").is_file():
            weights = [c for c in folder.iterdir() if c.suffix in (".safetensors", ".bin")]
            if not weights:
                raise UserError(f"ControlNet folder {folder} has config.json but no weights (*.safetensors)")
            return folder
    found = ", ".join(sorted(c.name for c in p.iterdir())) or "nothing"
    raise UserError(
        f"{p} is not a ControlNet folder (no config.json; found: {found}); point paths.controlnet_path at the "
        "folder with config.json and diffusion_pytorch_model.safetensors (training writes <runs_dir>/<name>/controlnet)"
    )


def _as_list(value: Any, n: int) -> Any:
    """Per-block settings written as one number or a list compare equal when they mean the same."""
    if isinstance(value, int) and not isinstance(value, bool) and n:
        return [value] * n
    return list(value) if isinstance(value, list | tuple) else value


def check_controlnet_fits(controlnet: dict, unet: dict, controlnet_name: str, base_name: str) -> None:
    """Refuse a ControlNet built for another UNet architecture (before any weights load)."""
    class_name = controlnet.get("_class_name", "ControlNetModel")
    if class_name != "ControlNetModel":
        raise UserError(f"{controlnet_name} is a {class_name}, not a ControlNetModel (its config.json)")
    n = len(unet.get("block_out_channels") or ())
    differences = [
        f"{key} {controlnet[key]} vs the UNet's {unet[key]}"
        for key in ARCHITECTURE_KEYS
        if key in controlnet and key in unet and _as_list(controlnet[key], n) != _as_list(unet[key], n)
    ]
    if differences:
        raise UserError(
            f"ControlNet {controlnet_name} does not fit the base model {base_name}: {'; '.join(differences)}. "
            "A ControlNet works only with the UNet architecture it was trained on (SDXL with SDXL); train one on "
            "this base model or point paths.base_model_path at the model it was trained on"
        )


def build_controlnet(
    unet,
    kind: str,
    init_from: str | None = None,
    conditioning_embedding_out_channels: tuple[int, ...] | None = None,
    embedding_init: str = "kaiming",
):
    """A ControlNet for ``unet`` taking ``kind`` conditions (fresh from the UNet, or loaded from ``init_from``).

    ``embedding_init="kaiming"`` re-initialises the condition encoder's hidden convolutions (not its zero output
    convolution) variance-preserving with zero biases: with PyTorch's default init the mask's signal shrinks
    about 100x through its 7 convolutions and drowns in the accumulated biases (~1 % of the features), so the
    ControlNet takes far longer to start following the mask.
    """
    from diffusers import ControlNetModel

    channels = conditioning.channels_for(kind)
    if init_from is None:
        extra = {}
        if conditioning_embedding_out_channels is not None:
            extra["conditioning_embedding_out_channels"] = tuple(conditioning_embedding_out_channels)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=channels, **extra)
        if embedding_init == "kaiming":
            embedding = controlnet.controlnet_cond_embedding
            for conv in (embedding.conv_in, *embedding.blocks):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                torch.nn.init.zeros_(conv.bias)
        return controlnet
    cfg = read_model_config(resolve_controlnet(init_from))
    check_controlnet_fits(cfg, dict(unet.config), init_from, "model.pretrained_model")
    if cfg.get("conditioning_channels", 3) != channels:
        raise UserError(
            f"ControlNet {init_from} takes {cfg.get('conditioning_channels', 3)} conditioning channels but "
            f"controlnet.conditioning={kind} gives {channels}: set controlnet.conditioning="
            f"{conditioning.kind_for_channels(cfg.get('conditioning_channels', 3), init_from)}"
        )
    return ControlNetModel.from_pretrained(init_from)


def fuse_lora(comps, lora_path: str, scale: float = 1.0) -> None:
    """Fuse a trained SDXL LoRA (file, run or checkpoint folder) into the frozen UNet and the text encoders it has
    layers for, as inference with ``fuse_lora`` does."""
    from ai.common.generation import resolve_lora_file
    from ai.common.pipelines import load_lora
    from ai.common.validation import sdxl_pipeline

    pipe = sdxl_pipeline(comps, comps.unet, comps.text_encoder, comps.text_encoder_2, comps.vae)
    load_lora(pipe, resolve_lora_file(lora_path, key="controlnet.fuse_lora"), scale, fuse=True)


class ControlledUNet(torch.nn.Module):
    """UNet + ControlNet with the UNet's call signature; the condition is set with :meth:`set_condition`.

    The UNet is registered first, so ``next(parameters())`` gives the UNet's dtype as the shared numerics expect.
    """

    def __init__(self, unet, controlnet, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.conditioning_scale = conditioning_scale
        self.condition: torch.Tensor | None = None

    def set_condition(self, condition: torch.Tensor) -> ControlledUNet:
        self.condition = condition
        return self

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict: bool = False):
        cond = self.condition
        if cond is None:
            raise RuntimeError("ControlledUNet called without a condition (set_condition first)")
        if cond.shape[0] != sample.shape[0]:
            cond = cond.expand(sample.shape[0], -1, -1, -1)
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond.to(sample.dtype),
            conditioning_scale=self.conditioning_scale, added_cond_kwargs=added_cond_kwargs, return_dict=False,
        )  # fmt: skip
        dtype = sample.dtype
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=[d.to(dtype) for d in down], mid_block_additional_residual=mid.to(dtype),
            return_dict=return_dict,
        )  # fmt: skip


class RowCondition:
    """(row, crop plan) -> condition tensor: the row's mask read as ids, cropped like its image, nearest-neighbour."""

    def __init__(self, kind: str):
        conditioning.channels_for(kind)  # validates the kind
        self.kind = kind

    def ids(self, row: data.Row, plan: data.CropPlan):
        name = row.conditioning if isinstance(row.conditioning, str) else f"row {row.index} conditioning"
        ids = conditioning.read_ids(
            row.conditioning, expected_size=row.size, name=name, image_name=row.name or None
        )
        return data.apply_plan(ids, plan, data.Image.Resampling.NEAREST)

    def __call__(self, row: data.Row, plan: data.CropPlan) -> torch.Tensor:
        return conditioning.ids_to_tensor(self.ids(row, plan), self.kind)


def check_mask_sizes(rows, limit: int = 10) -> None:
    """Every row's mask must have its image's size (read from the PNG headers, fast); lists the mismatches."""
    from PIL import Image

    bad = []
    for row in rows:
        if not isinstance(row.conditioning, str):
            continue
        try:
            with Image.open(row.conditioning) as im:
                size = im.size
        except FileNotFoundError:
            bad.append(f"{row.conditioning}: not found (mask of {row.name or row.image})")
            continue
        except OSError as exc:
            bad.append(f"{row.conditioning}: unreadable ({exc})")
            continue
        if tuple(size) != tuple(row.size):
            bad.append(
                f"mask {row.conditioning} is {size[0]}x{size[1]} but its image {row.name or row.image} is "
                f"{row.size[0]}x{row.size[1]}"
            )
    if bad:
        more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        raise UserError(
            f"{len(bad)} conditioning mask(s) do not fit their images{more}:\n  " + "\n  ".join(bad[:limit])
        )
