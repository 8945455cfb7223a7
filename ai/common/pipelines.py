"""How the generation scripts' SDXL pipeline is built, made ready, run and identified.

Shared by LoRA and ControlNet inference (and bench/bench_inference.py):

* processes and device (:func:`setup_device`: accelerate's ``PartialState``, the torch device, the dtype check);
* building the pipeline from :func:`ai.common.models.load_components` (:func:`build_sdxl_pipeline`) and making it
  ready (:func:`prepare_pipeline`): the optional LoRA, device, scheduler by name, attention backend,
  channels_last, torch.compile, VAE slicing/tiling, resolution check;
* running it on a batch with one CPU generator per image (:func:`call_pipeline`);
* fingerprints of the base model and adapter files recorded with each image (:func:`model_fingerprint`; file
  digests cached in ``$XDG_CACHE_HOME/bdd-sdxl/file-sha256.json`` by path, size and mtime, so reruns skip
  re-reading the UNet).

The config sections come from :mod:`ai.common.generation_config`; the work list and the run loop live in
:mod:`ai.common.generation`, which imports this module (never the other way round). torch and diffusers are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ai.common.generation_config import SCHEDULERS, GenerationConfig, Speed
from ai.common.models import ModelSource
from core.cli import UserError, setup_logging
from core.io import atomic_write_text, sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

LORA_ADAPTER_NAME = "lora"
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: Resolution warning band: pixel count outside [1/4, 4] x the model's native size squared.
RESOLUTION_BAND = (0.25, 4.0)


# ---------------------------------------------------------------------------------------------------------------
# Pipeline set-up
# ---------------------------------------------------------------------------------------------------------------


def make_state(device: str = "auto"):
    """accelerate's ``PartialState`` for this process, on the CPU when asked for or when there is no GPU.

    ``PartialState`` sets up a CPU process group (gloo) only when told it runs on the CPU, so without this a
    multi-process CPU launch would run N independent copies that all make every image.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def resolve_device(name: str, state) -> Any:
    """``auto`` -> the accelerate process's device (its GPU under ``accelerate launch``, else CPU)."""
    import torch

    return state.device if name == "auto" else torch.device(name)


def check_dtype_device(dtype: str, device) -> None:
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("dtype fp16 needs a GPU (the device is cpu); set dtype=fp32 (or bf16) for CPU runs")


def setup_device(device_name: str, dtype: str) -> tuple[Any, Any]:
    """This process's accelerate state and torch device, logging (other processes: warnings only), dtype check."""
    state = make_state(device_name)
    setup_logging(None if state.is_main_process else "WARNING")
    device = resolve_device(device_name, state)
    check_dtype_device(dtype, device)
    return state, device


def make_scheduler(name: str, model_scheduler):
    """A scheduler by name, configured from the model's own scheduler (betas, timestep spacing, prediction type)."""
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    if not cls_name:
        return model_scheduler
    return getattr(diffusers, cls_name).from_config(model_scheduler.config, **extra)


def native_size(unet, vae) -> int:
    """The model's native image side in pixels (1024 for SDXL, 128 for the tiny test model)."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(width: int, height: int, native: int) -> str | None:
    """A warning (also logged) when the pixel count is far from the model's native size squared, else None."""
    ratio = width * height / native**2
    if RESOLUTION_BAND[0] <= ratio <= RESOLUTION_BAND[1]:
        return None
    message = (
        f"resolution {width}x{height} is {ratio:.2g}x the pixel count the model was trained at ({native}x{native}); "
        "expect duplicated or mushy content. SDXL works best near 1024x1024 total pixels (e.g. 1344x768, 1216x832)"
    )
    logger.warning(message)
    return message


def apply_speed_switches(pipe, speed: Speed, device) -> None:
    """Attention backend, memory format, compile and VAE memory savers, as the config asks."""
    import torch

    if speed.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError(
                "speed.attention=xformers but xformers is not installed; use sdpa (the default)"
            ) from None
        pipe.enable_xformers_memory_efficient_attention()
    controlnet = getattr(pipe, "controlnet", None)  # runs beside the UNet at every step: same treatment
    if speed.channels_last:
        for model in (pipe.unet, pipe.vae, controlnet):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    if speed.vae_slicing:
        pipe.vae.enable_slicing()
    if speed.vae_tiling:
        pipe.vae.enable_tiling()
    if speed.torch_compile:
        if device.type == "cpu":
            logger.warning("speed.torch_compile on CPU: compiling takes minutes and rarely pays off")
        pipe.unet = torch.compile(pipe.unet, mode=speed.compile_mode)
        if controlnet is not None:
            pipe.controlnet = torch.compile(controlnet, mode=speed.compile_mode)


