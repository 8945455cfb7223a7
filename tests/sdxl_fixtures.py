"""Shared test helpers for the SDXL tests: small image sets, pixels and records of a generations folder, a steering
ControlNet. The fixtures (the tiny model, one torch thread) are in conftest.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ("a city street at night", "a highway in the rain", "a residential road, clear day")


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A smooth gradient JPEG (compresses like a photo, differs per seed)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.3, 1.0, 3)
    arr = np.stack([x * 255 * a / w, y * 255 * b / h, (x + y) * 127 * c / (w + h) + 40 * (seed % 3)], -1)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def make_image_csv(
    folder: Path,
    n: int = 8,
    sizes=((320, 180), (180, 320), (256, 256)),
    captions=CAPTIONS,
    name: str = "train.csv",
    relative: bool = True,
) -> Path:
    """``n`` JPEGs plus a CSV with image,text columns (paths relative to the CSV unless ``relative=False``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = write_image(folder / f"img{i:02d}.jpg", sizes[i % len(sizes)], seed=i)
        rows.append((img.name if relative else str(img), captions[i % len(captions)]))
    path = folder / name
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text"])
        writer.writerows(rows)
    return path


def pixels(path: Path) -> np.ndarray:
    """An image file as int16 RGB, so differences of two images do not wrap around."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def records(gen: Path) -> list[dict]:
    """The metadata records of a generations folder."""
    return [json.loads(line) for line in (gen / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def steer_outputs(controlnet, seed: int, scale: float = 0.3):
    """Random (seeded) output convolutions, so a fresh ControlNet's condition changes the image; returns it."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return controlnet


def watch_controlnet_conditions(monkeypatch) -> list:
    """Make ControlNet inference record each condition tensor its ControlNet is called with (CFG: the doubled
    batch); returns the list they are appended to. ``monkeypatch``: pytest's (or a ``pytest.MonkeyPatch()``)."""
    from ai.controlnet import infer_controlnet_sdxl

    seen: list = []
    load_controlnet = infer_controlnet_sdxl.load_controlnet

    def load_and_watch(*a, **kw):
        controlnet = load_controlnet(*a, **kw)
        controlnet.register_forward_pre_hook(
            lambda _m, _a, k: seen.append(k["controlnet_cond"].clone()), with_kwargs=True
        )
        return controlnet

    monkeypatch.setattr(infer_controlnet_sdxl, "load_controlnet", load_and_watch)
    return seen


def run_launcher(
    launcher: str,
    *args,
    accelerate_config: str = "config/accelerate_config_cpu.yaml",
    timeout: int = 300,
    cwd: Path | None = None,
    **env: str,
):
    """``bash <launcher> args...`` as a user runs it (ACCELERATE_CONFIG, PYTHON = this interpreter, extra
    environment), from the repo root unless ``cwd``; the completed process, output captured."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    environ = dict(os.environ, ACCELERATE_CONFIG=str(root / accelerate_config), PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(root / launcher), *map(str, args)],
        cwd=cwd or root, env=environ, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def save_random_lora(model: Path, folder: Path, seed: int = 0) -> Path:
    """A rank-4 LoRA on the tiny UNet's attention, saved as training saves it (``pytorch_lora_weights.safetensors``
    in ``folder``), with random (seeded) B matrices so that it changes the image; returns ``folder``."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (a no-op LoRA); make it change the output
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def watch_text_encoder_release(monkeypatch) -> list[bool]:
    """Patch the trainers' ``release_text_encoders`` and ``run_loop``: the returned list gets, at the loop's start,
    whether each released text encoder is still referenced (after a garbage collection)."""
    import gc
    import weakref

    from ai.common import trainer

    released, alive_at_loop = [], []
    release, loop = trainer.release_text_encoders, trainer.run_loop

    def release_and_watch(comps, run):
        released.extend(weakref.ref(m) for m in (comps.text_encoder, comps.text_encoder_2))
        release(comps, run)

    def loop_after_release(*args, **kwargs):
        gc.collect()
        alive_at_loop.extend(r() is not None for r in released)
        return loop(*args, **kwargs)

    monkeypatch.setattr(trainer, "release_text_encoders", release_and_watch)
    monkeypatch.setattr(trainer, "run_loop", loop_after_release)
    return alive_at_loop
