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

import logging
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ai.common.train_config import (
    DataConfig,
    LogConfig,
    OutputConfig,
    TrainingConfig,
    ValidationConfig,
    check_common_inputs,
    trainer_main,
)
from core.cli import UserError, run_main
from core.config import Section

logger = logging.getLogger("train_lora_sdxl")

# ---------------------------------------------------------------------------------------------------------------
# Config schema (config/lora_train.yaml documents every key; the shared sections live in ai/common/train_config.py)
# ---------------------------------------------------------------------------------------------------------------


class LoraDataConfig(DataConfig):
    # det_20 or legacy BDD labels (file or per-image folder) of the training images, matched by file name: the
    # objects of the object-weighted loss (loss.object_weight, loss.small_object_boost)
    labels_file: str | None = None


class LoraConfig(Section):
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    init: Literal["gaussian", "default"] = "gaussian"
    train_text_encoder: bool = False
    text_encoder_learning_rate: float = Field(5.0e-6, gt=0)
    text_encoder_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoraValidationConfig(ValidationConfig):
    prompts: list[str] = []
    width: int = Field(1344, gt=0)
    height: int = Field(768, gt=0)


class LoraLogConfig(LogConfig):
    wandb_project: str = "bdd-sdxl-lora"


class LoraOutputConfig(OutputConfig):
    name: str = "lora_train"
    kohya_copy: bool = True


class Config(TrainingConfig):
    data: LoraDataConfig
    lora: LoraConfig = LoraConfig()
    validation: LoraValidationConfig = LoraValidationConfig()
    log: LoraLogConfig = LoraLogConfig()
    output: LoraOutputConfig = LoraOutputConfig()

    @model_validator(mode="after")
    def _text_cache_fits(self):
        if self.cache.text_embeddings and self.lora.train_text_encoder:
            raise ValueError(
                "lora.train_text_encoder=true changes the text embeddings every step: set cache.text_embeddings=false"
            )
        return self


def unread_text_encoder_modules(text_encoder, targets: list[str]) -> list[str]:
    """The LoRA target modules in ``text_encoder``'s last layer, for text encoder 1 (a CLIPTextModel).

    SDXL reads that encoder's penultimate hidden states, so its last layer never touches the result: LoRA weights
    there would get no gradient, and DDP fails on parameters without one. Text encoder 2 needs all of its layers (its
    pooled output comes from the last one).
    """
    import torch

    stacks = [
        (name, m)
        for name, m in text_encoder.named_modules()
        if isinstance(m, torch.nn.ModuleList) and name.endswith("layers") and len(m)
    ]
    last = f"{stacks[-1][0]}.{len(stacks[-1][1]) - 1}."
    return [
        name
        for name, _ in text_encoder.named_modules()
        if name.startswith(last) and any(name == t or name.endswith(f".{t}") for t in targets)
    ]