def load_sdxl_parts(model: ModelSource, dtype: str):
    """:func:`ai.common.models.load_components` of ``model`` in the inference ``dtype``."""
    from ai.common.models import load_components

    return load_components(
        model.pretrained_model,
        vae=model.vae,
        dtype=torch_dtype(dtype),
        variant=model.variant,
        config_from=model.config_from,
    )


def build_sdxl_pipeline(model: ModelSource, dtype: str, pipeline_cls=None, parts=None, **extra_components):
    """A text-to-image pipeline from :func:`load_sdxl_parts` (local folder, hub id or tiny model), or from
    ``parts`` loaded already.

    Left on the CPU: load adapters first, then move it with ``pipe.to(device)``. ``pipeline_cls`` and
    ``extra_components`` let the ControlNet script build its pipeline from the same parts.
    """
    from diffusers import StableDiffusionXLPipeline

    parts = parts if parts is not None else load_sdxl_parts(model, dtype)
    pipeline_cls = pipeline_cls or StableDiffusionXLPipeline
    pipe = pipeline_cls(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=parts.unet,
        scheduler=parts.scheduler,
        **extra_components,
    )
    pipe.set_progress_bar_config(disable=True)  # one bar over images instead of one per call
    return pipe


class _NoTextEncoderKeysNotice(logging.Filter):
    """Drops diffusers' notice, for every UNet-only LoRA, that it has no text-encoder keys (harmless)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


def load_lora(pipe, lora_file: Path, scale: float, fuse: bool) -> dict[str, int]:
    """Load the LoRA into the UNet (and the text encoders it has layers for) at ``scale``; returns how many modules
    of each component got a LoRA layer.

    A file that only partly fits this base model is refused: diffusers loads what fits and only warns, so a LoRA
    from another architecture or with renamed keys would generate with neither model. No opt-out: a LoRA trained
    here always fits its base, and a partial fit is never what a data-generation run wants. diffusers' other
    warnings stay on.
    """
    from ai.common import lora_export

    def one_line(exc: Exception) -> str:
        return " ".join(str(exc).split()) or type(exc).__name__

    try:
        wanted, stray = lora_export.file_modules(pipe, lora_file)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{lora_file} is not a LoRA file diffusers can read: {one_line(exc)}") from None
    base_logger = logging.getLogger("diffusers.loaders.lora_base")
    notice = _NoTextEncoderKeysNotice()
    base_logger.addFilter(notice)
    try:
        pipe.load_lora_weights(
            str(lora_file.parent), weight_name=lora_file.name, adapter_name=LORA_ADAPTER_NAME
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        # diffusers refuses a part none of whose modules the model has (listing every one): name the missing ones
        present = {c: lora_export.module_names(getattr(pipe, c, None)) for c in wanted}
        problem = lora_export.fit_problem(wanted, stray, {c: wanted[c] & present[c] for c in wanted})
        problem = problem or one_line(exc)
    else:
        applied = {c: lora_export.adapted_modules(getattr(pipe, c, None), LORA_ADAPTER_NAME) for c in wanted}
        problem = lora_export.fit_problem(wanted, stray, applied)
        if problem:
            pipe.delete_adapters(LORA_ADAPTER_NAME)
    finally:
        base_logger.removeFilter(notice)
    if problem:
        raise UserError(
            f"{lora_file} does not fit this base model: {problem}. Use the SDXL base model the LoRA was trained "
            "on (or a LoRA trained on this one); a file with renamed keys needs its diffusers or kohya names back."
        )
    counts = {c: len(m) for c, m in applied.items() if m}
    logger.info("LoRA %s on %s", lora_file, ", ".join(f"{n} {c} modules" for c, n in counts.items()))
    if fuse:  # merge into the weights: no per-step LoRA matmuls
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=scale)
        pipe.unload_lora_weights()
    else:
        pipe.set_adapters([LORA_ADAPTER_NAME], adapter_weights=[scale])
    return counts


def prepare_pipeline(
    pipe,
    cfg: GenerationConfig,
    device,
    lora_file: Path | None,
    *,
    lora_scale: float,
    fuse_lora: bool,
    size: tuple[int, int] | None,
) -> None:
    """A built pipeline made ready to run: optional LoRA, device, scheduler, speed switches, resolution check.

    ``size``: the one output size, checked against the model's native size (None: sizes vary per item).
    """
    if lora_file is not None:
        load_lora(pipe, lora_file, lora_scale, fuse_lora)
    pipe.to(device)
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler)
    apply_speed_switches(pipe, cfg.speed, device)
    if size is not None:
        check_resolution(*size, native_size(pipe.unet, pipe.vae))


class Seeded(Protocol):
    """What :func:`call_pipeline` reads of a work item (:class:`ai.common.generation.WorkItem`)."""

    prompt: str
    seed: int


def call_pipeline(
    pipe, batch: Sequence[Seeded], cfg: GenerationConfig, size: tuple[int, int] | None = None, **extra
) -> list[Any]:
    """Run ``pipe`` on a batch; each image has its own CPU generator, so its pixels do not depend on the batch.

    ``size`` (width, height) replaces ``cfg.resolution`` (e.g. per-mask sizes in ControlNet inference).
    """
    import torch

    width, height = size or (cfg.resolution.width, cfg.resolution.height)
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
    with torch.inference_mode():
        result = pipe(
            prompt=[item.prompt for item in batch],
            negative_prompt=[cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            width=width,
            height=height,
            generator=generators,
            output_type="pil",
            **extra,
        )
    return result.images


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints recorded with each image
# ---------------------------------------------------------------------------------------------------------------


def _weights_files(folder: Path, variant: str | None) -> list[Path]:
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [index, *(folder / s for s in shards)]
    for name in (f"{stem}.safetensors", f"{stem}.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def model_fingerprint(
    path_or_id: str,
    variant: str | None = None,
    config_name: str = "model_index.json",
    *,
    hash_cache: str | os.PathLike | None = None,
) -> str:
    """sha256 over the model's config file and its UNet (or, for a VAE folder, its own) weights; ``hub:<id>`` for a hub id.

    File digests come from :func:`cached_sha256_files` (``hash_cache``: its cache file, default
    :func:`default_hash_cache`), so a rerun does not read gigabytes of unchanged UNet weights again; the value is
    the same as hashing every file.
    """
    from ai.common.models import is_local

    if not is_local(path_or_id):
        return f"hub:{path_or_id}"
    if Path(path_or_id).is_file():  # a single-file checkpoint or VAE: its bytes are the weights
        return sha256_bytes("\n".join(cached_sha256_files([path_or_id], hash_cache)).encode())
    folder = Path(path_or_id)
    weights_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    config = folder / config_name if (folder / config_name).is_file() else folder / "config.json"
    digests = cached_sha256_files([config, *_weights_files(weights_dir, variant)], hash_cache)
    return sha256_bytes("\n".join(digests).encode())


#: A cached digest is trusted only for a file last modified this long before it was hashed: a file rewritten
#: within the file system's timestamp granularity could keep its size and mtime (git's "racily clean" rule).
HASH_CACHE_SETTLE_NS = 2_000_000_000


def default_hash_cache() -> Path:
    """``$XDG_CACHE_HOME/bdd-sdxl/file-sha256.json`` (``~/.cache`` without XDG_CACHE_HOME): outside model folders."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bdd-sdxl" / "file-sha256.json"


