"""Generate traffic scenes whose layout follows BDD100K segmentation masks or box layouts, with an SDXL ControlNet.

Usage:
    bash ai/controlnet/run_controlnet_infer.sh [config/controlnet_infer.yaml] [key=value ...]
    accelerate launch -m ai.controlnet.infer_controlnet_sdxl --config config/controlnet_infer.yaml [key=value ...]
    python ai/controlnet/infer_controlnet_sdxl.py --config config/demo/controlnet_infer.yaml --check  # validate only

Inputs: a folder of masks (label-id PNGs, colormaps or official-palette renderings; ai/controlnet/conditioning.py),
each with its caption matched by base name from a captions folder (``<name>.txt``) or the stage 1 ControlNet CSV
(image,conditioning_image,text), or one ``prompt`` for all. Each mask is resized with nearest neighbour to the
generation size (by default the SDXL bucket nearest its aspect, at the model's native size), turned into the
ControlNet's input (palette RGB or one-hot, read from the ControlNet's ``conditioning_channels``; masks or box
layouts, as its config.json records: a folder of the other layout is refused) and passed to
diffusers' ``StableDiffusionXLControlNetPipeline``; an optional LoRA adds a style. With
``resolution.generate_at_bucket`` the image is then resized (stretched like the mask) to the requested size: the
fixed one, or with none the mask's own, so a 1280x720 frame's boxes fit its generated image unscaled.

Writes ``<infer_path>/generations/<mask name>_<image index>.png``, ``<infer_path>/side_by_side/`` (mask | image),
``generations/metadata.jsonl`` (one record per image: prompt, seed, settings, ``width``/``height`` saved and
``generated_width``/``generated_height``, ``mask_path``, ``source_frame`` = ``<mask name>.jpg``, ``source_size``,
``source_labels``, ``layout`` (seg or boxes); stage 4 checks the layout against the source labels with them) and ``<infer_path>/config.resolved.yaml``. A rerun skips finished images; under ``accelerate launch`` with N
processes the work list is split across them. Prompts, seeds, resume (ai/common/generation.py), speed switches
and the optional LoRA (ai/common/pipelines.py) are shared with LoRA inference, masks, captions and side-by-side
sheets are read and written by ai/controlnet/masks.py; this file adds the ControlNet, its checks and the output
sizes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai.common.generation import (
    GENERATIONS_DIR,
    PromptEntry,
    build_work_items,
    check_base_model,
    common_info,
    common_settings,
    parse_generation_args,
    pending_work,
    resize_to,
    resolve_lora_file,
    run_generation,
)
from ai.common.generation_config import BucketGrid, OutputSize
from ai.common.models import ModelSource
from ai.common.pipelines import (
    build_sdxl_pipeline,
    call_pipeline,
    load_sdxl_parts,
    model_fingerprint,
    prepare_pipeline,
    setup_device,
)
from ai.controlnet.adapter import controlnet_from_adapter, is_adapter_folder
from ai.controlnet.architecture import (
    check_controlnet_fits,
    layout_of,
    read_model_config,
    recorded_layout,
    resolve_controlnet,
)
from ai.controlnet.conditioning import channels_for, ids_to_tensor, kind_for_channels, read_ids, resize_ids
from ai.controlnet.infer_config import (  # noqa: F401 (the schema, importable from the script as before)
    UNUSED_PROMPT_KEYS,
    ControlNetInferConfig,
    ControlNetInferPaths,
    ControlNetResolution,
)
from ai.controlnet.masks import (
    check_mask_layouts,
    fill_missing_sheets,
    list_masks,
    read_captions,
    write_sheet,
)
from ai.controlnet.plans import check_plan_controlnet, plan_entries, plan_layout
from core.cli import UserError, run_main
from core.config import load_config, save_resolved_config
from vocab import layouts

DEFAULT_CONFIG = "config/controlnet_infer.yaml"
SIDE_BY_SIDE_DIR = "side_by_side"

logger = logging.getLogger("bdd-sdxl.controlnet_infer")


# ---------------------------------------------------------------------------------------------------------------
# Config (the schema is in ai/controlnet/infer_config.py; every key is documented in config/controlnet_infer.yaml)
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None):
    return parse_generation_args(
        argv,
        prog="python -m ai.controlnet.infer_controlnet_sdxl",
        doc=__doc__,
        default_config=DEFAULT_CONFIG,
        check_help="validate config, model and ControlNet folders, masks and captions; exit",
        override_examples="paths.controlnet_path=runs/controlnet_train/controlnet controlnet_conditioning_scale=0.8 "
        "resolution.width=1344 resolution.height=768",
    )


# ---------------------------------------------------------------------------------------------------------------
# Model and ControlNet configs (read from JSON, before any weights load)
# ---------------------------------------------------------------------------------------------------------------


def controlnet_layout(cfg_layout: str, controlnet: dict, controlnet_name: str) -> str:
    """The layout the ControlNet's config.json records (none: masks); an explicit setting must agree."""
    layout = recorded_layout(controlnet, controlnet_name)
    if cfg_layout not in ("auto", layout):
        raise UserError(
            f"layout={cfg_layout} needs a ControlNet trained on {layouts.get(cfg_layout).what}, but {controlnet_name} "
            f"was trained on {layout_of(controlnet, controlnet_name)}; set layout={layout} or layout=auto"
        )
    return layout