def check_inputs(cfg: Config) -> None:
    """Fast checks before accelerate starts (no torch import)."""
    check_common_inputs(cfg, Path(cfg.output.runs_dir) / cfg.output.name)
    if cfg.validation.every_n_steps and not (
        cfg.validation.prompts or cfg.validation.loss_rows or cfg.validation.loss_csv
    ):
        raise UserError(
            "validation.every_n_steps is set but there are no validation.prompts and no loss rows"
        )
    from ai.common.loss_weights import objects_weighted

    if objects_weighted(cfg.loss) and not cfg.data.labels_file:
        raise UserError(
            f"loss.object_weight={cfg.loss.object_weight:g} / loss.small_object_boost={cfg.loss.small_object_boost:g}"
            " weight the pixels of labelled objects, but there are no labels: set data.labels_file to the det_20 "
            "(or legacy) labels JSON of the training images, or set loss.object_weight=1.0 and "
            "loss.small_object_boost=0.0"
        )
    if cfg.data.labels_file and not Path(cfg.data.labels_file).exists():
        raise UserError(f"data.labels_file: not found: {cfg.data.labels_file}")


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train(cfg: Config) -> int:
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from ai.common import diffusion, lora_export, trainer, training_log, validation
    from ai.common.models import load_components

    run = trainer.start_run(cfg)
    accelerator, device, weight_dtype = run.accelerator, run.device, run.weight_dtype

    # --- models: frozen SDXL (loaded in the precision it is frozen in, the VAE in fp32) + fp32 LoRA ---
    comps = load_components(
        cfg.model.pretrained_model, vae=cfg.model.vae, variant=cfg.model.variant, dtype=weight_dtype,
        vae_dtype=trainer.vae_dtype_of(run, cfg.model.vae_fp16_safe),
        config_from=cfg.model.config_from, vae_fp16_safe=cfg.model.vae_fp16_safe,
    )  # fmt: skip
    scheduler = trainer.noise_scheduler(comps)  # DDPM noising for training (the pipeline samples with Euler)
    vae_dtype = trainer.place_frozen_models(comps, run, cfg.model.vae_fp16_safe)
    unet, vae, te1, te2 = comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2
    lora_init = "gaussian" if cfg.lora.init == "gaussian" else True

    def lora_config(targets: list[str], exclude: list[str] | None = None) -> PeftLoraConfig:
        return PeftLoraConfig(
            r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            init_lora_weights=lora_init, target_modules=list(targets), exclude_modules=exclude or None,
        )  # fmt: skip

    unet.add_adapter(lora_config(cfg.lora.target_modules))
    text_encoders = [te1, te2] if cfg.lora.train_text_encoder else []
    te_targets = cfg.lora.text_encoder_target_modules
    for te in text_encoders:
        unread = unread_text_encoder_modules(te, te_targets) if te is te1 else None
        te.add_adapter(lora_config(te_targets, unread))
    trainable_models = [unet, *text_encoders]
    cast_training_params(
        trainable_models, dtype=torch.float32
    )  # fp32 LoRA: no "unscale FP16 gradients" error
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in text_encoders:
            te.gradient_checkpointing_enable()
    use_xformers = trainer.enable_attention([unet], cfg.train.attention, device)

    # --- data and caches ---
    tokenizers = [comps.tokenizer, comps.tokenizer_2]

    def encode_text(prompts):  # the plain encoders: caches, validation (one process)
        return diffusion.encode_prompts([te1, te2], tokenizers, prompts)

    def objects(rows):  # the object-weighted loss's boxes, matched to the training rows by file name
        from ai.common.loss_weights import BoxObjects

        return BoxObjects.from_labels_file(cfg.data.labels_file, rows)

    train_data = trainer.build_train_data(cfg, comps, run, encode_text, objects=objects)

    # --- optimizer, schedule, accelerate ---
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.optim.learning_rate}]
    for te in text_encoders:
        params = [p for p in te.parameters() if p.requires_grad]
        groups.append({"params": params, "lr": cfg.lora.text_encoder_learning_rate})
    optimizer, lr_scheduler = trainer.build_optimizer(cfg, groups)
    # the scheduler is stepped once per optimizer step here (not prepared: accelerate would step it per process)
    prepared = accelerator.prepare(*trainable_models, optimizer)
    unet, text_encoders, optimizer = prepared[0], list(prepared[1:-1]), prepared[-1]
    trainable_models = [unet, *text_encoders]
    accelerator.register_for_checkpointing(lr_scheduler)
    raw = [accelerator.unwrap_model(m) for m in trainable_models]  # PEFT models without DDP wrappers
    ema = trainer.build_ema(cfg, run, raw)  # None unless ema.enabled

    def encode_text_train(prompts):
        """The training forward through the prepared (DDP) text encoders: their LoRA gradients are averaged over
        the processes like the UNet's."""
        return diffusion.encode_prompts(text_encoders, tokenizers, prompts)

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
        if accelerator.state.deepspeed_plugin is None:  # DeepSpeed owns the dtypes (and the fp32 masters)
            cast_training_params(raw, dtype=torch.float32)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    state = trainer.resume_state(run)
    metrics = training_log.MetricsLog(run.run_dir, enabled=run.is_main, resume_step=state.step)
    accelerator.init_trackers(
        cfg.log.wandb_project if cfg.log.report_to == "wandb" else "lora", config=trainer.flat_config(cfg)
    )

    # --- validation (main process): deterministic held-out loss and images from fixed prompts and seeds ---
    val_set, val_prompts = [], []  # held-out rows and validation prompts, encoded

    def encode_validation_inputs() -> None:
        nonlocal val_set, val_prompts
        with torch.no_grad(), run.autocast():
            if train_data.held_rows and not val_set:  # the held-out latents once
                val_set = validation.encode_loss_set(
                    train_data.held_rows, train_data.geometry, vae, encode_text, device
                )
            elif text_encoders:  # trained text encoders: their current embeddings
                val_set = validation.with_text(val_set, train_data.held_rows, encode_text)
            val_prompts = [encode_text([p]) for p in cfg.validation.prompts]

    if run.is_main and cfg.validation.every_n_steps:
        encode_validation_inputs()  # now, while the text encoders are still on the device
    if cfg.cache.text_embeddings:  # every caption is in the cache (and the encoders are frozen then)
        trainer.release_text_encoders(comps, run)
        te1 = te2 = None  # the last references (encode_text's): their memory goes back now

    def validate(step: int, bar) -> None:
        def body() -> None:
            if text_encoders:
                encode_validation_inputs()
            if val_set:
                with run.autocast():
                    t_range = (cfg.loss.timestep_min, cfg.loss.timestep_max)
                    vl = validation.loss_on_set(
                        raw[0], scheduler, val_set, cfg.train.seed, t_range, cfg.loss.prediction_type
                    )
                metrics.log(step, val_loss=vl)
                accelerator.log({"val_loss": vl}, step=step)
                (bar.write if bar else logger.info)(f"step {step}: val_loss={vl:.5f}")
            if cfg.validation.prompts:
                pipe = validation.sdxl_pipeline(comps, raw[0], None, None, vae)  # prompts come encoded
                v = cfg.validation
                with run.autocast():
                    images, captions = validation.generate_images(
                        pipe, v.prompts, val_prompts, v.seeds, run.run_dir / "validation" / f"step-{step:06d}",
                        device, num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                        width=v.width, height=v.height,
                    )  # fmt: skip
                training_log.log_images(accelerator, images, captions, step)

        trainer.validation_pass(run, trainable_models, body, ema)

    def export_lora(folder: Path) -> list[Path]:
        te_raw = raw[1:] if text_encoders else [None, None]
        return lora_export.save_lora(folder, raw[0], *te_raw, kohya=cfg.output.kohya_copy)

    # --- banner ---
    n_trainable = sum(p.numel() for m in raw for p in m.parameters() if p.requires_grad)
    training_log.banner(logger, "Running LoRA training", {
        **trainer.common_banner(cfg, run, train_data, state),
        "precision": f"{cfg.train.mixed_precision} (VAE {str(vae_dtype).replace('torch.', '')}, LoRA fp32)",
        "attention": "xformers" if use_xformers else "SDPA",
        "trainable parameters": f"{n_trainable:,} (LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha}"
        f"{', + text encoders' if text_encoders else ''})",
    })  # fmt: skip

    # --- loop ---

    def compute_loss(batch: dict, gen) -> torch.Tensor:
        return trainer.denoising_loss(
            cfg,
            batch,
            gen,
            unet,
            scheduler,
            vae,
            vae_dtype,
            weight_dtype,
            encode_text_train if text_encoders else encode_text,
            bool(text_encoders),
        )

    def save(state) -> Path:
        return trainer.save_checkpoint(cfg, run, state, export_lora, metrics, trained=raw, ema=ema)

    state = trainer.run_loop(
        cfg,
        run,
        train_data,
        trainable_models,
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
    trainer.save_final(run, export_lora, trained=raw, ema=ema)
    if run.is_main:
        metrics.plot()
        logger.info(
            "done: %d steps; LoRA in %s (diffusers%s); data wait %.1f %% of step time",
            state.step, run.run_dir / lora_export.DIFFUSERS_NAME, " + kohya copy" if cfg.output.kohya_copy else "",
            100 * state.data_wait_share(),
        )  # fmt: skip
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    return trainer_main(
        argv,
        prog="python -m ai.lora.train_lora_sdxl",
        description="Train an SDXL LoRA from a YAML config (launch with ai/lora/run_lora_train.sh).",
        config_cls=Config,
        check_inputs=check_inputs,
        train=train,
        example="optim.learning_rate=5e-5",
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
