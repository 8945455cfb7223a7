"""Generate images with a trained SDXL LoRA (or the plain base model) from a YAML config.

Usage:
    bash ai/lora/run_lora_infer.sh [config/lora_infer.yaml] [key=value ...]
    accelerate launch -m ai.lora.infer_lora_sdxl --config config/lora_infer.yaml [key=value ...]
    python ai/lora/infer_lora_sdxl.py --config config/demo/lora_infer.yaml --check   # validate only, no torch

Writes ``<paths.infer_path>/generations/<prompt_index>_<image_index>.png``, one record per image in
``generations/metadata.jsonl`` (prompt, seed, settings, LoRA sha256, base model fingerprint, source frame when the
prompt came from a captions CSV) and ``<paths.infer_path>/config.resolved.yaml``. A rerun skips finished images.
Under ``accelerate launch`` with N processes the work list is split across them; the images equal a one-process
run's. Prompts, seeds, outputs and speed switches are shared with ControlNet inference (ai/common/generation.py);
this file only adds the LoRA.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ai.common.cli import UserError, run_main, setup_logging
from ai.common.config import load_config, save_resolved_config
from ai.common.generation import (
    GENERATIONS_DIR,
    GenerationConfig,
    GenerationPaths,
    PromptEntry,
    apply_speed_switches,
    build_sdxl_pipeline,
    build_work_items,
    call_pipeline,
    check_dtype_device,
    check_resolution,
    make_scheduler,
    make_state,
    model_fingerprint,
    native_size,
    plan_generation,
    read_prompts,
    resolve_device,
    run_generation,
)
from ai.common.io import sha256_file

DEFAULT_CONFIG = "config/lora_infer.yaml"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "lora"

logger = logging.getLogger("bdd-sdxl.lora_infer")


class LoraInferPaths(GenerationPaths):
    lora_weights_path: str | None = None  # None: the base model alone (for comparisons)


class LoraInferConfig(GenerationConfig):
    paths: LoraInferPaths = LoraInferPaths()
    lora_scale: float = 1.0
    fuse_lora: bool = False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ai.lora.infer_lora_sdxl",
        description=__doc__.split("\n\n")[0],
        epilog="Overrides are dotted key=value pairs, e.g. paths.lora_weights_path=runs/lora_train/checkpoint-500 "
        "num_inference_steps=20 resolution.width=1344. Every key is documented in config/lora_infer.yaml.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument(
        "--check", action="store_true", help="validate config, model folder, LoRA and prompts; exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def resolve_lora_file(path: str | None) -> Path | None:
    """The LoRA weights file: ``path`` itself, or ``path/pytorch_lora_weights.safetensors`` for a run/checkpoint folder."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        if p.suffix not in (".safetensors", ".bin"):
            raise UserError(
                f"paths.lora_weights_path {p} is not a LoRA weights file (*.safetensors or *.bin)"
            )
        return p
    if p.is_dir():
        if (p / LORA_WEIGHTS_NAME).is_file():
            return p / LORA_WEIGHTS_NAME
        found = sorted(child.name for child in p.iterdir())
        with_weights = [c for c in p.glob("checkpoint-*") if (c / LORA_WEIGHTS_NAME).is_file()]
        hint = ""
        if with_weights:
            newest = max(with_weights, key=lambda c: int(re.sub(r"\D", "", c.name) or 0))
            hint = f"; the newest checkpoint with weights is {newest} (set paths.lora_weights_path={newest})"
        raise UserError(
            f"no {LORA_WEIGHTS_NAME} in {p}; found: {', '.join(found) or 'nothing'}{hint}. Point "
            "paths.lora_weights_path at a training run or checkpoint folder, or at the .safetensors file"
        )
    parent = p.parent
    found = (
        ", ".join(sorted(c.name for c in parent.iterdir()))
        if parent.is_dir()
        else "the folder does not exist either"
    )
    raise UserError(f"LoRA weights not found: {p} ({parent}: {found or 'empty'})")


def check_inputs(cfg: LoraInferConfig) -> tuple[list[PromptEntry], Path | None]:
    """Everything that can be checked without torch: model folder, VAE, LoRA file, prompts."""
    from ai.common.models import check_model_folder, is_local

    if is_local(cfg.paths.base_model_path):
        check_model_folder(cfg.paths.base_model_path)
    if cfg.paths.vae_path and is_local(cfg.paths.vae_path) and not Path(cfg.paths.vae_path).is_dir():
        raise UserError(f"paths.vae_path not found: {cfg.paths.vae_path} (a diffusers AutoencoderKL folder)")
    return read_prompts(cfg), resolve_lora_file(cfg.paths.lora_weights_path)


def load_lora(pipe, lora_file: Path, scale: float, fuse: bool) -> None:
    """Load the LoRA into the UNet (and text encoders, if it has layers for them) at ``scale``."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not "no LoRA keys for text_encoder" for every UNet-only LoRA
    try:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(
            f"{lora_file} does not fit this base model ({exc}); was it trained on the same SDXL architecture?".replace(
                "\n", " "
            )
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if fuse:  # merge into the weights: no per-step LoRA matmuls
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=scale)
        pipe.unload_lora_weights()
    else:
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


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

    state = make_state(cfg.device)
    setup_logging(None if state.is_main_process else "WARNING")
    device = resolve_device(cfg.device, state)
    check_dtype_device(cfg.dtype, device)
    infer_path = Path(cfg.paths.infer_path)
    if state.is_main_process:
        logger.info(
            "%d prompt(s), %d process(es), device %s, LoRA %s",
            len(prompts),
            state.num_processes,
            device,
            lora_file,
        )

    settings = {  # what decides the pixels besides prompt and seed; compared on resume
        "negative_prompt": cfg.negative_prompt,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
        "width": cfg.resolution.width,
        "height": cfg.resolution.height,
        "dtype": cfg.dtype,
        "lora_scale": cfg.lora_scale if lora_file else None,
        "lora_sha256": sha256_file(lora_file) if lora_file else None,
        "base_model_fingerprint": model_fingerprint(cfg.paths.base_model_path, cfg.paths.variant),
        "vae_fingerprint": model_fingerprint(cfg.paths.vae_path) if cfg.paths.vae_path else None,
    }
    info = {
        "base_model": cfg.paths.base_model_path,
        "vae_path": cfg.paths.vae_path,
        "lora_path": str(lora_file) if lora_file else None,
        "fuse_lora": cfg.fuse_lora if lora_file else None,
        "config": str(args.config),
    }
    items = build_work_items(prompts, cfg.images_per_prompt, cfg.seed)
    plan = plan_generation(
        items, infer_path / GENERATIONS_DIR, settings, overwrite=cfg.overwrite, state=state
    )
    if state.is_main_process:
        save_resolved_config(cfg, infer_path / "config.resolved.yaml")
    if not plan.todo:
        if state.is_main_process:
            print(f"nothing to do: all {plan.total} images are in {plan.out_dir} (metadata.jsonl lists them)")
        return 0

    pipe = build_sdxl_pipeline(cfg.paths, cfg.dtype)
    if lora_file is not None:
        load_lora(pipe, lora_file, cfg.lora_scale, cfg.fuse_lora)
    pipe.to(device)
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler)
    apply_speed_switches(pipe, cfg.speed, device)
    check_resolution(cfg.resolution.width, cfg.resolution.height, native_size(pipe.unet, pipe.vae))

    summary = run_generation(
        plan,
        lambda batch, _inputs: call_pipeline(pipe, batch, cfg),
        info=info,
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
