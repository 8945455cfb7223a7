"""ControlNet pieces shared by training and inference that need torch: building one and the "UNet steered by a
ControlNet" forward pass (the config-level checks are in :mod:`ai.controlnet.architecture`).

* :func:`build_controlnet`: a fresh ControlNet copied from the UNet's encoder (zero convolutions, so it changes
  nothing until trained) or an existing ControlNet folder, with the conditioning channels the input kind needs,
  recording its layout (masks or box layouts) in its config (saved with it; architecture.py reads it back).
* :func:`own_forward`: the trained ControlNet without accelerate's fp32-output wrapper, for validation pipelines.
* :class:`ControlledUNet`: wraps UNet + ControlNet behind the UNet's own call signature, so the shared numerics
  (``ai.common.diffusion.unet_forward`` / ``fixed_noise_loss``) work unchanged for ControlNet training and the
  blank-versus-real condition fidelity check.
* :class:`RowCondition`: a training row's mask or box layout -> condition tensor, cropped with the image's own
  plan (nearest neighbour), for :class:`ai.common.data.SDXLDataset` (picklable, so data workers can run it).
* :func:`check_mask_sizes`: before training, every row's condition file has its image's size and the layout the
  run trains on (header reads only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ai.common import data
from ai.controlnet import conditioning
from ai.controlnet.architecture import (
    CONDITIONING_KEY,
    check_controlnet_fits,
    check_init_layout,
    conditioning_record,
    read_model_config,
    resolve_controlnet,
)
from core.cli import UserError
from vocab import layouts

#: The parts of a UNet that ``ControlNetModel.from_unet`` copies, under the same names in both models.
UNET_PARTS = (
    "conv_in",
    "time_proj",
    "time_embedding",
    "class_embedding",
    "add_embedding",
    "down_blocks",
    "mid_block",
)


def build_controlnet(
    unet,
    kind: str,
    init_from: str | None = None,
    conditioning_embedding_out_channels: tuple[int, ...] | None = None,
    embedding_init: str = "kaiming",
    unet_weights: Sequence[Path] | None = None,
    layout: str = layouts.UNMARKED,
):
    """A ControlNet for ``unet`` taking ``kind`` conditions of ``layout`` (fresh from the UNet, or loaded from
    ``init_from``, which must have been trained on the same layout). Its config records the layout and encoding
    (:func:`record_conditioning`), so its saved folders say what they take.

    ``embedding_init="kaiming"`` re-initialises the condition encoder's hidden convolutions (not its zero output
    convolution) variance-preserving with zero biases: with PyTorch's default init the mask's signal shrinks
    about 100x through its 7 convolutions and drowns in the accumulated biases (~1 % of the features), so the
    ControlNet takes far longer to start following the mask.

    A fresh ControlNet trains in fp32 from the UNet's fp32 weights. A UNet loaded in bf16/fp16 (to save host
    memory) would give it rounded ones: with ``unet_weights`` (the UNet's safetensors files, holding what the UNet
    was loaded from) the copied tensors are read from them one by one instead.
    """
    from diffusers import ControlNetModel

    channels = conditioning.channels_for(kind, layout)
    if init_from is None:
        extra = {}
        if conditioning_embedding_out_channels is not None:
            extra["conditioning_embedding_out_channels"] = tuple(conditioning_embedding_out_channels)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=channels, **extra)
        if unet_weights is not None and any(p.dtype != torch.float32 for p in unet.parameters()):
            _copy_unet_parts(controlnet, unet_weights)
        if embedding_init == "kaiming":
            embedding = controlnet.controlnet_cond_embedding
            for conv in (embedding.conv_in, *embedding.blocks):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                torch.nn.init.zeros_(conv.bias)
        return record_conditioning(controlnet, layout, kind)
    cfg = read_model_config(resolve_controlnet(init_from))
    check_init_layout(cfg, init_from, layout)
    check_controlnet_fits(cfg, dict(unet.config), init_from, "model.pretrained_model")
    if cfg.get("conditioning_channels", 3) != channels:
        raise UserError(
            f"ControlNet {init_from} takes {cfg.get('conditioning_channels', 3)} conditioning channels but "
            f"controlnet.conditioning={kind} gives {channels}: set controlnet.conditioning="
            f"{conditioning.kind_for_channels(cfg.get('conditioning_channels', 3), init_from, layout)}"
        )
    return record_conditioning(ControlNetModel.from_pretrained(init_from), layout, kind)


def record_conditioning(controlnet, layout: str, kind: str):
    """Write the layout and encoding into the ControlNet's config (saved into config.json with it)."""
    channels = conditioning.channels_for(kind, layout)
    controlnet.register_to_config(**{CONDITIONING_KEY: conditioning_record(layout, kind, channels)})
    return controlnet


