"""Train a LoRA adapter on SDXL (UNet, optionally both text encoders) from a YAML config, under accelerate.

Usage::

    bash ai/lora/run_lora_train.sh [config/lora_train.yaml] [key=value ...]
    ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/lora/run_lora_train.sh config/demo/lora_train.yaml
    python -m ai.lora.train_lora_sdxl --config config/lora_train.yaml --check    # validate only, milliseconds

Data: a CSV with ``image,text`` columns (``convert/lora_bdd_to_huggingface_csv.py`` writes one) or a Hugging
Face dataset with those columns. Images go to SDXL aspect buckets (1280x720 -> 1344x768) with true
micro-conditioning; VAE latents and text embeddings are cached on disk by content (``cache.*``).

Outputs in ``runs/<output.name>/``: ``checkpoint-<step>/`` (resumable, each with the LoRA in diffusers format),
the final ``pytorch_lora_weights.safetensors`` (``StableDiffusionXLPipeline.load_lora_weights``) and its kohya
copy for ComfyUI/A1111, ``config.resolved.yaml``, ``metrics.jsonl``, ``loss_curve.png``, ``validation/``, ``logs/``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ai.common.cli import UserError, run_main, setup_logging
from ai.common.config import Section, config_to_yaml, load_config

logger = logging.getLogger("train_lora_sdxl")

# ---------------------------------------------------------------------------------------------------------------
# Config schema (config/lora_train.yaml documents every key)
# ---------------------------------------------------------------------------------------------------------------


class ModelConfig(Section):
    pretrained_model: str = "models/sdxl-base"  # diffusers SDXL folder (or hub id on an online host)
    vae: str | None = None  # separate VAE folder, e.g. an fp16-safe SDXL VAE
    vae_fp16_safe: bool = False  # run the VAE in the mixed-precision dtype (only for an fp16-safe VAE)
    variant: str | None = None  # weight variant such as "fp16"


class DataConfig(Section):
    train_csv: str | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = Field(1024, gt=0)
    bucket_step: int = Field(64, gt=0)
    use_buckets: bool = True
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    on_bad_image: Literal["fail", "skip"] = "fail"
    max_rows: int | None = Field(None, gt=0)
    num_workers: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.train_csv is None) == (self.dataset is None):
            raise ValueError("set exactly one of data.train_csv and data.dataset")
        return self


class CacheConfig(Section):
    latents: bool = True
    text_embeddings: bool = True
    dir: str = "cache/sdxl"
    dtype: Literal["float16", "float32"] = "float16"


class LoraConfig(Section):
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    init: Literal["gaussian", "default"] = "gaussian"
    train_text_encoder: bool = False
    text_encoder_learning_rate: float = Field(5.0e-6, gt=0)
    text_encoder_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LossConfig(Section):
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: float | None = Field(5.0, gt=0)
    noise_offset: float = Field(0.0, ge=0.0)
    timestep_min: int = Field(0, ge=0)
    timestep_max: int = Field(1000, gt=0, le=1000)

    @model_validator(mode="after")
    def _range(self):
        if self.timestep_min >= self.timestep_max:
            raise ValueError(
                f"loss.timestep_min ({self.timestep_min}) must be below loss.timestep_max ({self.timestep_max})"
            )
        return self


class OptimConfig(Section):
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    learning_rate: float = Field(1.0e-4, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    weight_decay: float = 1.0e-2
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    lr_warmup_steps: int = Field(100, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)


class TrainConfig(Section):
    batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_train_steps: int = Field(1000, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = False
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    allow_tf32: bool = True
    seed: int = 0


class CheckpointConfig(Section):
    every_n_steps: int = Field(500, gt=0)
    total_limit: int | None = Field(3, gt=0)
    resume_from: str | None = None


class ValidationConfig(Section):
    every_n_steps: int = Field(500, ge=0)
    prompts: list[str] = []
    seeds: list[int] = [0]
    num_inference_steps: int = Field(25, gt=0)
    guidance_scale: float = 5.0
    width: int = Field(1344, gt=0)
    height: int = Field(768, gt=0)
    loss_rows: int = Field(0, ge=0)
    loss_csv: str | None = None


class LogConfig(Section):
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    wandb_project: str = "bdd-sdxl-lora"
    every_n_steps: int = Field(10, gt=0)


class OutputConfig(Section):
    runs_dir: str = "runs"
    name: str = "lora_train"
    kohya_copy: bool = True


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    cache: CacheConfig = CacheConfig()
    lora: LoraConfig = LoraConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    log: LogConfig = LogConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _compatible(self):
        if self.cache.latents and self.data.crop == "random":
            raise ValueError(
                "data.crop=random draws a new crop every epoch, cached latents would pin one: "
                "set cache.latents=false or data.crop=center"
            )
        if self.cache.text_embeddings and self.lora.train_text_encoder:
            raise ValueError(
                "lora.train_text_encoder=true changes the text embeddings every step: set cache.text_embeddings=false"
            )
        return self


# Keys that may change when resuming (everything else must match the checkpoint's config).
RESUME_FREE_KEYS = (
    "train.max_train_steps", "checkpoint", "validation", "log", "data.num_workers", "cache.dir", "output",
)  # fmt: skip


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.output.runs_dir) / cfg.output.name


def check_inputs(cfg: Config) -> None:
    """Fast checks before accelerate starts (no torch import)."""
    from ai.common.checkpoints import check_resume_compatible, resolve_resume
    from ai.common.models import check_model_folder, is_local

    if is_local(cfg.model.pretrained_model):
        check_model_folder(cfg.model.pretrained_model)
    for key, value in (
        ("data.train_csv", cfg.data.train_csv),
        ("validation.loss_csv", cfg.validation.loss_csv),
    ):
        if value is not None and not Path(value).is_file():
            raise UserError(f"{key}: file not found: {value}")
    if cfg.validation.every_n_steps and not (
        cfg.validation.prompts or cfg.validation.loss_rows or cfg.validation.loss_csv
    ):
        raise UserError(
            "validation.every_n_steps is set but there are no validation.prompts and no loss rows"
        )
    ckpt = resolve_resume(run_dir_of(cfg), cfg.checkpoint.resume_from)
    if ckpt is not None:
        check_resume_compatible(ckpt, cfg.model_dump(mode="json"), RESUME_FREE_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train(cfg: Config) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ai.common import caches, checkpoints, data, diffusion, lora_export, training_log, validation
    from ai.common.config import save_resolved_config
    from ai.common.models import load_components

    run_dir = run_dir_of(cfg)
    accelerator = Accelerator(
        # no GPU: say so, so that several processes (torchrun) get a gloo process group instead of none
        cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=training_log.trackers_for(cfg.log.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    main_proc, device = accelerator.is_main_process, accelerator.device
    if not main_proc:
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.optim.optimizer == "adamw8bit" and device.type != "cuda":
        raise UserError(
            "optim.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); use optim.optimizer=adamw here"
        )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        cfg.train.mixed_precision
    ]
    if cfg.train.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.train.seed)  # LoRA init and dropout; data and noise have their own seeded streams
    resume = checkpoints.resolve_resume(run_dir, cfg.checkpoint.resume_from)
    if resume is not None:
        checkpoints.check_resume_compatible(
            resume, cfg.model_dump(mode="json"), RESUME_FREE_KEYS, accelerator.num_processes
        )
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, run_dir / checkpoints.CONFIG_FILE)

    # --- models: frozen SDXL + LoRA ---
    comps = load_components(cfg.model.pretrained_model, vae=cfg.model.vae, variant=cfg.model.variant)
    unet, vae, te1, te2 = comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2
    for m in (unet, vae, te1, te2):
        m.requires_grad_(False)
    vae_dtype = (
        weight_dtype if cfg.model.vae_fp16_safe else torch.float32
    )  # the stock SDXL VAE overflows in fp16
    vae.to(device, dtype=vae_dtype)
    unet.to(device, dtype=weight_dtype)
    te1.to(device, dtype=weight_dtype)
    te2.to(device, dtype=weight_dtype)
    lora_init = "gaussian" if cfg.lora.init == "gaussian" else True
    unet.add_adapter(
        PeftLoraConfig(
            r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            init_lora_weights=lora_init, target_modules=list(cfg.lora.target_modules),
        )
    )  # fmt: skip
    text_encoders = [te1, te2] if cfg.lora.train_text_encoder else []
    for te in text_encoders:
        te.add_adapter(
            PeftLoraConfig(
                r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                init_lora_weights=lora_init, target_modules=list(cfg.lora.text_encoder_target_modules),
            )
        )  # fmt: skip
    trainable_models = [unet, *text_encoders]
    cast_training_params(
        trainable_models, dtype=torch.float32
    )  # fp32 LoRA: no "unscale FP16 gradients" error
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in text_encoders:
            te.gradient_checkpointing_enable()
    use_xformers = cfg.train.attention == "xformers" or (
        cfg.train.attention == "auto" and device.type == "cuda"
    )
    if use_xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            if cfg.train.attention == "xformers":
                raise UserError(f"train.attention=xformers but xformers is unusable here: {exc}") from None
            use_xformers = False  # auto: SDPA

    # --- data and caches ---
    report = data.load_rows(
        cfg.data.train_csv, cfg.data.dataset, cfg.data.dataset_split, cfg.data.image_column, cfg.data.caption_column,
        on_bad_image=cfg.data.on_bad_image, max_rows=cfg.data.max_rows,
    )  # fmt: skip
    train_rows, held_rows = data.holdout_split(report.rows, cfg.validation.loss_rows, cfg.train.seed)
    if cfg.validation.loss_csv:
        held_rows = data.load_rows(cfg.validation.loss_csv, image_column=cfg.data.image_column,
                                   caption_column=cfg.data.caption_column).rows  # fmt: skip
    buckets = (
        data.sdxl_buckets(cfg.data.resolution, cfg.data.bucket_step)
        if cfg.data.use_buckets
        else [(cfg.data.resolution, cfg.data.resolution)]
    )
    align = comps.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if any(w % align or h % align for w, h in buckets):
        raise UserError(
            f"bucket sides must be multiples of {align} px for this model; set data.bucket_step={align}"
        )
    geometry = data.Geometry(tuple(buckets), cfg.data.crop, cfg.data.random_flip, cfg.train.seed)
    store_dtype = getattr(torch, cfg.cache.dtype)

    def encode_text(prompts):
        return diffusion.encode_prompts([te1, te2], [comps.tokenizer, comps.tokenizer_2], prompts)

    latent_lookup = text_lookup = None
    cache_note = "off"
    if cfg.cache.latents or cfg.cache.text_embeddings:
        with accelerator.local_main_process_first():  # local main builds; the others then only find hits
            notes = []
            if cfg.cache.latents:
                vae_id = caches.module_fingerprint(vae)
                latent_cache = caches.FeatureCache(cfg.cache.dir, "latents")
                hashes, stats = caches.build_latent_cache(
                    train_rows,
                    geometry,
                    latent_cache,
                    vae,
                    vae_id,
                    store_dtype=store_dtype,
                    progress=main_proc,
                )
                latent_lookup = caches.LatentLookup(
                    latent_cache, hashes, vae_id, str(vae.dtype).replace("torch.", "")
                )
                notes.append(f"latents {stats}")
            if cfg.cache.text_embeddings:
                te_id = caches.module_fingerprint(te1, te2) + comps.tokenizer.name_or_path
                text_cache = caches.FeatureCache(cfg.cache.dir, "text")
                stats = caches.build_text_cache(
                    [r.text for r in train_rows], text_cache, encode_text, te_id, store_dtype=store_dtype,
                    progress=main_proc,
                )  # fmt: skip
                text_lookup = caches.TextLookup(text_cache, te_id)
                notes.append(f"text {stats}")
            cache_note = f"{cfg.cache.dir}: " + ", ".join(notes)
    dataset = data.SDXLDataset(train_rows, geometry, latent_lookup, text_lookup)
    sampler = data.BucketBatchSampler(
        dataset.buckets(),
        cfg.train.batch_size,
        cfg.train.seed,
        accelerator.num_processes,
        accelerator.process_index,
    )
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    with torch.no_grad():
        empty_embeds, empty_pooled = encode_text([""])  # caption dropout target

    # --- optimizer, schedule, accelerate ---
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.optim.learning_rate}]
    for te in text_encoders:
        groups.append(
            {
                "params": [p for p in te.parameters() if p.requires_grad],
                "lr": cfg.lora.text_encoder_learning_rate,
            }
        )
    if cfg.optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(
        groups, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_epsilon,
        weight_decay=cfg.optim.weight_decay,
    )  # fmt: skip
    # stepped once per optimizer step here (not prepared, so accelerate does not step it per process)
    lr_scheduler = get_scheduler(
        cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
        num_training_steps=cfg.train.max_train_steps,
    )  # fmt: skip
    prepared = accelerator.prepare(*trainable_models, optimizer)
    unet, text_encoders, optimizer = prepared[0], list(prepared[1:-1]), prepared[-1]
    accelerator.register_for_checkpointing(lr_scheduler)
    raw = [accelerator.unwrap_model(m) for m in (unet, *text_encoders)]  # PEFT models without DDP wrappers

    def save_hook(models, weights, output_dir):  # checkpoint the LoRA only, not the frozen base weights
        if accelerator.is_main_process:
            state = {f"{i}.{k}": v for i, m in enumerate(raw) for k, v in lora_export.peft_state(m).items()}
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(Path(output_dir) / "lora_state.safetensors"),
            )
        weights.clear()

    def load_hook(models, input_dir):
        state = load_file(str(Path(input_dir) / "lora_state.safetensors"))
        for i, m in enumerate(raw):
            part = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)}
            result = set_peft_model_state_dict(m, part, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise UserError(
                    f"{input_dir}: LoRA state does not fit the model: {result.unexpected_keys[:3]}"
                )
        cast_training_params(raw, dtype=torch.float32)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, epoch, batch_pos = 0, 0, 0
    last_ckpt: Path | None = None
    if resume is not None:
        accelerator.load_state(str(resume))
        state = checkpoints.read_train_state(resume)
        global_step, epoch, batch_pos, last_ckpt = state["step"], state["epoch"], state["batch"], resume
    metrics = training_log.MetricsLog(run_dir, enabled=main_proc, resume_step=global_step)
    accelerator.init_trackers(
        cfg.log.wandb_project if cfg.log.report_to == "wandb" else "lora", config=_flat(cfg)
    )

    # --- validation helpers (main process) ---
    val_set = None

    def validation_loss() -> float | None:
        nonlocal val_set
        if not held_rows:
            return None
        with accelerator.autocast():
            if val_set is None:  # encoded once
                val_set = validation.encode_loss_set(held_rows, geometry, vae, encode_text, device)
            t_range = (cfg.loss.timestep_min, cfg.loss.timestep_max)
            model = accelerator.unwrap_model(unet)
            return validation.loss_on_set(
                model, comps.scheduler, val_set, cfg.train.seed, t_range, cfg.loss.prediction_type
            )

    def validation_images(step: int) -> None:
        if not cfg.validation.prompts:
            return
        unwrap = accelerator.unwrap_model
        pipe = validation.sdxl_pipeline(comps, unwrap(unet), unwrap(te1), unwrap(te2), vae)
        v = cfg.validation
        with accelerator.autocast():
            images, captions = validation.generate_images(
                pipe, v.prompts, v.seeds, run_dir / "validation" / f"step-{step:06d}", device,
                num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale, width=v.width,
                height=v.height,
            )  # fmt: skip
        training_log.log_images(accelerator, images, captions, step)

    def run_validation(step: int, bar=None) -> None:
        if main_proc:
            for m in (unet, *text_encoders):
                m.eval()
            vl = validation_loss()
            if vl is not None:
                metrics.log(step, val_loss=vl)
                accelerator.log({"val_loss": vl}, step=step)
                (bar.write if bar else logger.info)(f"step {step}: val_loss={vl:.5f}")
            validation_images(step)
            for m in (unet, *text_encoders):
                m.train()
        accelerator.wait_for_everyone()

    def save(step: int) -> Path:
        def export(folder: Path) -> None:
            te_raw = raw[1:] if text_encoders else [None, None]
            lora_export.save_lora(folder, raw[0], *te_raw, kohya=cfg.output.kohya_copy)

        path = checkpoints.save_checkpoint(
            accelerator, run_dir, step, {"epoch": epoch, "batch": batch_pos}, config_to_yaml(cfg), export,
            cfg.checkpoint.total_limit,
        )  # fmt: skip
        metrics.plot()
        return path

    # --- banner ---
    steps_per_epoch = math.ceil(len(sampler) / cfg.train.gradient_accumulation_steps)
    n_trainable = sum(p.numel() for m in raw for p in m.parameters() if p.requires_grad)
    bucket_counts: dict = {}
    for b in dataset.buckets():
        bucket_counts[b] = bucket_counts.get(b, 0) + 1
    training_log.banner(logger, "Running LoRA training", {
        "examples": f"{len(train_rows)} (skipped {len(report.skipped)}, held out for val loss {len(held_rows)})",
        "buckets (WxH: rows)": ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(bucket_counts.items())),
        "batch per process": cfg.train.batch_size,
        "effective batch": f"{cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes}"
        f" (x{cfg.train.gradient_accumulation_steps} accumulation x{accelerator.num_processes} processes)",
        "optimizer steps": f"{cfg.train.max_train_steps} (~{cfg.train.max_train_steps / max(steps_per_epoch, 1):.1f} epochs)",
        "precision": f"{cfg.train.mixed_precision} (VAE {str(vae_dtype).replace('torch.', '')}, LoRA fp32)",
        "attention": "xformers" if use_xformers else "SDPA",
        "trainable parameters": f"{n_trainable:,} (LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha}"
        f"{', + text encoders' if text_encoders else ''})",
        "caches": cache_note,
        "resume": f"{resume} (step {global_step}, epoch {epoch}, batch {batch_pos})" if resume else "fresh start",
        "output": str(run_dir),
    })  # fmt: skip

    # --- loop ---
    if global_step == 0 and cfg.validation.every_n_steps:
        run_validation(0)
    for m in (unet, *text_encoders):
        m.train()
    bar = tqdm(total=cfg.train.max_train_steps, initial=global_step, desc="train", disable=not main_proc)
    scheduler = comps.scheduler
    sf = vae.config.scaling_factor
    loss_sum, loss_n, t_data, t_compute, start_step = 0.0, 0, 0.0, 0.0, global_step
    while global_step < cfg.train.max_train_steps:
        sampler.set_position(epoch, batch_pos)
        tick = time.perf_counter()
        for batch in loader:
            t_data += time.perf_counter() - tick
            gen = diffusion.step_generator(
                cfg.train.seed, epoch * 1_000_000 + batch_pos, accelerator.process_index, device
            )
            batch_pos += 1
            with accelerator.accumulate(*trainable_models):
                with torch.no_grad():
                    if "latent_mean" in batch:
                        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
                    else:
                        dist = vae.encode(batch["pixel_values"].to(device, vae_dtype)).latent_dist
                        mean, std = dist.mean.float(), dist.std.float()
                    latents = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * sf
                bsz = latents.shape[0]
                drop = torch.rand(bsz, generator=gen, device=device) < cfg.data.caption_dropout
                if "prompt_embeds" in batch:
                    embeds, pooled = (
                        batch["prompt_embeds"].to(device),
                        batch["pooled_prompt_embeds"].to(device),
                    )
                    embeds = torch.where(drop[:, None, None], empty_embeds.to(embeds.dtype), embeds)
                    pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype), pooled)
                else:
                    texts = ["" if d else t for d, t in zip(drop.tolist(), batch["text"], strict=True)]
                    with torch.set_grad_enabled(bool(text_encoders)):
                        embeds, pooled = encode_text(texts)
                noise = diffusion.sample_noise(latents, gen, cfg.loss.noise_offset)
                timesteps = diffusion.sample_timesteps(
                    bsz, cfg.loss.timestep_min, cfg.loss.timestep_max, gen, device
                )
                noisy = scheduler.add_noise(latents, noise, timesteps)
                target = diffusion.training_target(
                    scheduler, latents, noise, timesteps, cfg.loss.prediction_type
                )
                pred = diffusion.unet_forward(
                    unet, noisy.to(weight_dtype), timesteps, embeds.to(weight_dtype), pooled.to(weight_dtype),
                    batch["time_ids"].to(device, weight_dtype),
                )  # fmt: skip
                loss = diffusion.diffusion_loss(
                    pred, target, timesteps, scheduler, cfg.loss.prediction_type, cfg.loss.snr_gamma
                )
                step_loss = accelerator.gather(loss.detach()[None]).mean().item()
                training_log.check_finite(step_loss, global_step + 1, last_ckpt)
                loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                    accelerator.clip_grad_norm_(
                        [p for g in groups for p in g["params"]], cfg.optim.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            t_compute += time.perf_counter() - tick
            if accelerator.sync_gradients:
                lr_scheduler.step()
                global_step += 1
                bar.update(1)
                avg, loss_sum, loss_n = loss_sum / loss_n, 0.0, 0
                lr = lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.2e}")
                if global_step % cfg.log.every_n_steps == 0 or global_step == cfg.train.max_train_steps:
                    data_share = t_data / max(t_data + t_compute, 1e-9)
                    sec = (t_data + t_compute) / (global_step - start_step)
                    metrics.log(
                        global_step,
                        loss=avg,
                        lr=lr,
                        data_wait_share=data_share,
                        sec_per_step=sec,
                        epoch=epoch,
                    )
                    accelerator.log({"loss": avg, "lr": lr, "data_wait_share": data_share}, step=global_step)
                else:
                    metrics.log(global_step, loss=avg)
                if (
                    global_step % cfg.checkpoint.every_n_steps == 0
                    or global_step == cfg.train.max_train_steps
                ):
                    last_ckpt = save(global_step)
                if cfg.validation.every_n_steps and (
                    global_step % cfg.validation.every_n_steps == 0
                    or global_step == cfg.train.max_train_steps
                ):
                    run_validation(global_step, bar)
                if global_step >= cfg.train.max_train_steps:
                    break
            tick = time.perf_counter()  # checkpoints and validation count as neither data wait nor compute
        else:
            epoch, batch_pos = epoch + 1, 0
    bar.close()

    # --- final export ---
    if main_proc:
        import os
        import tempfile

        with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tmp-final-") as tmp:
            te_raw = raw[1:] if text_encoders else [None, None]
            for f in lora_export.save_lora(tmp, raw[0], *te_raw, kohya=cfg.output.kohya_copy):
                os.replace(f, run_dir / f.name)
        metrics.plot()
        logger.info(
            "done: %d steps; LoRA in %s (diffusers%s); data wait %.1f %% of step time",
            global_step, run_dir / lora_export.DIFFUSERS_NAME, " + kohya copy" if cfg.output.kohya_copy else "",
            100 * t_data / max(t_data + t_compute, 1e-9),
        )  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _flat(cfg: Config) -> dict:
    """Config as flat scalars for the trackers' hyperparameter tables."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ai.lora.train_lora_sdxl",
        description="Train an SDXL LoRA from a YAML config (launch with ai/lora/run_lora_train.sh).",
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. config/lora_train.yaml")
    parser.add_argument("--check", action="store_true", help="validate the config and inputs, then exit")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. optim.learning_rate=5e-5"
    )
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(Config, args.config, args.overrides)
    check_inputs(cfg)
    if args.check:
        print(f"config OK: {args.config}")
        return 0
    return train(cfg)


if __name__ == "__main__":
    sys.exit(run_main(main))
