"""Train an SDXL ControlNet on BDD100K segmentation masks or box layouts from a YAML config, under accelerate.

Usage::

    bash ai/controlnet/run_controlnet_train.sh [config/controlnet_train.yaml] [key=value ...]
    ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_train.sh \\
        config/demo/controlnet_train.yaml
    python -m ai.controlnet.train_controlnet_sdxl --config config/controlnet_train.yaml --check   # validate only

Data: the stage 1 ControlNet CSV (``image,conditioning_image,text``; ``convert/controlnet_bdd_to_huggingface_csv.py``)
or a Hugging Face dataset with those columns. ``controlnet.layout`` says what the conditioning images are:
``seg``, segmentation masks (label ids (mode L), colormaps (mode P) or palette RGB renderings), or ``boxes``, box
layouts rendered from det_20 boxes (``--layout boxes``; vocab/box_layout.py), for every labeled frame of
the 100K set. Either gets exactly its image's bucket, crop and flip, resampled nearest-neighbour, so no pixel gets
a class its map does not have. The ControlNet sees them as a palette (3 channels) or one-hot ids (19 channels for
masks, 11 for box layouts), with the ignore/background id 255 black / all-zero. The saved ControlNet records its
layout and encoding in its config.json (``_bdd_conditioning``); inference and ``controlnet.init_from`` refuse a
ControlNet of the other layout, and training refuses condition files of the other layout. UNet, VAE and text encoders stay frozen; latents and text
embeddings come from the same on-disk caches as the LoRA trainer's.

Control fidelity: at every validation the held-out rows' loss is measured with fixed noise and timesteps twice,
with the real condition and with a blank one. ``control_gap = loss(blank) - loss(real)`` starts at 0 (a fresh
ControlNet's zero convolutions change nothing) and grows as the ControlNet learns to use the layout.

Consistency reward (``reward:``, off by default; ai/controlnet/reward.py): a frozen detector or segmenter reads the
image decoded from the one-step clean estimate of low-noise samples and its loss against the layout is added to the
diffusion loss (ControlNet++); ``metrics.jsonl`` logs both terms.

Outputs in ``runs/<output.name>/``: ``checkpoint-<step>/`` (resumable, each with a ``controlnet/`` folder), the final
``controlnet/`` (``ControlNetModel.from_pretrained``, ``StableDiffusionXLControlNetPipeline``),
``config.resolved.yaml``, ``metrics.jsonl``, ``loss_curve.png`` (loss and control gap side by side),
``validation/step-*/`` (mask | generated sheets), ``logs/``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ai.common.generation import resolve_lora_file
from ai.common.train_config import (
    DataConfig,
    LogConfig,
    OutputConfig,
    TrainingConfig,
    ValidationConfig,
    check_common_inputs,
    trainer_main,
)
from ai.controlnet.reward import RewardConfig, check_reward
from core.cli import UserError, run_main
from core.config import Section
from vocab import layouts

logger = logging.getLogger("train_controlnet_sdxl")

# ---------------------------------------------------------------------------------------------------------------
# Config schema (config/controlnet_train.yaml documents every key; shared sections in ai/common/train_config.py)
# ---------------------------------------------------------------------------------------------------------------


class ControlNetDataConfig(DataConfig):
    conditioning_column: str = "conditioning_image"


class ControlNetConfig(Section):
    # a name of vocab/layouts.py's table: seg (segmentation masks), boxes (box layouts)
    layout: layouts.LayoutName = layouts.UNMARKED
    # palette: 3 channels (a colour per id); one_hot: one per id (19 for masks, 11 for box layouts)
    conditioning: layouts.Encoding = "palette"
    init_from: str | None = None  # an existing ControlNet folder; None: a fresh copy of the UNet's encoder
    # None: diffusers' (16, 32, 96, 256), x8 down like the SDXL VAE
    conditioning_embedding_out_channels: list[int] | None = None
    conditioning_embedding_init: Literal["kaiming", "default"] = "kaiming"  # fresh ControlNets (control.py)
    fuse_lora: str | None = None  # a LoRA (file or folder) fused into the frozen UNet first: style + layout
    fuse_lora_scale: float = 1.0
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16"  # of the final controlnet/ folder
    adapter: Literal["full", "lora"] = (
        "full"  # lora: LoRA layers on the frozen encoder copy (ai/controlnet/adapter.py)
    )
    lora_rank: int = Field(64, gt=0)
    lora_alpha: float | None = Field(None, gt=0)  # None: the rank (scale 1)
    lora_target_modules: list[str] = [
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    ]  # fmt: skip

    @model_validator(mode="after")
    def _adapter_fits(self):
        if self.adapter == "lora" and self.init_from is not None:
            raise ValueError(
                "controlnet.adapter=lora trains LoRA layers on a fresh copy of the base UNet's encoder; "
                "controlnet.init_from continues a full ControlNet: set controlnet.adapter=full or init_from=null"
            )
        if self.adapter == "lora" and self.fuse_lora:
            raise ValueError(
                "controlnet.adapter=lora with controlnet.fuse_lora: the adapter would only fit the base with that "
                "LoRA fused in, which inference cannot rebuild; train with controlnet.adapter=full"
            )
        return self

    def lora_settings(self):
        from ai.controlnet.adapter import LoraSettings

        if self.adapter != "lora":
            return None
        return LoraSettings(
            self.lora_rank, self.lora_alpha or float(self.lora_rank), tuple(self.lora_target_modules)
        )


class ControlNetValidationConfig(ValidationConfig):
    num_images: int = Field(2, ge=0)  # held-out masks rendered as mask | generated at each validation
    conditioning_scale: float = 1.0


class ControlNetLogConfig(LogConfig):
    wandb_project: str = "bdd-sdxl-controlnet"


class ControlNetOutputConfig(OutputConfig):
    name: str = "controlnet_train"


class Config(TrainingConfig):
    data: ControlNetDataConfig
    controlnet: ControlNetConfig = ControlNetConfig()
    validation: ControlNetValidationConfig = ControlNetValidationConfig()
    log: ControlNetLogConfig = ControlNetLogConfig()
    output: ControlNetOutputConfig = ControlNetOutputConfig()
    # the perception-consistency reward (ai/controlnet/reward.py); off by default
    reward: RewardConfig = RewardConfig()

    @model_validator(mode="after")
    def _held_out_rows(self):
        v = self.validation
        if v.every_n_steps and not (v.loss_rows or v.loss_csv):
            raise ValueError(
                "validation needs held-out masks (the fidelity check and the mask | generated sheets): set "
                "validation.loss_rows (rows held out of training) or validation.loss_csv, or "
                "validation.every_n_steps=0"
            )
        return self


def check_inputs(cfg: Config) -> None:
    """Fast checks before accelerate starts (no torch import)."""
    check_common_inputs(cfg, Path(cfg.output.runs_dir) / cfg.output.name)
    from ai.controlnet import conditioning

    for csv_path in (cfg.data.train_csv, cfg.validation.loss_csv):
        if (
            csv_path
        ):  # masks where box layouts are expected, or the other way round: refused now, not at step 0
            conditioning.check_csv_layout(csv_path, cfg.data.conditioning_column, cfg.controlnet.layout)
    if cfg.controlnet.init_from is not None and not Path(cfg.controlnet.init_from).exists():
        raise UserError(f"controlnet.init_from: not found: {cfg.controlnet.init_from}")
    # a LoRA folder without weights, or a wrong ControlNet folder or architecture, fails here, before accelerate
    resolve_lora_file(cfg.controlnet.fuse_lora, key="controlnet.fuse_lora")
    check_reward(cfg.reward, cfg.controlnet.layout)
    if cfg.controlnet.init_from is not None:
        from ai.common.models import config_source, is_local
        from ai.controlnet import architecture

        cn_config = architecture.read_model_config(architecture.resolve_controlnet(cfg.controlnet.init_from))
        architecture.check_init_layout(cn_config, cfg.controlnet.init_from, cfg.controlnet.layout)
        if is_local(cfg.model.pretrained_model):
            unet_config = architecture.read_model_config(config_source(cfg.model), "unet")
            architecture.check_controlnet_fits(
                cn_config, unet_config, cfg.controlnet.init_from, cfg.model.pretrained_model
            )


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train(cfg: Config) -> int:
    import torch

    from ai.common import data, diffusion, loss_weights, trainer, training_log, validation
    from ai.common.models import load_components, safetensors_files
    from ai.controlnet import adapter, conditioning, control

    run = trainer.start_run(cfg)
    accelerator, device, weight_dtype = run.accelerator, run.device, run.weight_dtype
    kind, layout = cfg.controlnet.conditioning, cfg.controlnet.layout

    # --- models: frozen SDXL (optionally with a style LoRA fused in) + trainable ControlNet ---
    # The frozen parts load in the precision they are frozen in (half the host memory of fp32), unless that rounds
    # what the ControlNet starts from: a LoRA fuses in fp32, and a fresh ControlNet copies the UNet's encoder in fp32
    # from its weight files (build_controlnet), else from an fp32 UNet.
    fresh = cfg.controlnet.init_from is None
    unet_files = safetensors_files(cfg.model.pretrained_model, "unet", cfg.model.variant) if fresh else None
    exact = not cfg.controlnet.fuse_lora and (not fresh or unet_files is not None)
    comps = load_components(
        cfg.model.pretrained_model, vae=cfg.model.vae, variant=cfg.model.variant,
        dtype=weight_dtype if exact else torch.float32,
        vae_dtype=trainer.vae_dtype_of(run, cfg.model.vae_fp16_safe),
        config_from=cfg.model.config_from, vae_fp16_safe=cfg.model.vae_fp16_safe,
    )  # fmt: skip
    scheduler = trainer.noise_scheduler(comps)  # DDPM noising for training (the pipeline samples with Euler)
    if cfg.controlnet.fuse_lora:
        control.fuse_lora(comps, cfg.controlnet.fuse_lora, cfg.controlnet.fuse_lora_scale)
    controlnet = control.build_controlnet(
        comps.unet, kind, cfg.controlnet.init_from, cfg.controlnet.conditioning_embedding_out_channels,
        cfg.controlnet.conditioning_embedding_init, unet_weights=unet_files if exact else None, layout=layout,
    )  # fmt: skip
    vae_dtype = trainer.place_frozen_models(comps, run, cfg.model.vae_fp16_safe)
    unet, vae, te1, te2 = comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2
    # full: all of it in fp32; lora: LoRA layers on the encoder copy, frozen in the UNet's precision
    kind_of_adapter, lora = adapter.ADAPTERS[cfg.controlnet.adapter], cfg.controlnet.lora_settings()
    probes = adapter.base_probes(controlnet) if lora else []  # recognise the base model at inference
    kind_of_adapter.prepare(controlnet, lora, weight_dtype)
    controlnet.to(device).train()  # trained tensors in fp32; autocast gives the mixed precision
    if cfg.train.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()  # the residuals' gradients flow back through the frozen UNet
    use_xformers = trainer.enable_attention([unet, controlnet], cfg.train.attention, device)
    reward = None  # the frozen decoder + perception model of the consistency reward (never in the optimizer)
    if cfg.reward.enabled:
        from ai.controlnet.reward import ConsistencyReward

        reward = ConsistencyReward(cfg.reward, layout, kind, vae, scheduler, device, cfg.loss.prediction_type)

    # --- data: rows with masks, caches shared with the LoRA trainer; conditions are cheap and stay uncached ---
    def encode_text(prompts):
        return diffusion.encode_prompts([te1, te2], [comps.tokenizer, comps.tokenizer_2], prompts)

    row_condition = control.RowCondition(kind, layout)
    train_data = trainer.build_train_data(
        cfg,
        comps,
        run,
        encode_text,
        conditioning_column=cfg.data.conditioning_column,
        conditioning_fn=row_condition,
        objects=lambda rows: loss_weights.LayoutObjects(row_condition.ids, layout),  # object-weighted loss
    )
    control.check_mask_sizes([*train_data.rows, *train_data.held_rows], layout=layout)

    # --- optimizer, schedule, accelerate ---
    optimizer, lr_scheduler = trainer.build_optimizer(
        cfg,
        [{"params": [p for p in controlnet.parameters() if p.requires_grad], "lr": cfg.optim.learning_rate}],
    )
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    raw = accelerator.unwrap_model(controlnet)
    ema = trainer.build_ema(cfg, run, [raw])  # None unless ema.enabled

    def save_hook(models, weights, output_dir):  # the ControlNet's trained tensors, the base stays out
        with trainer.master_weights(run, [raw]):  # every process saves state, so every process enters this
            if accelerator.is_main_process:
                kind_of_adapter.save_state(raw, Path(output_dir), lora, probes)
        weights.clear()

    def load_hook(models, input_dir):
        kind_of_adapter.load_state(raw, Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    state = trainer.resume_state(run)
    metrics = training_log.MetricsLog(run.run_dir, enabled=run.is_main, resume_step=state.step)
    accelerator.init_trackers(
        cfg.log.wandb_project if cfg.log.report_to == "wandb" else "controlnet",
        config=trainer.flat_config(cfg),
    )
    controlled = control.ControlledUNet(unet, controlnet)

    # --- validation (main process): control fidelity on held-out masks, and mask | generated sheets ---
    held = None  # (loss set, condition tensors, id maps) of the held-out rows, encoded once

    def held_out():
        nonlocal held
        if held is None:
            rows, geometry = train_data.held_rows, train_data.geometry
            with run.autocast():
                loss_set = validation.encode_loss_set(rows, geometry, vae, encode_text, device)
            plans = [data.plan_crop(r.size, geometry.bucket_of(r), "center", False) for r in rows]
            ids = [row_condition.ids(r, p) for r, p in zip(rows, plans, strict=True)]
            conds = [conditioning.ids_to_tensor(i, kind, layout)[None].to(device) for i in ids]
            held = (loss_set, conds, ids)
        return held

    if run.is_main and cfg.validation.every_n_steps:
        held_out()  # now, while the text encoders are still on the device (their captions are the prompts too)
    if cfg.cache.text_embeddings:  # every caption is in the cache
        trainer.release_text_encoders(comps, run)
        te1 = te2 = None  # the last references (encode_text's): their memory goes back now

    def fidelity() -> tuple[float, float]:
        loss_set, conds, _ = held_out()
        t_range, pred_type = (cfg.loss.timestep_min, cfg.loss.timestep_max), cfg.loss.prediction_type
        real = blank = 0.0
        for i, (sample, cond) in enumerate(zip(loss_set, conds, strict=True)):
            for condition, is_real in ((cond, True), (torch.zeros_like(cond), False)):
                controlled.set_condition(condition)
                loss = diffusion.fixed_noise_loss(
                    controlled, scheduler, *sample, cfg.train.seed + i, t_range, pred_type
                )
                real, blank = (real + loss, blank) if is_real else (real, blank + loss)
        n = len(loss_set)
        return real / n, blank / n

    def validate(step: int, bar) -> None:
        def body() -> None:
            with run.autocast():
                real, blank = fidelity()
            gap = blank - real
            metrics.log(step, val_loss=real, val_loss_blank=blank, control_gap=gap)
            accelerator.log({"val_loss": real, "val_loss_blank": blank, "control_gap": gap}, step=step)
            (bar.write if bar else logger.info)(
                f"step {step}: val_loss={real:.5f} blank-condition={blank:.5f} control_gap={gap:+.5f}"
            )
            loss_set, conds, ids = held_out()
            v, rows = cfg.validation, train_data.held_rows[: cfg.validation.num_images]
            if not rows:
                return
            # the trained ControlNet itself (no copy), with its own forward under autocast (control.own_forward);
            # captions come encoded (the loss set's), the text encoders may have left the device
            pipe = validation.sdxl_pipeline(comps, unet, None, None, vae, controlnet=raw)
            out = run.run_dir / "validation" / f"step-{step:06d}"
            out.mkdir(parents=True, exist_ok=True)
            sheets = []
            with control.own_forward(raw):
                for i, row in enumerate(rows):
                    cond, embeds = conds[i], loss_set[i][1:3]
                    for seed in v.seeds:
                        with run.autocast():
                            image = validation.generate_image(
                                pipe, embeds, seed, device, image=cond, width=cond.shape[-1],
                                height=cond.shape[-2], num_inference_steps=v.num_inference_steps,
                                guidance_scale=v.guidance_scale, controlnet_conditioning_scale=v.conditioning_scale,
                            )  # fmt: skip
                        sheet = conditioning.side_by_side(conditioning.ids_to_preview(ids[i], layout), image)
                        if reward is not None:  # | what the reward's perception model reads in the image
                            sheet = conditioning.side_by_side(sheet, reward.reading(image))
                        sheet.save(out / f"{Path(row.name or str(row.index)).stem}_seed{seed}.png")
                        sheets.append(sheet)
            training_log.log_images(accelerator, sheets, [r.text for r in rows for _ in v.seeds], step)

        trainer.validation_pass(run, [controlnet], body, ema)

    def export_controlnet(folder: Path) -> list[Path]:
        # tensor by tensor, each cast on the CPU (no second model in host memory: SDXL's is 5 GB in fp32), with
        # sorted keys: same weights, same bytes (inference reruns compare fingerprints)
        return kind_of_adapter.export(raw, folder, getattr(torch, cfg.controlnet.save_dtype), lora, probes)

    def export_ema_in_checkpoint(folder: Path) -> None:  # the checkpoint's own state holds the live weights
        export_controlnet(folder / "ema")

    # --- banner ---
    n_trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    training_log.banner(logger, "Running ControlNet training", {
        **trainer.common_banner(cfg, run, train_data, state),
        "precision": f"{cfg.train.mixed_precision} (VAE {str(vae_dtype).replace('torch.', '')}, ControlNet fp32)",
        "attention": "xformers" if use_xformers else "SDPA",
        "conditioning": f"{layouts.get(layout).what} as {kind} ({conditioning.channels_for(kind, layout)} "
        "channels, ids resized nearest-neighbour)",
        "ControlNet": f"{n_trainable:,} trainable parameters, from {cfg.controlnet.init_from or 'the UNet encoder'}"
        f"{f' (UNet with LoRA {cfg.controlnet.fuse_lora} fused)' if cfg.controlnet.fuse_lora else ''}",
        "consistency reward": f"{reward.perception} {cfg.reward.model}, weight {cfg.reward.weight}, t <= "
        f"{cfg.reward.max_timestep}, every {cfg.reward.every_n_steps} step(s) from step {cfg.reward.start_step}, "
        f"decoder {cfg.reward.decoder}" if reward else "off",
    })  # fmt: skip

    # --- loop ---

    def compute_loss(batch: dict, gen):
        controlled.set_condition(batch["conditioning"].to(device, weight_dtype))
        out = trainer.denoise(
            cfg, batch, gen, controlled, scheduler, vae, vae_dtype, weight_dtype, encode_text
        )
        loss = trainer.diffusion_term(cfg, batch, out, scheduler)
        if reward is None:
            return loss
        terms = {"diffusion": loss.detach()}
        if cfg.reward.active(state.step):  # the optimizer step being computed (run_loop advances ``state``)
            value = reward(batch, out)
            terms["reward"] = value.detach()
            loss = loss + cfg.reward.weight * value
        return loss, terms

    def save(state) -> Path:
        if ema is None:
            return trainer.save_checkpoint(cfg, run, state, None, metrics)
        return trainer.save_checkpoint(cfg, run, state, export_ema_in_checkpoint, metrics, ema=ema)

    state = trainer.run_loop(
        cfg,
        run,
        train_data,
        [controlnet],
        optimizer,
        lr_scheduler,
        compute_loss,
        state,
        metrics,
        save,
        validate,
        ema,
    )

    # --- final export ---
    trainer.save_final(run, export_controlnet, trained=[raw], ema=ema)
    if run.is_main:
        metrics.plot()
        logger.info(
            "done: %d steps; ControlNet in %s (%s); data wait %.1f %% of step time",
            state.step, run.run_dir / "controlnet", cfg.controlnet.save_dtype, 100 * state.data_wait_share(),
        )  # fmt: skip
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    return trainer_main(
        argv,
        prog="python -m ai.controlnet.train_controlnet_sdxl",
        description="Train an SDXL ControlNet on segmentation masks or box layouts from a YAML config (launch with "
        "ai/controlnet/run_controlnet_train.sh).",
        config_cls=Config,
        check_inputs=check_inputs,
        train=train,
        example="controlnet.conditioning=one_hot",
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
