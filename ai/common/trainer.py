"""The training plumbing every SDXL trainer shares; the LoRA and ControlNet recipes differ only in what they train.

A recipe (``ai/lora/train_lora_sdxl.py``, ``ai/controlnet/train_controlnet_sdxl.py``) reads top to bottom:

1. :func:`start_run`: accelerator, precision, seed, resume point, resolved config in the run folder.
2. :func:`place_frozen_models`: the frozen SDXL parts on the device in their dtypes; :func:`enable_attention`.
3. :func:`build_train_data`: rows, held-out rows, buckets, latent/text caches, dataset, bucket sampler, loader.
4. :func:`build_optimizer`: AdamW or 8-bit AdamW and the LR schedule.
5. :func:`run_loop`: the loop (gradient accumulation, clipping, logging, checkpoints, validation, exact mid-epoch
   resume) around the recipe's ``compute_loss(batch, generator)``.
6. :func:`save_final`: the final weights written into the run folder atomically.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ai.common import caches, checkpoints, data, diffusion, loss_weights, training_log
from ai.common.train_config import RESUME_FREE_KEYS, TrainingConfig
from core.cli import UserError
from core.config import save_resolved_config

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_dir_of(cfg: TrainingConfig) -> Path:
    return Path(cfg.output.runs_dir) / cfg.output.name


@dataclass
class Run:
    """What :func:`start_run` sets up: the accelerator and the facts every later step needs."""

    accelerator: Any
    run_dir: Path
    weight_dtype: torch.dtype
    resume: Path | None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        """Mixed-precision autocast for the evaluation passes (validation loss, images).

        Not ``accelerator.autocast()``: under DeepSpeed that is a no-op (DeepSpeed casts the trained model itself).
        The VAE leaves it (:func:`ai.common.validation.vae_precision`): it computes in its own dtype.
        """
        enabled = self.weight_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=enabled)


def start_run(cfg: TrainingConfig, resume_free_keys: Sequence[str] = RESUME_FREE_KEYS) -> Run:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, parse_flag_from_env, set_seed

    run_dir = run_dir_of(cfg)
    # DeepSpeed sets up its own process group (gloo on CPU); accelerate's cpu=True would silently drop DeepSpeed
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")  # set by `accelerate launch`
    cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available() and not deepspeed
    if cpu and cfg.train.mixed_precision == "fp16":
        # accelerate has no fp16 autocast or grad scaler on CPU: the frozen base would run in plain fp16
        raise UserError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    accelerator = Accelerator(
        # no GPU: say so, so that several processes (torchrun) get a gloo process group instead of none
        cpu=cpu,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=training_log.trackers_for(cfg.log.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # how long collective calls wait (a process alone on validation or an export keeps the others waiting)
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.process_group_timeout_minutes))
        ],
    )
    if accelerator.state.deepspeed_plugin is not None:
        # one source of truth: the training config's batch, accumulation and clipping, not the accelerate file's
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds_config["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps
        ds_config["train_batch_size"] = (
            cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
        )
        ds_config["gradient_clipping"] = cfg.optim.max_grad_norm or 0.0
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.train.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.train.seed)  # adapter init and dropout; data and noise have their own seeded streams
    resume = checkpoints.resolve_resume(run_dir, cfg.checkpoint.resume_from)
    if resume is not None:
        checkpoints.check_resume_compatible(
            resume, cfg.model_dump(mode="json"), resume_free_keys, accelerator.num_processes, schema=type(cfg)
        )
    if accelerator.is_main_process:
        # once per run: not in --check (the launcher's check runs first) nor on every process
        if resume is not None:
            logger.info("resuming from %s", resume)
        elif cfg.checkpoint.resume_from == "latest":
            logger.info("resume_from=latest: no complete checkpoint in %s, starting fresh", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, run_dir / checkpoints.CONFIG_FILE)
    return Run(accelerator, run_dir, DTYPES[cfg.train.mixed_precision], resume)


def vae_dtype_of(run: Run, vae_fp16_safe: bool) -> torch.dtype:
    """The VAE's dtype: fp32 unless it is fp16-safe (the stock SDXL VAE overflows in fp16)."""
    return run.weight_dtype if vae_fp16_safe else torch.float32