def conditioning_kind(
    cfg_kind: str, controlnet: dict, controlnet_name: str, layout: str = layouts.UNMARKED
) -> str:
    """palette or one_hot, from the ControlNet's ``conditioning_channels``; an explicit setting must agree."""
    channels = int(controlnet.get("conditioning_channels", 3))
    kind = kind_for_channels(channels, controlnet_name, layout)
    if cfg_kind not in ("auto", kind):
        raise UserError(
            f"conditioning={cfg_kind} needs a ControlNet with {channels_for(cfg_kind, layout)} conditioning channels, but "
            f"{controlnet_name} has conditioning_channels={channels} (it takes {kind} input); set "
            f"conditioning={kind} or conditioning=auto"
        )
    return kind


@dataclass(frozen=True)
class Geometry:
    """Each mask's output size: generated at a fixed size or the mask's nearest SDXL bucket, saved at that size or
    (``generate_at_bucket``) resized to the requested one (the fixed size, or with none the mask's own size)."""

    grid: BucketGrid
    fixed: tuple[int, int] | None
    generate_at_bucket: bool = False

    @classmethod
    def for_model(cls, model: ModelSource, resolution: ControlNetResolution) -> Geometry:
        from ai.common.models import config_source, vae_config_path

        unet = read_model_config(config_source(model), "unet")
        vae_config = vae_config_path(model)  # the local config.json (a single file's: its config folder's)
        if vae_config is not None:
            vae = read_model_config(vae_config.parent)
        else:  # a hub id
            vae = (
                read_model_config(model.vae)
                if model.vae
                else read_model_config(model.pretrained_model, "vae")
            )
        return cls(BucketGrid.from_configs(unet, vae), resolution.fixed, resolution.generate_at_bucket)

    @property
    def native(self) -> int:
        return self.grid.native

    def sizes_for(self, mask_size: tuple[int, int]) -> OutputSize:
        if self.fixed is not None:
            return self.grid.output_size(self.fixed, self.generate_at_bucket)
        bucket = self.grid.nearest(mask_size)
        return OutputSize(bucket, tuple(mask_size) if self.generate_at_bucket else bucket)

    def size_for(self, mask_size: tuple[int, int]) -> tuple[int, int]:
        """The size an image for this mask is saved at."""
        return self.sizes_for(mask_size).saved

    @property
    def label(self) -> str:
        return f"{self.fixed[0]}x{self.fixed[1]}" if self.fixed else "auto"

    @property
    def description(self) -> str:
        at_bucket = ", generated at the nearest bucket and resized" if self.generate_at_bucket else ""
        size = (
            self.label
            if self.fixed
            else ("each mask's size" if self.generate_at_bucket else "each mask's bucket")
        )
        return size + at_bucket


# ---------------------------------------------------------------------------------------------------------------
# Inputs (checked before torch loads a model)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    entries: list[PromptEntry]
    missing_captions: list[str]
    controlnet: Path | str
    controlnet_config: dict[str, Any]
    kind: str
    lora_file: Path | None
    layout: str = layouts.UNMARKED  # what the ControlNet was trained on and the masks folder holds
    masks: list = field(default_factory=list)  # the folder's masks (ai/controlnet/masks.Mask)


