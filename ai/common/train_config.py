"""Config sections shared by the SDXL trainers (LoRA, ControlNet); each trainer adds its own method section.

config/lora_train.yaml and config/controlnet_train.yaml document every key. :class:`TrainingConfig` holds what
every trainer has; a trainer's ``Config`` subclasses it and adds (or narrows) sections.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ai.common.models import ModelSource
from core.config import Section


class ModelConfig(ModelSource):
    pretrained_model: str = (
        "models/sdxl-base"  # SDXL folder or .safetensors file (or hub id on an online host)
    )
    vae_fp16_safe: bool = False  # run the VAE in the mixed-precision dtype (only for an fp16-safe VAE)


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


class LossConfig(Section):
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: float | None = Field(5.0, gt=0)
    noise_offset: float = Field(0.0, ge=0.0)
    timestep_min: int = Field(0, ge=0)
    timestep_max: int = Field(1000, gt=0, le=1000)
    # object-weighted loss (ai/common/loss_weights.py): all at their defaults = the plain mean, no map is built
    object_weight: float = Field(1.0, gt=0)  # weight of labelled objects' pixels relative to background
    small_object_boost: float = Field(0.0, ge=0)  # extra weight growing as an object's area shrinks
    small_object_cap: float = Field(4.0, ge=0)  # the most extra weight the boost adds
    mask: str | None = None  # a CSV/dataset column of per-image grayscale loss masks (255 = 1.0)

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
    # how long a process waits for the others at a collective call (the cache build's barrier, validation and
    # checkpoint exports on the main process) before the run fails; torch's default is 10 min with NCCL
    process_group_timeout_minutes: int = Field(120, gt=0)


class CheckpointConfig(Section):
    every_n_steps: int = Field(500, gt=0)
    total_limit: int | None = Field(3, gt=0)
    resume_from: str | None = None


class ValidationConfig(Section):
    every_n_steps: int = Field(500, ge=0)
    seeds: list[int] = [0]
    num_inference_steps: int = Field(25, gt=0)
    guidance_scale: float = 5.0
    loss_rows: int = Field(0, ge=0)  # rows held out of training for the deterministic validation loss
    loss_csv: str | None = None  # or a separate CSV of held-out rows


class LogConfig(Section):
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    wandb_project: str = "bdd-sdxl"
    every_n_steps: int = Field(10, gt=0)


class EmaConfig(Section):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0.0, lt=1.0)  # per update; warmed up as min(decay, (1 + n) / (10 + n))
    every_n_steps: int = Field(1, gt=0)  # optimizer steps between updates


class OutputConfig(Section):
    runs_dir: str = "runs"
    name: str = "train"


class TrainingConfig(Section):
    """Sections every trainer has. Subclasses add ``validation`` and their method's section."""

    model: ModelConfig = ModelConfig()
    data: DataConfig
    cache: CacheConfig = CacheConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    ema: EmaConfig = EmaConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _cache_fits_crop(self):
        if self.cache.latents and self.data.crop == "random":
            raise ValueError(
                "data.crop=random draws a new crop every epoch, cached latents would pin one: "
                "set cache.latents=false or data.crop=center"
            )
        return self


# Keys that may change when resuming (everything else must match the checkpoint's config).
RESUME_FREE_KEYS = (
    "train.max_train_steps", "checkpoint", "validation", "log", "data.num_workers", "cache.dir", "output",
    "train.process_group_timeout_minutes",
)  # fmt: skip


def check_common_inputs(cfg: TrainingConfig, run_dir) -> None:
    """Fast checks before accelerate starts (no torch import): model folder, input files, resume compatibility."""
    from pathlib import Path

    from ai.common.checkpoints import check_resume_compatible, resolve_resume
    from ai.common.models import check_model_source, fp16_unsafe_vae_error, vae_config_path
    from core.cli import UserError

    check_model_source(cfg.model)
    vae_config = vae_config_path(cfg.model)  # a hub VAE's config is checked after loading (load_components)
    if cfg.model.vae_fp16_safe and vae_config is not None and vae_config.is_file():
        import json

        if json.loads(vae_config.read_text(encoding="utf-8")).get("force_upcast", False):
            raise fp16_unsafe_vae_error(str(vae_config))
    for key, value in (
        ("data.train_csv", cfg.data.train_csv),
        ("validation.loss_csv", getattr(cfg, "validation", None) and cfg.validation.loss_csv),
    ):
        if value and not Path(value).is_file():
            raise UserError(f"{key}: file not found: {value}")
    check_mask_column(cfg)
    if cfg.data.train_csv:
        check_table_size(cfg, count_csv_rows(Path(cfg.data.train_csv)))
    ckpt = resolve_resume(run_dir, cfg.checkpoint.resume_from)
    if ckpt is not None:
        check_resume_compatible(ckpt, cfg.model_dump(mode="json"), RESUME_FREE_KEYS, schema=type(cfg))


def check_mask_column(cfg: TrainingConfig) -> None:
    """``loss.mask`` must name a column of the training CSV (a dataset's columns are checked when it loads)."""
    import csv
    from pathlib import Path

    from core.cli import UserError

    if cfg.loss.mask is None or not cfg.data.train_csv or not Path(cfg.data.train_csv).is_file():
        return
    with Path(cfg.data.train_csv).open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if cfg.loss.mask not in header:
        raise UserError(
            f"loss.mask={cfg.loss.mask}: {cfg.data.train_csv} has no such column (its header: "
            f"{', '.join(header) or 'nothing'}); add a column of per-image grayscale mask paths, set loss.mask to "
            "its name, or remove loss.mask"
        )


def count_csv_rows(path) -> int:
    """Data rows of a CSV table (header excluded; quoted captions may span lines), without pandas or torch."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)


def check_table_size(cfg: TrainingConfig, table_rows: int) -> None:
    """The training table must keep rows for training after validation.loss_rows are held out (checked by
    ``--check``, so a shipped config on a small table fails before ``accelerate launch``, naming the fix)."""
    from core.cli import UserError

    rows = table_rows if cfg.data.max_rows is None else min(table_rows, cfg.data.max_rows)
    source = f"data.train_csv {cfg.data.train_csv} has {table_rows} rows" + (
        f" (data.max_rows={cfg.data.max_rows} keeps {rows})" if rows != table_rows else ""
    )
    if rows == 0:
        raise UserError(f"{source}: nothing to train on; point data.train_csv at the table stage 1 wrote")
    held = getattr(getattr(cfg, "validation", None), "loss_rows", 0)
    if held >= rows:
        fit = max(1, rows // 5) if rows >= 2 else 0
        raise UserError(
            f"validation.loss_rows={held} leaves no training rows: {source}. Hold out fewer, e.g. "
            f"validation.loss_rows={fit}, or set validation.loss_rows=0 validation.loss_csv=<a separate CSV> "
            "for the validation loss"
        )


def trainer_main(argv, *, prog: str, description: str, config_cls, check_inputs, train, example: str) -> int:
    """The command line every trainer shares: ``--config FILE [--check] [key=value ...]``."""
    import argparse

    from core.cli import setup_logging
    from core.config import add_config_arguments, load_config

    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=f"Overrides are dotted key=value pairs, e.g. {example}."
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.config is None:
        parser.error("the following arguments are required: --config")
    setup_logging()
    cfg = load_config(config_cls, args.config, args.overrides)
    check_inputs(cfg)
    if args.check:
        print(f"config OK: {args.config}")
        return 0
    return train(cfg)