def place_frozen_models(comps, run: Run, vae_fp16_safe: bool) -> torch.dtype:
    """Freeze UNet, VAE and text encoders and move them to the device; returns the VAE's dtype.

    Load them in these dtypes already (``load_components(dtype=run.weight_dtype, vae_dtype=...)``): every process
    holds the frozen base on the host while loading, 14 GB per process for SDXL in fp32.
    """
    vae_dtype = vae_dtype_of(run, vae_fp16_safe)
    for m, dtype in (
        (comps.vae, vae_dtype),
        *((m, run.weight_dtype) for m in (comps.unet, comps.text_encoder, comps.text_encoder_2)),
    ):
        m.requires_grad_(False)
        if any(p.dtype != dtype for p in m.parameters()):
            m.to(run.device, dtype=dtype)
        else:  # loaded in its dtype (a dtype here would make diffusers warn about casting)
            m.to(run.device)
    return vae_dtype


def release_text_encoders(comps, run: Run) -> None:
    """Drop the frozen text encoders once the text cache holds every caption and the validation prompts and
    held-out captions are encoded: nothing runs them any more. Frees 1.6 GB (SDXL, bf16) of device memory and, unlike
    moving them to the host, of host memory too, on every process. The recipe sets its own references to None."""
    import gc

    comps.text_encoder = comps.text_encoder_2 = None
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def noise_scheduler(comps):
    """The DDPM forward process for training, from the model's own scheduler config.

    The pipeline's scheduler (Euler for SDXL) noises in sigma space, ``x0 + sigma * noise``, for sampling with
    ``scale_model_input``; training must feed the UNet ``sqrt(a) x0 + sqrt(1 - a) noise`` as SDXL was trained.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(comps.scheduler.config)


def enable_attention(models: Sequence[Any], setting: str, device: torch.device) -> bool:
    """xformers when asked (or on CUDA with ``auto``), else PyTorch SDPA; returns "xformers used".

    ``auto`` falls back to SDPA on any failure (not installed, a build without kernels for this GPU or dtype, ...),
    with one warning; the models that were switched already get their previous processors back, so no model is
    left half on xformers.
    """
    if setting == "sdpa" or (setting == "auto" and device.type != "cuda"):
        return False
    before = [m.attn_processors for m in models]
    try:
        for m in models:
            m.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # noqa: BLE001 (auto: whatever xformers raises, SDPA works)
        if setting == "xformers":
            raise UserError(f"train.attention=xformers but xformers is unusable here: {exc}") from None
        for m, processors in zip(models, before, strict=True):
            m.set_attn_processor(processors)
        logger.warning("train.attention=auto: xformers is unusable here (%s); using PyTorch SDPA", exc)
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    rows: list
    held_rows: list
    skipped: list
    geometry: data.Geometry
    dataset: data.SDXLDataset
    sampler: data.BucketBatchSampler
    loader: Any
    cache_note: str
    loss_note: str = "plain mean"

    def bucket_summary(self) -> str:
        counts: dict = {}
        for b in self.dataset.buckets():
            counts[b] = counts.get(b, 0) + 1
        return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))


def build_train_data(
    cfg: TrainingConfig,
    comps,
    run: Run,
    encode_text: Callable,
    conditioning_column: str | None = None,
    objects: Callable[[list], loss_weights.ObjectSource] | None = None,
    **dataset_kwargs: Any,
) -> TrainData:
    """Rows -> held-out split -> buckets -> caches (split over each node's processes) -> dataset and loader.

    ``objects(train_rows)``: the recipe's source of labelled objects for the object-weighted loss (called only when
    ``loss.object_weight`` or ``loss.small_object_boost`` is set).
    """
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader

    d, accelerator = cfg.data, run.accelerator
    report = data.load_rows(
        d.train_csv, d.dataset, d.dataset_split, d.image_column, d.caption_column,
        conditioning_column=conditioning_column, on_bad_image=d.on_bad_image, max_rows=d.max_rows,
        mask_column=cfg.loss.mask,
    )  # fmt: skip
    val = cfg.validation  # every trainer's Config has a validation section
    train_rows, held_rows = data.holdout_split(report.rows, val.loss_rows, cfg.train.seed)
    if val.loss_csv:
        held_rows = data.load_rows(
            val.loss_csv, image_column=d.image_column, caption_column=d.caption_column,
            conditioning_column=conditioning_column,
        ).rows  # fmt: skip
    buckets = (
        data.sdxl_buckets(d.resolution, d.bucket_step) if d.use_buckets else [(d.resolution, d.resolution)]
    )
    align = comps.vae_scale_factor * 2 ** (len(comps.unet.config.block_out_channels) - 1)
    if any(w % align or h % align for w, h in buckets):
        raise UserError(
            f"bucket sides must be multiples of {align} px for this model; set data.bucket_step={align}"
        )
    geometry = data.Geometry(tuple(buckets), d.crop, d.random_flip, cfg.train.seed)
    store_dtype = getattr(torch, cfg.cache.dtype)

    latent_lookup = text_lookup = None
    built: dict[str, caches.CacheStats] = {}
    if cfg.cache.latents or cfg.cache.text_embeddings:
        # every process encodes its share of the fixed encoder batches (same bytes whoever builds), then one barrier
        shard = node_shard(accelerator)
        if cfg.cache.latents:
            vae = comps.vae
            vae_id = caches.module_fingerprint(vae)
            latent_cache = caches.FeatureCache(cfg.cache.dir, "latents")
            # hashing reads every image: split over all processes (every node reads the same data) and gathered
            hashes = caches.hash_images(
                train_rows, caches.Shard(accelerator.process_index, accelerator.num_processes), gather_object,
                progress=run.is_main,
            )  # fmt: skip
            _, built["latents"] = caches.build_latent_cache(
                train_rows, geometry, latent_cache, vae, vae_id, store_dtype=store_dtype, progress=run.is_main,
                image_hashes=hashes, shard=shard, num_workers=d.num_workers,
            )  # fmt: skip
            latent_lookup = caches.LatentLookup(
                latent_cache, hashes, vae_id, str(vae.dtype).replace("torch.", "")
            )
        if cfg.cache.text_embeddings:
            te_id = (
                caches.module_fingerprint(comps.text_encoder, comps.text_encoder_2)
                + comps.tokenizer.name_or_path
            )
            text_cache = caches.FeatureCache(cfg.cache.dir, "text")
            built["text"] = caches.build_text_cache(
                [r.text for r in train_rows], text_cache, encode_text, te_id, store_dtype=store_dtype,
                progress=run.is_main, shard=shard,
            )  # fmt: skip
            text_lookup = caches.TextLookup(text_cache, te_id)
        accelerator.wait_for_everyone()
    notes = cache_notes(accelerator, built)
    weight_fn, loss_note = loss_weight_map(cfg, train_rows, objects, comps.vae_scale_factor)
    dataset = data.SDXLDataset(
        train_rows, geometry, latent_lookup, text_lookup, loss_weight_fn=weight_fn, **dataset_kwargs
    )
    sampler = data.BucketBatchSampler(
        dataset.buckets(),
        cfg.train.batch_size,
        cfg.train.seed,
        accelerator.num_processes,
        accelerator.process_index,
    )
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=d.num_workers,
        pin_memory=run.device.type == "cuda",
        # keep the workers between epochs (a respawn stalls the loop each epoch); the sampler runs in this
        # process and every key carries its epoch, so the workers hold no per-epoch state
        persistent_workers=d.num_workers > 0,
    )  # fmt: skip
    cache_note = f"{cfg.cache.dir}: " + ", ".join(notes) if notes else "off"
    return TrainData(
        train_rows, held_rows, report.skipped, geometry, dataset, sampler, loader, cache_note, loss_note
    )


def loss_weight_map(
    cfg: TrainingConfig, rows: list, objects: Callable | None, factor: int
) -> tuple[loss_weights.WeightMap | None, str]:
    """The dataset's ``loss_weight_fn`` and a banner line; None when every ``loss`` weight key is at its default
    (the loss is then the plain mean, bit for bit)."""
    loss = cfg.loss
    if not loss_weights.weighting_on(loss):
        return None, "plain mean"
    source, parts = None, []
    if loss_weights.objects_weighted(loss):
        if objects is None:
            raise UserError(
                "loss.object_weight / loss.small_object_boost need labelled objects, and this trainer has none; "
                "set them to 1.0 / 0.0"
            )
        source = objects(rows)
        parts.append(
            f"objects x{loss.object_weight:g}, small-object boost {loss.small_object_boost:g} (cap "
            f"{loss.small_object_cap:g}): {source.note()}"
        )
    if loss.mask is not None:
        loss_weights.check_masks(rows, loss.mask)
        parts.append(f"masks of column {loss.mask}")
    return loss_weights.WeightMap(loss, source, factor), "; ".join(parts) + " (maps of mean 1)"


def node_shard(accelerator) -> caches.Shard:
    """This process's share of a cache build: the processes of its node split the build, so every node writes every
    entry. That works whether the nodes share ``cache.dir`` (they then write the same bytes, atomically) or each
    has its own, and needs no assumption about which files another node can see.

    A node is a host name; its share count is its highest local process index + 1 (two launchers on one host, as in
    the two-node test on localhost, then both build everything, which is still right).
    """
    import socket

    from accelerate.utils import gather_object

    host, local = socket.gethostname(), accelerator.local_process_index
    peers = gather_object([(host, local)])
    return caches.Shard(local, 1 + max(i for h, i in peers if h == host))


def cache_notes(accelerator, built: dict[str, caches.CacheStats]) -> list[str]:
    """Banner lines for the cache build: totals over the main process's node, and what each process built."""
    import socket

    from accelerate.utils import gather_object

    node = (socket.gethostname(), accelerator.process_index - accelerator.local_process_index)
    stats = gather_object([(node, name, s.hits, s.built) for name, s in built.items()]) if built else []
    notes = []
    for name in built:
        mine = [(hits, n) for key, kind, hits, n in stats if kind == name and key == node]
        note = f"{name} {caches.CacheStats(sum(h for h, _ in mine), sum(n for _, n in mine))}"
        if len(mine) > 1:
            note += f" (by {len(mine)} processes: {' + '.join(str(n) for _, n in mine)})"
        notes.append(note)
    return notes