@torch.no_grad()
def _copy_unet_parts(controlnet, files: Sequence[Path]) -> None:
    """Overwrite the tensors ``from_unet`` copied with the UNet file's values (as stored: what an fp32 load gives)."""
    from safetensors import safe_open

    state = controlnet.state_dict()  # shares storage with the parameters
    wanted = {k for k in state if k.split(".", 1)[0] in UNET_PARTS}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in wanted.intersection(fh.keys()):
                state[key].copy_(fh.get_tensor(key))
                wanted.discard(key)
    if wanted:
        raise UserError(
            f"the UNet weights {', '.join(map(str, files))} lack {len(wanted)} tensor(s) a ControlNet copies, e.g. "
            f"{sorted(wanted)[0]}: the model folder is incomplete or not an SDXL UNet"
        )


@contextmanager
def own_forward(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block ``model`` runs its class's own forward.

    Under mixed precision ``accelerator.prepare`` replaces a model's ``forward`` (an instance attribute) with one
    that autocasts and returns fp32. In a validation pipeline those fp32 residuals would promote the bf16/fp16
    UNet's skip connections to fp32 mid-network; the plain forward under the caller's autocast gives them in the
    UNet's dtype, from the trained weights themselves (no copy of a 1.25B-parameter model per validation).
    """
    patched = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if patched is not None:
            model.forward = patched


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
    """(row, crop plan) -> condition tensor: the row's mask or box layout read as ids (refused when of the other
    layout), cropped like its image, nearest-neighbour."""

    def __init__(self, kind: str, layout: str = layouts.UNMARKED):
        conditioning.channels_for(kind, layout)  # validates the kind and the layout
        self.kind, self.layout = kind, layout

    def ids(self, row: data.Row, plan: data.CropPlan):
        name = row.conditioning if isinstance(row.conditioning, str) else f"row {row.index} conditioning"
        ids = conditioning.read_ids(
            row.conditioning,
            expected_size=row.size,
            name=name,
            image_name=row.name or None,
            layout=self.layout,
        )
        return data.apply_plan(ids, plan, data.Image.Resampling.NEAREST)

    def __call__(self, row: data.Row, plan: data.CropPlan) -> torch.Tensor:
        return conditioning.ids_to_tensor(self.ids(row, plan), self.kind, self.layout)


def check_mask_sizes(rows, limit: int = 10, layout: str = layouts.UNMARKED) -> None:
    """Every row's condition file must have its image's size and be of ``layout`` (marked in its PNG header;
    unmarked files are masks): read from the headers, fast; lists the mismatches."""
    from PIL import Image

    bad, other = [], []
    for row in rows:
        if not isinstance(row.conditioning, str):
            continue
        try:
            with Image.open(row.conditioning) as im:
                size, found = im.size, layouts.of_image(im).name
        except FileNotFoundError:
            bad.append(f"{row.conditioning}: not found (mask of {row.name or row.image})")
            continue
        except OSError as exc:
            bad.append(f"{row.conditioning}: unreadable ({exc})")
            continue
        if found != layout:
            other.append((str(row.conditioning), found))
        if tuple(size) != tuple(row.size):
            bad.append(
                f"mask {row.conditioning} is {size[0]}x{size[1]} but its image {row.name or row.image} is "
                f"{row.size[0]}x{row.size[1]}"
            )
    if other:
        raise conditioning.training_layout_error(other, len(rows), layout, limit)
    if bad:
        more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        raise UserError(
            f"{len(bad)} conditioning mask(s) do not fit their images{more}:\n  " + "\n  ".join(bad[:limit])
        )