def check_inputs(cfg: ControlNetInferConfig) -> Inputs:
    """Everything that can be checked without torch: folders, architecture, conditioning kind, masks, captions."""
    from ai.common.models import config_source, is_local

    check_base_model(cfg.model)
    controlnet = resolve_controlnet(cfg.paths.controlnet_path)
    controlnet_config = read_model_config(controlnet) if isinstance(controlnet, Path) else {}
    if controlnet_config and is_local(cfg.model.pretrained_model):
        unet = read_model_config(config_source(cfg.model), "unet")
        check_controlnet_fits(controlnet_config, unet, str(controlnet), cfg.model.pretrained_model)
    if (  # a file, or a per-image folder; a plan's records carry their labels
        cfg.paths.source_labels and not cfg.paths.plan and not Path(cfg.paths.source_labels).exists()
    ):
        raise UserError(
            f"paths.source_labels not found: {cfg.paths.source_labels} (the det_20 labels of the masks' frames, or a "
            "folder of 2018 per-image label files; "
            "config/controlnet_infer.yaml reads $BDD_DATA_DIR/labels/det_20/det_val.json, BDD_DATA_DIR from .env; "
            "null leaves them out of the metadata and stage 4's layout check off)"
        )
    lora_file = resolve_lora_file(cfg.paths.lora_weights_path)
    kind = "palette" if cfg.conditioning == "auto" else cfg.conditioning
    layout = layouts.UNMARKED if cfg.layout == "auto" else cfg.layout
    inputs = Inputs([], [], controlnet, controlnet_config, kind, lora_file, layout)
    if not cfg.paths.plan:
        inputs.masks = list_masks(cfg.paths.masks_path)
    if controlnet_config:  # a hub ControlNet's config comes through diffusers: main matches it
        match_controlnet(cfg, inputs)
    if cfg.paths.plan:  # planned scenes instead of masks and captions (ai/controlnet/plans.py)
        inputs.entries = plan_entries(cfg)
    else:
        inputs.entries, inputs.missing_captions = read_captions(cfg, inputs.masks)
    return inputs