def batch_latents(batch: dict, vae, vae_dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    """Scaled latents of a batch: a posterior sample from the cached mean/std, or from encoding the pixels (in
    the VAE's own dtype, outside any autocast)."""
    from ai.common.validation import vae_precision

    with torch.no_grad():
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            with vae_precision(vae):
                dist = vae.encode(batch["pixel_values"].to(device, vae_dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        sample = mean + std * torch.randn(mean.shape, generator=gen, device=device)
        return diffusion.scale_latents(vae.config, sample)


def batch_prompt_embeds(
    batch: dict, drop: torch.Tensor, encode_text: Callable, grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings of a batch with the rows in ``drop`` zeroed, prompt and pooled (caption dropout).

    Zeros, not the encoded empty caption: the SDXL pipelines' unconditional is zeros when there is no negative
    prompt (``force_zeros_for_empty_prompt``), so dropout trains the unconditional that guidance uses.
    Trained text encoders still encode every row (the dropped ones get a zero gradient): under DDP every
    process must use all of their parameters in every step.
    """
    device = drop.device
    if "prompt_embeds" in batch:
        embeds, pooled = batch["prompt_embeds"].to(device), batch["pooled_prompt_embeds"].to(device)
    else:
        with torch.set_grad_enabled(grad):
            embeds, pooled = encode_text(list(batch["text"]))
    embeds = torch.where(drop[:, None, None], torch.zeros((), dtype=embeds.dtype, device=device), embeds)
    pooled = torch.where(drop[:, None], torch.zeros((), dtype=pooled.dtype, device=device), pooled)
    return embeds, pooled


@dataclass
class Denoised:
    """One micro-batch's forward pass: what a loss term needs (the diffusion MSE, a reward on the clean estimate)."""

    latents: torch.Tensor  # clean, scaled latents x0
    noisy: torch.Tensor  # x_t
    timesteps: torch.Tensor
    pred: torch.Tensor  # the model's output (epsilon or v)
    target: torch.Tensor


def denoise(
    cfg: TrainingConfig,
    batch: dict,
    gen: torch.Generator,
    model,
    scheduler,
    vae,
    vae_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    encode_text: Callable,
    train_text: bool = False,
) -> Denoised:
    """Latents, caption dropout (redrawn every step), noise, timesteps and the ``model`` (a UNet, or a UNet steered
    by a ControlNet) on one micro-batch. Every draw comes from ``gen``."""
    device = gen.device
    latents = batch_latents(batch, vae, vae_dtype, gen, device)
    bsz = latents.shape[0]
    drop = torch.rand(bsz, generator=gen, device=device) < cfg.data.caption_dropout
    embeds, pooled = batch_prompt_embeds(batch, drop, encode_text, train_text)
    noise = diffusion.sample_noise(latents, gen, cfg.loss.noise_offset)
    timesteps = diffusion.sample_timesteps(bsz, cfg.loss.timestep_min, cfg.loss.timestep_max, gen, device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion.training_target(scheduler, latents, noise, timesteps, cfg.loss.prediction_type)
    pred = diffusion.unet_forward(
        model, noisy.to(weight_dtype), timesteps, embeds.to(weight_dtype), pooled.to(weight_dtype),
        batch["time_ids"].to(device, weight_dtype),
    )  # fmt: skip
    return Denoised(latents, noisy, timesteps, pred, target)


def diffusion_term(cfg: TrainingConfig, batch: dict, out: Denoised, scheduler) -> torch.Tensor:
    """The min-SNR-weighted MSE of a forward pass, each latent pixel scaled by the batch's ``loss_weight`` when the
    dataset made one (object-weighted loss)."""
    return diffusion.diffusion_loss(
        out.pred, out.target, out.timesteps, scheduler, cfg.loss.prediction_type, cfg.loss.snr_gamma,
        batch.get("loss_weight"),
    )  # fmt: skip


def denoising_loss(
    cfg: TrainingConfig,
    batch: dict,
    gen: torch.Generator,
    model,
    scheduler,
    vae,
    vae_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    encode_text: Callable,
    train_text: bool = False,
) -> torch.Tensor:
    """One micro-batch's training loss: :func:`denoise` then :func:`diffusion_term`."""
    out = denoise(cfg, batch, gen, model, scheduler, vae, vae_dtype, weight_dtype, encode_text, train_text)
    return diffusion_term(cfg, batch, out, scheduler)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------------


def build_optimizer(cfg: TrainingConfig, groups: list[dict]):
    """AdamW (or bitsandbytes' 8-bit AdamW) over ``groups`` and the LR schedule, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(
        groups, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.weight_decay
    )
    lr_scheduler = get_scheduler(
        o.lr_scheduler,
        optimizer,
        num_warmup_steps=o.lr_warmup_steps,
        num_training_steps=cfg.train.max_train_steps,
    )
    return optimizer, lr_scheduler


# ---------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Where the run is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    last_checkpoint: Path | None = None
    data_seconds: float = 0.0
    compute_seconds: float = 0.0

    def data_wait_share(self) -> float:
        return self.data_seconds / max(self.data_seconds + self.compute_seconds, 1e-9)


def build_ema(cfg: TrainingConfig, run: Run, trained: Sequence[torch.nn.Module]):
    """The EMA of the ``trained`` (unwrapped) models' trainable weights when ``ema.enabled``, registered for
    checkpointing (call it before :func:`resume_state`); None when off."""
    if not cfg.ema.enabled:
        return None
    from ai.common.ema import Ema

    if run.accelerator.state.deepspeed_plugin is not None:
        raise UserError(
            "ema.enabled=true with a DeepSpeed accelerate config: DeepSpeed keeps the fp32 weights sharded in its "
            "optimizer, the average would follow the low-precision copy. Set ema.enabled=false or use a plain "
            "(DDP) accelerate config"
        )
    ema = Ema(trained, cfg.ema.decay, cfg.ema.every_n_steps)
    run.accelerator.register_for_checkpointing(ema)
    return ema


@contextmanager
def averaged(ema) -> Iterator[None]:
    """The EMA weights in place of the live ones inside the block (nothing changes when ``ema`` is None)."""
    if ema is None:
        yield
    else:
        with ema.applied():
            yield


def resume_state(run: Run) -> LoopState:
    """Load accelerate's state from the resume checkpoint (if any) and return the loop position."""
    if run.resume is None:
        return LoopState()
    run.accelerator.load_state(str(run.resume))
    s = checkpoints.read_train_state(run.resume)
    return LoopState(step=s["step"], epoch=s["epoch"], batch=s["batch"], last_checkpoint=run.resume)


def save_checkpoint(
    cfg: TrainingConfig,
    run: Run,
    state: LoopState,
    export: Callable[[Path], None] | None,
    metrics,
    trained: Sequence[torch.nn.Module] = (),
    ema=None,
) -> Path:
    """``checkpoint-<step>`` on every process; ``export(folder)`` writes the ``trained`` models' fp32 weights (their
    EMA when ``ema`` is given; the checkpoint's training state keeps the live weights)."""
    from core.config import config_to_yaml

    @contextmanager
    def export_weights() -> Iterator[None]:
        with master_weights(run, trained), averaged(ema):
            yield

    path = checkpoints.save_checkpoint(
        run.accelerator, run.run_dir, state.step, {"epoch": state.epoch, "batch": state.batch}, config_to_yaml(cfg),
        export, cfg.checkpoint.total_limit, extra_context=export_weights,
    )  # fmt: skip
    state.last_checkpoint = path
    metrics.plot()
    return path


def run_loop(
    cfg: TrainingConfig,
    run: Run,
    train_data: TrainData,
    trainable: Sequence[torch.nn.Module],
    optimizer,
    lr_scheduler,
    compute_loss: Callable[
        [dict, torch.Generator], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]
    ],
    state: LoopState,
    metrics: training_log.MetricsLog,
    save: Callable[[LoopState], Any],
    validate: Callable[[int, Any], None],
    ema=None,
) -> LoopState:
    """Train until ``train.max_train_steps``; ``compute_loss(batch, gen)`` is the recipe's forward pass.

    Every random draw of a micro-step comes from ``gen``, seeded by seed, epoch and the micro-batch's place in the
    epoch's global order, so a resumed run continues exactly as an uninterrupted one, and N processes draw what
    one process with N-fold gradient accumulation draws for the same data.

    ``compute_loss`` may return ``(loss, terms)``: the named parts of the loss (e.g. ``diffusion`` and ``reward``),
    each averaged over the optimizer step's micro-batches and processes and logged beside ``loss``.
    """
    from tqdm.auto import tqdm

    accelerator, device = run.accelerator, run.device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if state.step == 0 and cfg.validation.every_n_steps:
        validate(0, None)
    for m in trainable:
        m.train()
    bar = tqdm(total=cfg.train.max_train_steps, initial=state.step, desc="train", disable=not run.is_main)
    loss_sum, loss_n, start_step = 0.0, 0, state.step
    term_sums: dict[str, list[float]] = {}
    max_steps = cfg.train.max_train_steps
    while state.step < max_steps:
        train_data.sampler.set_position(state.epoch, state.batch)
        tick = time.perf_counter()
        for batch in train_data.loader:
            state.data_seconds += time.perf_counter() - tick
            # local batch k of rank r out of n is the epoch's global batch k * n + r (the sampler deals round-robin)
            micro_batch = state.batch * accelerator.num_processes + accelerator.process_index
            gen = diffusion.step_generator(cfg.train.seed, state.epoch, micro_batch, device)
            state.batch += 1
            with accelerator.accumulate(*trainable):
                loss = compute_loss(batch, gen)
                loss, terms = loss if isinstance(loss, tuple) else (loss, {})
                for name, value in terms.items():
                    term_sums.setdefault(name, []).append(
                        accelerator.gather(value.detach()[None]).mean().item()
                    )
                step_loss = accelerator.gather(loss.detach()[None]).mean().item()
                training_log.check_finite(step_loss, state.step + 1, state.last_checkpoint)
                loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.compute_seconds += time.perf_counter() - tick
            if accelerator.sync_gradients:
                lr_scheduler.step()
                state.step += 1
                step = state.step
                if ema is not None:
                    ema.update(step)
                bar.update(1)
                avg, loss_sum, loss_n = loss_sum / loss_n, 0.0, 0
                parts = {name: sum(v) / len(v) for name, v in term_sums.items()}
                term_sums = {}
                lr = lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.2e}")
                if step % cfg.log.every_n_steps == 0 or step == max_steps:
                    sec = (state.data_seconds + state.compute_seconds) / (step - start_step)
                    share = state.data_wait_share()
                    metrics.log(
                        step,
                        loss=avg,
                        **parts,
                        lr=lr,
                        data_wait_share=share,
                        sec_per_step=sec,
                        epoch=state.epoch,
                    )
                    accelerator.log({"loss": avg, **parts, "lr": lr, "data_wait_share": share}, step=step)
                else:
                    metrics.log(step, loss=avg, **parts)
                if step % cfg.checkpoint.every_n_steps == 0 or step == max_steps:
                    save(state)
                if cfg.validation.every_n_steps and (
                    step % cfg.validation.every_n_steps == 0 or step == max_steps
                ):
                    validate(step, bar)
                if step >= max_steps:
                    break
            tick = time.perf_counter()  # checkpoints and validation count as neither data wait nor compute
        else:
            state.epoch, state.batch = state.epoch + 1, 0
    bar.close()
    return state


def validation_pass(run: Run, models: Sequence[torch.nn.Module], body: Callable[[], None], ema=None) -> None:
    """Run ``body`` on the main process with ``models`` in eval mode (holding their EMA weights when ``ema`` is
    given), then wait for every process."""
    if run.is_main:
        for m in models:
            m.eval()
        with averaged(ema):
            body()
        for m in models:
            m.train()
    run.accelerator.wait_for_everyone()


@contextmanager
def master_weights(run: Run, models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside the block the trained parameters hold their fp32 values, for exporting them.

    Without DeepSpeed they are fp32 already (autocast does the mixed precision). DeepSpeed with bf16/fp16 trains a
    low-precision copy and keeps the fp32 master weights, sharded across processes, in its optimizer: those are
    gathered (a collective call: every process must enter the block) and swapped in, then back.
    """
    if run.accelerator.state.deepspeed_plugin is None:
        yield
        return
    from deepspeed.utils import safe_get_full_fp32_param

    swapped = []
    for model in models:
        for param in model.parameters():
            master = safe_get_full_fp32_param(param) if param.requires_grad else None
            if master is not None and master.dtype != param.dtype:
                swapped.append((param, param.data))
                param.data = master.detach().to(param.device)
    try:
        yield
    finally:
        for param, low_precision in swapped:
            param.data = low_precision


def save_final(
    run: Run, write: Callable[[Path], Sequence[Path]], trained: Sequence[torch.nn.Module] = (), ema=None
) -> None:
    """Write the ``trained`` models' final fp32 weights (their EMA when ``ema`` is given) through
    ``write(tmp_dir) -> paths`` (main process) and move them into the run folder atomically. Every process must
    call it."""
    import shutil
    import tempfile

    with master_weights(run, trained), averaged(ema):
        if run.is_main:
            with tempfile.TemporaryDirectory(dir=run.run_dir, prefix=".tmp-final-") as tmp:
                for f in write(Path(tmp)):
                    f = Path(f)
                    target = run.run_dir / f.name
                    if f.is_dir() and target.exists():
                        shutil.rmtree(target)
                    os.replace(f, target)
    run.accelerator.wait_for_everyone()


def common_banner(cfg: TrainingConfig, run: Run, train_data: TrainData, state: LoopState) -> dict[str, Any]:
    """The start-banner lines every trainer prints (the recipe adds its own)."""
    t = cfg.train
    n_proc = run.accelerator.num_processes
    steps_per_epoch = math.ceil(len(train_data.sampler) / t.gradient_accumulation_steps)
    return {
        "examples": f"{len(train_data.rows)} (skipped {len(train_data.skipped)}, "
        f"held out for val loss {len(train_data.held_rows)})",
        "buckets (WxH: rows)": train_data.bucket_summary(),
        "batch per process": t.batch_size,
        "effective batch": f"{t.batch_size * t.gradient_accumulation_steps * n_proc}"
        f" (x{t.gradient_accumulation_steps} accumulation x{n_proc} processes)",
        "optimizer steps": f"{t.max_train_steps} (~{t.max_train_steps / max(steps_per_epoch, 1):.1f} epochs)",
        "caches": train_data.cache_note,
        "loss weights": train_data.loss_note,
        "resume": f"{run.resume} (step {state.step}, epoch {state.epoch}, batch {state.batch})"
        if run.resume
        else "fresh start",
        "output": str(run.run_dir),
    }


def flat_config(cfg: TrainingConfig) -> dict:
    """Config as flat scalars for the trackers' hyperparameter tables."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
