"""Generate images with a trained SDXL LoRA (or the plain base model) from a YAML config.

Usage:
    bash ai/lora/run_lora_infer.sh [config/lora_infer.yaml] [key=value ...]
    accelerate launch -m ai.lora.infer_lora_sdxl --config config/lora_infer.yaml [key=value ...]
    python ai/lora/infer_lora_sdxl.py --config config/demo/lora_infer.yaml --check   # validate only, no torch

Writes ``<paths.infer_path>/generations/<prompt_index>_<image_index>.png``, one record per image in
``generations/metadata.jsonl`` (prompt, seed, settings, the size generated at and saved at, LoRA sha256, base model
fingerprint, source frame when the prompt came from a captions CSV) and ``<paths.infer_path>/config.resolved.yaml``.
With ``resolution.generate_at_bucket`` each image is generated at the SDXL bucket nearest the requested size
(1344x768 for 1280x720) and resized to it. A rerun skips finished images.
Under ``accelerate launch`` with N processes the work list is split across them; each image gets the same seed
and noise as in a one-process run (with ``batch_size`` 1 the same pixels). Prompts, seeds, outputs (ai/common/generation.py), speed switches and LoRA loading
(ai/common/pipelines.py) are shared with ControlNet inference; this file is the text-to-image recipe around them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ai.common.generation import (
    GENERATIONS_DIR,
    PromptEntry,
    build_work_items,
    check_base_model,
    common_info,
    common_settings,
    parse_generation_args,
    pending_work,
    read_prompts,
    resize_to,
    resolve_lora_file,
    run_generation,
)
from ai.common.generation_config import BucketGrid, GenerationConfig, GenerationPaths
from ai.common.pipelines import build_sdxl_pipeline, call_pipeline, prepare_pipeline, setup_device
from core.cli import run_main
from core.config import load_config, save_resolved_config

DEFAULT_CONFIG = "config/lora_infer.yaml"

logger = logging.getLogger("bdd-sdxl.lora_infer")


class LoraInferPaths(GenerationPaths):
    lora_weights_path: str | None = None  # None: the base model alone (for comparisons)
    infer_path: str = "inference_outputs/lora"


class LoraInferConfig(GenerationConfig):
    paths: LoraInferPaths = LoraInferPaths()
    lora_scale: float = 1.0
    fuse_lora: bool = False


def parse_args(argv: Sequence[str] | None):
    return parse_generation_args(
        argv,
        prog="python -m ai.lora.infer_lora_sdxl",
        doc=__doc__,
        default_config=DEFAULT_CONFIG,
        check_help="validate config, model folder, LoRA and prompts; exit",
        override_examples="paths.lora_weights_path=runs/lora_train/checkpoint-500 num_inference_steps=20 "
        "resolution.width=1344",
    )


def check_inputs(cfg: LoraInferConfig) -> tuple[list[PromptEntry], Path | None]:
    """Everything that can be checked without torch: model folder, VAE, LoRA file, prompts."""
    check_base_model(cfg.model)
    return read_prompts(cfg), resolve_lora_file(cfg.paths.lora_weights_path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(LoraInferConfig, args.config, args.overrides)
    prompts, lora_file = check_inputs(cfg)
    if args.check:
        print(
            f"{args.config}: ok ({len(prompts)} prompt(s) x {cfg.images_per_prompt} image(s), "
            f"LoRA {lora_file or 'none (base model)'})"
        )
        return 0

    state, device = setup_device(cfg.device, cfg.dtype)
    infer_path = Path(cfg.paths.infer_path)
    if state.is_main_process:
        logger.info(
            "%d prompt(s), %d process(es), device %s, LoRA %s",
            len(prompts),
            state.num_processes,
            device,
            lora_file,
        )

    resolution = cfg.resolution
    size = {
        "width": resolution.width,
        "height": resolution.height,
        "generate_at_bucket": resolution.generate_at_bucket,
    }
    settings = common_settings(cfg, lora_file, cfg.lora_scale, size=size)
    info = common_info(cfg, lora_file, cfg.fuse_lora, args.config)
    items = build_work_items(prompts, cfg.images_per_prompt, cfg.seed)
    work = pending_work(items, infer_path / GENERATIONS_DIR, settings, overwrite=cfg.overwrite, state=state)
    if not work.todo:
        if state.is_main_process:
            infer_path.mkdir(parents=True, exist_ok=True)
            save_resolved_config(cfg, infer_path / "config.resolved.yaml")
            print(work.nothing_to_do_message())
        return 0

    pipe = build_sdxl_pipeline(cfg.model, cfg.dtype)
    grid = BucketGrid.from_configs(pipe.unet.config, pipe.vae.config)
    sizes = grid.output_size((resolution.width, resolution.height), resolution.generate_at_bucket)
    prepare_pipeline(
        pipe, cfg, device, lora_file, lora_scale=cfg.lora_scale, fuse_lora=cfg.fuse_lora, size=sizes.generated
    )
    if state.is_main_process:  # only now: a LoRA refused while loading leaves no output folder behind
        infer_path.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, infer_path / "config.resolved.yaml")
        if sizes.generated != sizes.saved:
            logger.info("generating at %dx%d, saved at %dx%d", *sizes.generated, *sizes.saved)

    def generate(batch, _inputs):
        return [
            resize_to(image, sizes.saved) for image in call_pipeline(pipe, batch, cfg, size=sizes.generated)
        ]

    summary = run_generation(
        work,
        generate,
        info={**info, **sizes.record()},
        batch_size=cfg.batch_size,
        on_error=cfg.on_error,
        state=state,
    )
    if state.is_main_process:
        for line in summary.lines():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