def match_controlnet(cfg: ControlNetInferConfig, inputs: Inputs) -> None:
    """The layout and conditioning kind from the ControlNet's config (a setting other than auto must agree), and
    the masks folder or plan refused when of the other layout."""
    name, controlnet = str(inputs.controlnet), inputs.controlnet_config
    inputs.layout = controlnet_layout(cfg.layout, controlnet, name)
    inputs.kind = conditioning_kind(cfg.conditioning, controlnet, name, inputs.layout)
    if cfg.paths.plan:
        check_plan_controlnet(cfg.paths.plan, inputs.layout, controlnet, name)
    else:
        check_mask_layouts(
            inputs.masks, inputs.layout, name, layout_of(controlnet, name), cfg.paths.masks_path
        )


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def load_controlnet(controlnet: Path | str, dtype: str):
    from diffusers import ControlNetModel

    from ai.common.models import local_files_only
    from ai.common.pipelines import torch_dtype

    try:
        return ControlNetModel.from_pretrained(
            str(controlnet), dtype=torch_dtype(dtype), local_files_only=local_files_only(controlnet)
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load the ControlNet {controlnet}: {exc}".replace("\n", " ")) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(ControlNetInferConfig, args.config, args.overrides)
    inputs = check_inputs(cfg)
    if not inputs.controlnet_config:  # a hub ControlNet: its config comes through diffusers
        inputs.controlnet_config = read_model_config(inputs.controlnet)
        match_controlnet(cfg, inputs)
    from ai.common.models import is_local

    if not is_local(cfg.model.pretrained_model):
        unet_config = read_model_config(cfg.model.pretrained_model, "unet")
        check_controlnet_fits(
            inputs.controlnet_config, unet_config, str(inputs.controlnet), cfg.model.pretrained_model
        )
    geometry = Geometry.for_model(cfg.model, cfg.resolution)
    if args.check:
        print(
            f"{args.config}: ok ({len(inputs.entries)} {'planned scene(s)' if cfg.paths.plan else 'mask(s)'} x "
            f"{cfg.images_per_prompt} image(s), ControlNet "
            f"{inputs.controlnet} ({layouts.get(inputs.layout).what} as {inputs.kind} input), resolution "
            f"{geometry.description}, "
            f"LoRA {inputs.lora_file or 'none'})"
        )
        return 0

    state, device = setup_device(cfg.device, cfg.dtype)
    infer_path = Path(cfg.paths.infer_path)
    entries = []  # each mask's sizes (generated at, saved at), recorded with its images
    for entry in inputs.entries:
        sizes = geometry.sizes_for(tuple(entry.source["source_size"]))
        entries.append(PromptEntry(entry.text, {**entry.source, **sizes.record()}, entry.name))
    if state.is_main_process:
        logger.info(
            "%d mask(s), %d process(es), device %s, ControlNet %s (%s), LoRA %s",
            len(entries),
            state.num_processes,
            device,
            inputs.controlnet,
            inputs.kind,
            inputs.lora_file,
        )

    controlnet_settings = {
        "conditioning": inputs.kind,
        "controlnet_conditioning_scale": cfg.controlnet_conditioning_scale,
        "control_guidance_start": cfg.control_guidance_start,
        "control_guidance_end": cfg.control_guidance_end,
        "controlnet_fingerprint": model_fingerprint(str(inputs.controlnet)),
    }
    settings = common_settings(
        cfg,
        inputs.lora_file,
        cfg.lora_scale,
        size={"resolution": geometry.label, "generate_at_bucket": geometry.generate_at_bucket},
        method=controlnet_settings,
    )
    info = common_info(  # the layout is the ControlNet's (its fingerprint is compared on reruns)
        cfg, inputs.lora_file, cfg.fuse_lora, args.config,
        method={"controlnet_path": str(inputs.controlnet), "layout": inputs.layout},
    )  # fmt: skip
    items = build_work_items(entries, cfg.images_per_prompt, cfg.seed)
    out_dir = infer_path / GENERATIONS_DIR
    sheets_dir = infer_path / SIDE_BY_SIDE_DIR
    work = pending_work(items, out_dir, settings, overwrite=cfg.overwrite, state=state)
    if not work.todo:
        if state.is_main_process:
            infer_path.mkdir(parents=True, exist_ok=True)
            save_resolved_config(cfg, infer_path / "config.resolved.yaml")
            if cfg.side_by_side:
                sheets_dir.mkdir(parents=True, exist_ok=True)
                fill_missing_sheets(out_dir, sheets_dir)
            print(work.nothing_to_do_message())
        return 0

    from diffusers import StableDiffusionXLControlNetPipeline

    parts = None
    if is_adapter_folder(inputs.controlnet):  # a ControlNet-LoRA: rebuilt from this base model's UNet
        parts = load_sdxl_parts(cfg.model, cfg.dtype)
        controlnet = controlnet_from_adapter(inputs.controlnet, parts.unet, cfg.model.pretrained_model)
    else:
        controlnet = load_controlnet(inputs.controlnet, cfg.dtype)
    pipe = build_sdxl_pipeline(
        cfg.model,
        cfg.dtype,
        pipeline_cls=StableDiffusionXLControlNetPipeline,
        parts=parts,
        controlnet=controlnet,
    )
    prepare_pipeline(
        pipe,
        cfg,
        device,
        inputs.lora_file,
        lora_scale=cfg.lora_scale,
        fuse_lora=cfg.fuse_lora,
        # one size to check against the model's native size; buckets are all near it
        size=geometry.sizes_for(geometry.fixed).generated if geometry.fixed else None,
    )
    # only now: a ControlNet or LoRA refused while loading leaves no output folder behind
    if cfg.side_by_side:
        sheets_dir.mkdir(parents=True, exist_ok=True)  # every process writes the sheets of its own images
    if state.is_main_process:
        infer_path.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, infer_path / "config.resolved.yaml")

    def load_inputs(item):
        if cfg.paths.plan:  # the planned labels, drawn as the ControlNet's layout at the plan's size
            return plan_layout(item.source, inputs.layout)
        return read_ids(item.source["mask_path"], layout=inputs.layout)

    def generate(batch, masks):
        """One pipeline call per generation size in the batch; conditions as a (B, C, H, W) tensor; each image
        resized to its saved size (a stretch, like the mask's: its geometry and the source boxes stay aligned)."""
        import torch

        images: list[Any] = [None] * len(batch)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(batch):
            by_size.setdefault((item.source["generated_width"], item.source["generated_height"]), []).append(
                i
            )
        for size, positions in by_size.items():
            ids = [resize_ids(masks[i], size) for i in positions]
            condition = torch.stack([ids_to_tensor(x, inputs.kind, inputs.layout) for x in ids])
            made = call_pipeline(
                pipe,
                [batch[i] for i in positions],
                cfg,
                size=size,
                image=condition,
                controlnet_conditioning_scale=cfg.controlnet_conditioning_scale,
                control_guidance_start=cfg.control_guidance_start,
                control_guidance_end=cfg.control_guidance_end,
            )
            for i, image in zip(positions, made, strict=True):
                saved = (batch[i].source["width"], batch[i].source["height"])
                images[i] = resize_to(image, saved)
                if cfg.side_by_side:
                    write_sheet(
                        sheets_dir, batch[i].file, resize_ids(masks[i], saved), images[i], inputs.layout
                    )
        return images

    summary = run_generation(
        work,
        generate,
        info=info,
        batch_size=cfg.batch_size,
        on_error=cfg.on_error,
        load_inputs=load_inputs,
        state=state,
    )
    if state.is_main_process:
        if cfg.side_by_side:
            fill_missing_sheets(out_dir, sheets_dir)
        for line in summary.lines():
            print(line)
        if cfg.side_by_side:
            print(f"side-by-side sheets (mask | image) in {sheets_dir}")
        if inputs.missing_captions:
            print(f"{len(inputs.missing_captions)} mask(s) without a caption left out (on_error=skip)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
