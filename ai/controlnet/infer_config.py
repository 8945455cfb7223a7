"""The schema of config/controlnet_infer.yaml (every key is documented there), apart from the script.

Both the script (ai/controlnet/infer_controlnet_sdxl.py) and its inputs module (ai/controlnet/masks.py) read it;
holding it here lets them import it without importing each other. No torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ai.common.generation_config import GenerationConfig, GenerationPaths, check_multiple_of_8
from core.config import Section
from vocab import layouts

#: Keys of the shared prompt list that do not apply here (each mask gets its own caption).
UNUSED_PROMPT_KEYS = ("prompts", "prompts_file", "captions_csv")


class ControlNetInferPaths(GenerationPaths):
    controlnet_path: str = "runs/controlnet_train/controlnet"
    lora_weights_path: str | None = None
    masks_path: str = "bdd100k/labels/sem_seg/masks/val"
    captions_path: str | None = "captions/val"
    source_labels: str | None = None
    plan: str | None = None  # a generation plan (plan.jsonl): used instead of masks_path/captions_path
    infer_path: str = "inference_outputs/controlnet"


class ControlNetResolution(Section):
    """Both null: each mask's nearest SDXL bucket; both set: one fixed size (multiples of 8).

    ``generate_at_bucket``: generate at the bucket nearest the requested size and resize the image to it; with
    both sizes null the requested size is each mask's own size (a 1280x720 mask: 1344x768 generated, 1280x720
    saved).
    """

    width: int | None = None
    height: int | None = None
    generate_at_bucket: bool = False

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        try:
            return check_multiple_of_8(value)
        except ValueError as exc:
            raise ValueError(f"{exc} (or null: each mask's nearest bucket)") from None

    @field_validator("height")
    @classmethod
    def _both_or_neither(cls, value: int | None, info) -> int | None:
        if "width" in info.data and (value is None) != (info.data["width"] is None):
            raise ValueError(
                "set both width and height (a fixed size) or neither (each mask's nearest bucket)"
            )
        return value

    @property
    def fixed(self) -> tuple[int, int] | None:
        return (self.width, self.height) if self.width is not None else None


class ControlNetInferConfig(GenerationConfig):
    paths: ControlNetInferPaths = ControlNetInferPaths()
    resolution: ControlNetResolution = ControlNetResolution()
    conditioning: Literal[("auto", *layouts.ENCODINGS)] = "auto"
    layout: Literal[("auto", *layouts.NAMES)] = "auto"  # auto: what the ControlNet's config.json records
    controlnet_conditioning_scale: float = Field(1.0, ge=0)
    control_guidance_start: float = Field(0.0, ge=0, le=1)
    control_guidance_end: float = Field(1.0, ge=0, le=1)
    lora_scale: float = 1.0
    fuse_lora: bool = False
    side_by_side: bool = True

    @field_validator(*UNUSED_PROMPT_KEYS)
    @classmethod
    def _one_caption_per_mask(cls, value, info):
        if value:
            raise ValueError(
                f"{info.field_name} is not used by ControlNet inference: each mask's prompt comes from "
                "paths.captions_path (a captions folder or the stage 1 CSV) or from prompt (one for all masks)"
            )
        return value

    @field_validator("control_guidance_end")
    @classmethod
    def _end_after_start(cls, value: float, info) -> float:
        start = info.data.get("control_guidance_start")
        if start is not None and value <= start:
            raise ValueError(f"must be greater than control_guidance_start ({start}), got {value}")
        return value
