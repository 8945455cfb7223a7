"""Config sections every generation config shares (LoRA and ControlNet inference), and the output-size rules.

:mod:`ai.common.generation` (prompts, work list, run loop) and :mod:`ai.common.pipelines` (building and running the
pipeline) both build on this module, which imports neither: the three form no import cycle. No torch here
either (a ``--check`` that needs no model need not load it). Every key is documented in config/lora_infer.yaml.

Output sizes: SDXL was trained on aspect buckets whose sides are multiples of 64 near 1024x1024 pixels (1344x768
for a 16:9 frame). Any multiple of 8 works (the UNet resizes its skip connections when the latent does not divide
by its downsampling factor; 1280x720 is 160x90 latents), but the model is at home on its buckets. With
``resolution.generate_at_bucket`` an image is generated at the bucket nearest the requested size's aspect and then
resized (a stretch, never a crop) to the requested size, so BDD100K-sized 1280x720 frames come from a 1344x768
generation and a mask's geometry and its frame's boxes stay in the same pixel space. :class:`OutputSize` is the
pair (generated at, saved at) that each image's metadata records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from ai.common.models import ModelSource
from core.config import Section

Size = tuple[int, int]
#: Name -> (diffusers scheduler class, extra config). Built with ``from_config`` of the model's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),  # whatever the model folder ships (SDXL base: Euler)
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpm++_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
}
SchedulerName = Literal[tuple(SCHEDULERS)]  # the config accepts exactly these names


def check_multiple_of_8(value: int | None) -> int | None:
    if value is not None and (value <= 0 or value % 8):
        raise ValueError(f"must be a positive multiple of 8 (the VAE works on 8x8 pixel blocks), got {value}")
    return value


class GenerationPaths(Section):
    infer_path: str = "inference_outputs"


class Resolution(Section):
    """The size of the saved images; ``generate_at_bucket``: generate at the nearest SDXL bucket, then resize."""

    width: int = 1024
    height: int = 1024
    generate_at_bucket: bool = False

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        return check_multiple_of_8(value)


class Speed(Section):
    attention: Literal["sdpa", "xformers"] = "sdpa"
    channels_last: bool = False
    torch_compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    vae_slicing: bool = False
    vae_tiling: bool = False


class GenerationConfig(Section):
    """Keys every generation config has; scripts subclass it and narrow ``paths``."""

    #: The names before generation took training's (``model.*``): still read, with a warning.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "paths.base_model_path": "model.pretrained_model",
        "paths.vae_path": "model.vae",
        "paths.variant": "model.variant",
    }

    model: ModelSource = ModelSource()
    paths: GenerationPaths = GenerationPaths()
    prompt: str | None = None
    prompts: list[str] = []
    prompts_file: str | None = None
    captions_csv: str | None = None
    captions_column: str = "text"
    max_prompts: int | None = Field(None, ge=1)
    negative_prompt: str | None = None
    images_per_prompt: int = Field(1, ge=1)
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: SchedulerName = "euler"
    seed: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    device: str = "auto"
    on_error: Literal["stop", "skip"] = "stop"
    overwrite: bool = False
    resolution: Resolution = Resolution()
    speed: Speed = Speed()

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        base = value.split(":")[0]
        if base not in ("auto", "cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"use auto, cpu, cuda, cuda:N, mps or xpu, got {value!r}")
        return value


# ---------------------------------------------------------------------------------------------------------------
# Output sizes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputSize:
    """Where one image is generated and the size it is saved at (equal unless resized from a bucket)."""

    generated: Size
    saved: Size

    def record(self) -> dict[str, int]:
        """The metadata fields: ``width``/``height`` of the saved PNG, ``generated_width``/``_height``."""
        return {
            "width": self.saved[0],
            "height": self.saved[1],
            "generated_width": self.generated[0],
            "generated_height": self.generated[1],
        }


@dataclass(frozen=True)
class BucketGrid:
    """The model's native side and its SDXL aspect buckets, from its UNet and VAE configs (no weights).

    Buckets hold ~native^2 pixels with sides that survive the VAE (x8) and every UNet downsampling; at SDXL's
    1024 px they step by 64 (the SDXL paper's set: 1344x768, 1216x832, ...), on the tiny test model (128 px) by 16.
    """

    native: int
    buckets: tuple[Size, ...]

    @classmethod
    def from_configs(cls, unet: Mapping[str, Any], vae: Mapping[str, Any]) -> BucketGrid:
        from ai.common.data import sdxl_buckets

        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        native = int(unet["sample_size"]) * vae_factor
        multiple = vae_factor * 2 ** (len(unet["block_out_channels"]) - 1)
        step = math.ceil(max(native // 16, multiple) / multiple) * multiple
        if native % step:
            step = multiple
        return cls(native, tuple(sdxl_buckets(native, step)))

    def nearest(self, size: Size) -> Size:
        from ai.common.data import nearest_bucket

        return nearest_bucket(size, self.buckets)

    def output_size(self, requested: Size, generate_at_bucket: bool) -> OutputSize:
        """``requested`` itself, or generated at its nearest bucket and saved at ``requested``."""
        return OutputSize(self.nearest(requested) if generate_at_bucket else requested, requested)
