"""Validation shared by the trainers: a deterministic loss on held-out rows and images from fixed prompts/seeds.

* :func:`encode_loss_set`: latents (posterior mean, center crop, no flip) and prompt embeddings of the held-out
  rows, computed once.
* :func:`loss_on_set`: :func:`ai.common.diffusion.fixed_noise_loss` averaged over the set; row i always gets the
  same noise and timesteps, so the number moves only when the weights do.
* :func:`generate_images`: one image per (prompt, seed) with a fresh Euler scheduler, saved as
  ``<out>/prompt<NN>_seed<S>.png``. A ControlNet trainer passes its own pipeline and extra call arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ai.common import data, diffusion


@torch.no_grad()
def encode_loss_set(rows, geometry: data.Geometry, vae, encode_text, device) -> list[tuple]:
    out = []
    for row in rows:
        plan = data.plan_crop(row.size, geometry.bucket_of(row), "center", False)
        px = data.to_tensor(data.apply_plan(data.open_image(row.image), plan))[None]
        lat = vae.encode(px.to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        emb, pooled = encode_text([row.text])
        out.append((lat, emb, pooled, diffusion.time_ids([plan.micro_conditioning()], device)))
    return out


@torch.no_grad()
def loss_on_set(
    unet, scheduler, loss_set, seed: int, t_range: tuple[int, int], prediction_type: str
) -> float:
    losses = [
        diffusion.fixed_noise_loss(unet, scheduler, lat, emb, pooled, tid, seed + i, t_range, prediction_type)
        for i, (lat, emb, pooled, tid) in enumerate(loss_set)
    ]
    return sum(losses) / len(losses)


def sdxl_pipeline(components, unet, text_encoder, text_encoder_2, vae, controlnet=None):
    """A StableDiffusionXL(ControlNet)Pipeline around the models being trained (no copies)."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    extra = {} if controlnet is None else {"controlnet": controlnet}
    pipeline_cls = StableDiffusionXLPipeline if controlnet is None else StableDiffusionXLControlNetPipeline
    pipe = pipeline_cls(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(components.scheduler.config), **extra,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(pipe, prompts, seeds, out: Path, device, **call_kwargs: Any) -> tuple[list, list[str]]:
    out.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for p_i, prompt in enumerate(prompts):
        for seed in seeds:
            gen = torch.Generator(device=device).manual_seed(seed)
            img = pipe(prompt, generator=gen, **call_kwargs).images[0]
            img.save(out / f"prompt{p_i:02d}_seed{seed}.png")
            images.append(img)
            captions.append(prompt)
    return images, captions
