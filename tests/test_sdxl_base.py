"""The full SDXL architecture, exercised on CPU as a new user would run it: not part of ``make test``.

``make test-sdxl-base`` runs this module (``SDXL_BASE_CHECK=1``). It builds the ``sdxl-base`` preset (the real
stabilityai/stable-diffusion-xl-base-1.0 architecture, random weights, bf16 on disk; ~5 GB, kept in
``$SDXL_BASE_DIR``, default ``bench/_data/models/sdxl-base``, and reused) and then, through the users' launchers,
in bf16 at a low resolution (320x192):

* LoRA training on UNet and both text encoders (2 steps, a validation image), its exports loading in diffusers'
  ``StableDiffusionXLPipeline`` with a LoRA on every trained module, and LoRA inference;
* ControlNet-LoRA training (``controlnet.adapter=lora``, rank 64) with 8-bit AdamW (2 steps, a checkpoint per
  step), the final merged ``controlnet/`` loading with ``ControlNetModel.from_pretrained``, and ControlNet inference
  from the checkpoint's adapter (rebuilt from the base UNet). The full ControlNet runs the same with
  ``SDXL_BASE_FULL_CONTROLNET=1`` (~20 GB of host memory: its fp32 weights and gradients, 8-bit moments and the
  frozen bf16 UNet alone are 17.6 GB).

It asserts what a user would look at: finite losses, files that load with every trained module applied, images
that are not constant. Needs ~16 GB of free host memory and 10-30 minutes on 2 cores (peaks per test in
bench/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdxl_fixtures import run_launcher

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.environ.get("SDXL_BASE_CHECK") != "1", reason="full-size SDXL check: run `make test-sdxl-base`"
)
SIZE = (320, 192)  # a 320x180 frame's bucket at data.resolution=256 (bucket_step 64)
CPU = "config/accelerate_config_cpu.yaml"


@pytest.fixture(scope="module")
def sdxl_base() -> Path:
    from ai.common.build_model import build_model_folder

    out = Path(os.environ.get("SDXL_BASE_DIR") or REPO / "bench/_data/models/sdxl-base")
    return build_model_folder("sdxl-base", out, dtype="bfloat16")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """Mini-BDD100K and the stage 1 CSVs and captions, written by the users' stage 1 commands."""
    from convert import controlnet_bdd_to_huggingface_csv, generate_bdd_captions, lora_bdd_to_huggingface_csv
    from mini_bdd.make import make_mini_bdd

    root = tmp_path_factory.mktemp("sdxl_base")
    bdd_dir = root / "bdd100k"
    make_mini_bdd(bdd_dir, frames=24, size=(320, 180), seed=0)
    for split in ("train", "val"):
        generate_bdd_captions.main(
            ["--bdd_data_dir", str(bdd_dir), "--caption_txt_output_folder", str(root / "captions" / split),
             "--split", split]
        )  # fmt: skip
    lora_bdd_to_huggingface_csv.main(
        ["--images_path", str(bdd_dir / "images/100k/train"), "--captions_path", str(root / "captions/train"),
         "--output_folder", str(root / "csv"), "--split", "train"]
    )  # fmt: skip
    controlnet_bdd_to_huggingface_csv.main(
        ["--images_path", str(bdd_dir / "images/10k/train"), "--captions_path", str(root / "captions/train"),
         "--conditions_path", str(bdd_dir / "labels/sem_seg/masks/train"), "--output_folder", str(root / "csv"),
         "--split", "train"]
    )  # fmt: skip
    return root


def launch(script: str, config: Path, *overrides: str, timeout: int = 3600) -> None:
    proc = run_launcher(script, config, *overrides, accelerate_config=CPU, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def finite_losses(run: Path) -> list[float]:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(v) for v in losses), metrics
    return losses


def assert_not_constant(folder: Path, pattern: str = "*.png") -> None:
    files = sorted(folder.glob(pattern))
    assert files, f"no images in {folder}"
    for f in files:
        arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
        assert arr.std() > 1.0, f"{f} is constant (std {arr.std():.3f})"


