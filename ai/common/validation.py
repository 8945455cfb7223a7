"""Validation shared by the trainers: a deterministic loss on held-out rows and images from fixed prompts/seeds.

* :func:`encode_loss_set`: latents (posterior mean, center crop, no flip) and prompt embeddings of the held-out
  rows, computed once (:func:`with_text` re-encodes the captions, for trained text encoders).
* :func:`loss_on_set`: :func:`ai.common.diffusion.fixed_noise_loss` averaged over the set; row i always gets the
  same noise and timesteps, so the number moves only when the weights do.
* :func:`generate_image` / :func:`generate_images`: one image per (prompt, seed) with a fresh Euler scheduler from
  precomputed prompt embeddings (the text encoders may have left the GPU), saved as ``<out>/prompt<NN>_seed<S>.png``.

The VAE always computes in its own dtype, outside any autocast the caller runs the UNet under: the stock SDXL VAE
overflows in fp16 (its config says ``force_upcast``), and autocast would run the "fp32" VAE's convolutions in fp16
(black images, NaN losses). The pipelines upcast only a VAE whose dtype is fp16, so they denoise to latents here
and :func:`decode_latents` decodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ai.common import data, diffusion


def vae_precision(vae):
    """A block in which the VAE runs in its own dtype, whatever autocast the caller has entered."""
    return torch.autocast(vae.device.type, enabled=False)


@torch.no_grad()
def encode_loss_set(rows, geometry: data.Geometry, vae, encode_text, device) -> list[tuple]:
    out = []
    for row in rows:
        plan = data.plan_crop(row.size, geometry.bucket_of(row), "center", False)
        px = data.to_tensor(data.apply_plan(data.open_image(row.image), plan))[None]
        with vae_precision(vae):
            mean = vae.encode(px.to(device, vae.dtype)).latent_dist.mean.float()
        lat = diffusion.scale_latents(vae.config, mean)
        emb, pooled = encode_text([row.text])
        out.append((lat, emb, pooled, diffusion.time_ids([plan.micro_conditioning()], device)))
    return out


@torch.no_grad()
def with_text(loss_set: list[tuple], rows, encode_text) -> list[tuple]:
    """The loss set with its captions encoded again (text encoders that train change the embeddings)."""
    return [
        (lat, *encode_text([row.text]), tid) for (lat, _, _, tid), row in zip(loss_set, rows, strict=True)
    ]


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
    """A StableDiffusionXL(ControlNet)Pipeline around the models being trained (no copies).

    The text encoders may be None: :func:`generate_image` passes prompt embeddings.
    """
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
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """The pipeline's latents as PIL images, decoded as the SDXL pipelines do (scaling factor, optional
    latents_mean/std, watermark if installed, postprocessing) but always in the VAE's own dtype."""
    vae = pipe.vae
    with vae_precision(vae):
        latents = diffusion.unscale_latents(vae.config, latents.to(vae.device, torch.float32)).to(vae.dtype)
        image = vae.decode(latents, return_dict=False)[0]
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")


@torch.no_grad()
def generate_image(pipe, embeds: tuple[torch.Tensor, torch.Tensor], seed: int, device, **call_kwargs: Any):
    """One image from prompt embeddings ``(prompt_embeds, pooled_prompt_embeds)``.

    The unconditional is zeros (``force_zeros_for_empty_prompt``, no negative prompt), as caption dropout trains.
    The UNet runs under the caller's autocast; the VAE decodes outside it (:func:`decode_latents`).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    latents = pipe(
        prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], generator=gen, output_type="latent",
        **call_kwargs,
    ).images  # fmt: skip
    return decode_latents(pipe, latents)[0]


@torch.no_grad()
def generate_images(
    pipe, prompts, embeds, seeds, out: Path, device, **call_kwargs: Any
) -> tuple[list, list[str]]:
    """Every (prompt, seed) pair, with ``embeds[i]`` the embeddings of ``prompts[i]``; saved and returned."""
    out.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for p_i, (prompt, emb) in enumerate(zip(prompts, embeds, strict=True)):
        for seed in seeds:
            img = generate_image(pipe, emb, seed, device, **call_kwargs)
            img.save(out / f"prompt{p_i:02d}_seed{seed}.png")
            images.append(img)
            captions.append(prompt)
    return images, captions