def cached_sha256_files(
    paths: Sequence[str | os.PathLike], cache_file: str | os.PathLike | None = None
) -> list[str]:
    """sha256 of each file, reusing digests from ``cache_file`` for files whose (real path, size, mtime_ns) match.

    A changed, replaced or touched file is hashed again. The cache is a small JSON map written atomically (two
    processes writing at once lose at most each other's new entries); entries of deleted files are dropped. An
    unreadable or corrupt cache counts as empty and a cache that cannot be written (read-only home) is skipped:
    the digests are then simply computed, never wrong.
    """
    cache_path = Path(cache_file) if cache_file is not None else default_hash_cache()
    entries = _read_hash_cache(cache_path)
    digests, changed = [], False
    for path in paths:
        key = os.path.realpath(path)  # symlinks (HF cache snapshots) share their target's entry
        stat = os.stat(path)
        entry = entries.get(key)
        if (
            isinstance(entry, dict)
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get("hashed_at_ns"), int)
            and entry["hashed_at_ns"] - stat.st_mtime_ns >= HASH_CACHE_SETTLE_NS
            and isinstance(entry.get("sha256"), str)
        ):
            digests.append(entry["sha256"])
            continue
        hashed_at = time.time_ns()
        digest = sha256_file(path)
        entries[key] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "hashed_at_ns": hashed_at,
            "sha256": digest,
        }
        digests.append(digest)
        changed = True
    if changed:
        kept = {k: v for k, v in entries.items() if os.path.exists(k)}
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, json.dumps(kept, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            logger.debug("file hash cache %s not written (%s); hashing again next time", cache_path, exc)
    return digests


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or torn: start empty
        return {}
    return entries if isinstance(entries, dict) else {}