def lora_modules(model) -> set[str]:
    """Names of the modules of ``model`` that carry a LoRA layer (peft's tuner layers with an adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and m.active_adapters}


def test_lora_trains_exports_loads_in_diffusers_and_generates(sdxl_base, stage1, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    runs = tmp_path / "runs"
    cfg = tmp_path / "lora_train.yaml"
    cfg.write_text((REPO / "config/lora_train.yaml").read_text())
    launch(
        "ai/lora/run_lora_train.sh", cfg,
        f"model.pretrained_model={sdxl_base}", f"data.train_csv={stage1}/csv/bdd_hf_dataset_lora_train.csv",
        "data.resolution=256", "data.num_workers=0", f"cache.dir={tmp_path}/cache", "cache.text_embeddings=false",
        "lora.train_text_encoder=true", "train.batch_size=1", "train.max_train_steps=2",
        "checkpoint.every_n_steps=2", "validation.every_n_steps=2", "validation.prompts=[a city street]",
        "validation.seeds=[0]", "validation.num_inference_steps=2", f"validation.width={SIZE[0]}",
        f"validation.height={SIZE[1]}", "validation.loss_rows=1", "log.report_to=none", f"output.runs_dir={runs}",
    )  # fmt: skip
    run = runs / "lora_train"
    finite_losses(run)
    assert_not_constant(run / "validation" / "step-000002")

    # the diffusers file and the kohya copy put a LoRA on every module the file has weights for, in all three models
    with safe_open(run / "pytorch_lora_weights.safetensors", "pt") as fh:
        trained = {k.rsplit(".lora_A", 1)[0] for k in fh.keys() if ".lora_A" in k}  # noqa: SIM118
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(
            sdxl_base, dtype=torch.bfloat16, local_files_only=True
        )
        pipe.load_lora_weights(run, weight_name=weight_name)
        for component in ("unet", "text_encoder", "text_encoder_2"):
            expected = {k.split(".", 1)[1] for k in trained if k.split(".", 1)[0] == component}
            applied = lora_modules(getattr(pipe, component))
            assert expected and len(applied) == len(expected), (
                weight_name,
                component,
                len(applied),
                len(expected),
            )
        del pipe

    infer = tmp_path / "lora_infer.yaml"
    infer.write_text((REPO / "config/lora_infer.yaml").read_text())
    launch(
        "ai/lora/run_lora_infer.sh", infer, f"model.pretrained_model={sdxl_base}", f"paths.lora_weights_path={run}",
        f"paths.infer_path={tmp_path}/lora_infer", "dtype=bf16", "num_inference_steps=2",
        f"resolution.width={SIZE[0]}", f"resolution.height={SIZE[1]}",
    )  # fmt: skip
    assert_not_constant(tmp_path / "lora_infer" / "generations")


@pytest.mark.parametrize(
    "adapter",
    [
        "lora",
        pytest.param(
            "full",
            marks=pytest.mark.skipif(
                os.environ.get("SDXL_BASE_FULL_CONTROLNET") != "1",
                reason="the full ControlNet needs ~20 GB of host memory (its fp32 weights and gradients, 8-bit "
                "moments and the frozen bf16 UNet alone are 17.6 GB): SDXL_BASE_FULL_CONTROLNET=1 runs it",
            ),
        ),
    ],
)
def test_controlnet_trains_checkpoints_exports_and_generates(sdxl_base, stage1, tmp_path, adapter):
    from diffusers import ControlNetModel

    runs = tmp_path / "runs"
    cfg = tmp_path / "controlnet_train.yaml"
    cfg.write_text((REPO / "config/controlnet_train.yaml").read_text())
    launch(
        "ai/controlnet/run_controlnet_train.sh", cfg,
        f"model.pretrained_model={sdxl_base}", f"data.train_csv={stage1}/csv/bdd_hf_dataset_controlnet_train.csv",
        "data.resolution=256", "data.num_workers=0", f"cache.dir={tmp_path}/cache", "optim.optimizer=adamw8bit",
        "train.batch_size=1", "train.max_train_steps=2", "checkpoint.every_n_steps=1", "checkpoint.total_limit=1",
        "validation.every_n_steps=2", "validation.num_images=1", "validation.seeds=[0]",
        "validation.num_inference_steps=2", "validation.loss_rows=1", "log.report_to=none", f"output.runs_dir={runs}",
        f"controlnet.adapter={adapter}", "controlnet.lora_rank=64",
    )  # fmt: skip
    run = runs / "controlnet_train"
    finite_losses(run)
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    assert_not_constant(run / "validation" / "step-000002")
    # a full ControlNet's checkpoint holds a ControlNet folder, a ControlNet-LoRA's its adapter (inference takes both)
    trained = run / "checkpoint-2" / ("controlnet" if adapter == "full" else "controlnet_adapter")
    for folder in [run / "controlnet", trained][: 2 if adapter == "full" else 1]:
        model = ControlNetModel.from_pretrained(folder)
        assert sum(p.numel() for p in model.parameters()) > 1_000_000_000
        del model
    if adapter == "lora":
        assert (trained / "controlnet_adapter.safetensors").stat().st_size < 600e6  # ~0.4 GB at rank 64

    infer = tmp_path / "controlnet_infer.yaml"
    infer.write_text((REPO / "config/controlnet_infer.yaml").read_text())
    bdd_dir = next(stage1.glob("bdd100k"))
    launch(
        "ai/controlnet/run_controlnet_infer.sh", infer, f"model.pretrained_model={sdxl_base}",
        f"paths.controlnet_path={trained if adapter == 'lora' else run / 'controlnet'}",
        f"paths.masks_path={bdd_dir}/labels/sem_seg/masks/val",
        f"paths.captions_path={stage1}/captions/val", "paths.source_labels=null",
        f"paths.infer_path={tmp_path}/controlnet_infer", "dtype=bf16", "num_inference_steps=2", "max_prompts=1",
        f"resolution.width={SIZE[0]}", f"resolution.height={SIZE[1]}",
    )  # fmt: skip
    assert_not_constant(tmp_path / "controlnet_infer" / "generations")
