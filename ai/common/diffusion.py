"""SDXL training numerics, written once for every trainer: prompt encoding, noise, timesteps, targets, loss.

* :func:`encode_prompts`: SDXL's text conditioning = penultimate hidden states of both CLIP encoders concatenated
  (77 x 2048 for SDXL base) + the pooled, projected output of encoder 2 (1280).
* :func:`sample_noise`: Gaussian noise plus an optional per-channel offset (darker darks, brighter brights).
* :func:`sample_timesteps`: uniform integers in a configured range [t_min, t_max).
* :func:`training_target`: epsilon or v-prediction.
* :func:`diffusion_loss`: MSE, optionally Min-SNR-gamma weighted (Hang et al. 2023).
* :func:`fixed_noise_loss`: the same loss at fixed noise and timesteps (deterministic validation loss).
* :func:`scale_latents` / :func:`unscale_latents`: VAE posterior samples <-> the UNet's latent space.

All randomness goes through an explicit ``torch.Generator`` so a step's draws depend only on the seed and the
step, not on what ran before (exact resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

PredictionType = Literal["epsilon", "v_prediction"]


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(
    text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings.

    Args:
        text_encoders: (CLIPTextModel, CLIPTextModelWithProjection).
        tokenizers: their tokenizers.
        prompts: B captions ("" for the unconditional / dropped caption).

    Returns:
        (prompt_embeds [B, 77, d1 + d2], pooled_prompt_embeds [B, proj_dim of encoder 2]).
    """
    states, pooled = [], None
    for encoder, tok in zip(text_encoders, tokenizers, strict=True):
        # the device of its weights: a DDP-wrapped encoder (text-encoder LoRA training) has no .device
        ids = tokenize(tok, prompts).to(next(encoder.parameters()).device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(states, dim=-1), pooled


def time_ids(micro_conditioning: Sequence[Sequence[int]], device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL ``add_time_ids`` [B, 6]: original (h, w), crop top-left (top, left), target (h, w) per sample."""
    return torch.tensor([list(m) for m in micro_conditioning], device=device, dtype=dtype)


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0
) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        b, c = latents.shape[:2]
        shift = torch.randn((b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + offset * shift
    return noise


def sample_timesteps(
    batch: int, t_min: int, t_max: int, generator: torch.Generator | None, device=None
) -> torch.Tensor:
    """Uniform integer timesteps in [t_min, t_max)."""
    return torch.randint(t_min, t_max, (batch,), generator=generator, device=device, dtype=torch.long)


def training_target(
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(
    scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: PredictionType
) -> torch.Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    prediction_type: PredictionType = "epsilon",
    snr_gamma: float | None = None,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error in fp32, per-sample weighted by Min-SNR-gamma when ``snr_gamma`` is set.

    ``pixel_weight`` (batch, 1, h, w), each sample's mean 1 (ai/common/loss_weights.py), scales every latent pixel's
    squared error before the mean; None computes exactly the plain mean.
    """
    squared = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if pixel_weight is not None:
        squared = squared * pixel_weight.to(squared.device, torch.float32)
    per_sample = squared.mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma, prediction_type)
    return per_sample.mean()


def _latent_stats(vae_config, like: torch.Tensor):
    """The VAE config's per-channel ``latents_mean``/``latents_std`` (some SDXL-family VAEs have them), or None."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return torch.tensor(mean).view(shape).to(like), torch.tensor(std).view(shape).to(like)


def scale_latents(vae_config, posterior_sample: torch.Tensor) -> torch.Tensor:
    """A VAE posterior sample in the UNet's latent space: ``x * scaling_factor``, or
    ``(x - latents_mean) * scaling_factor / latents_std`` for a VAE whose config has those (the inverse of
    what the SDXL pipelines do before decoding)."""
    stats = _latent_stats(vae_config, posterior_sample)
    if stats is None:
        return posterior_sample * vae_config.scaling_factor
    mean, std = stats
    return (posterior_sample - mean) * vae_config.scaling_factor / std


def unscale_latents(vae_config, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`scale_latents`: UNet latents -> the VAE decoder's input."""
    stats = _latent_stats(vae_config, latents)
    if stats is None:
        return latents / vae_config.scaling_factor
    mean, std = stats
    return latents * std / vae_config.scaling_factor + mean


def add_noise(scheduler, latents, noise, timesteps):
    return scheduler.add_noise(latents, noise, timesteps)


def unet_forward(unet, noisy, timesteps, prompt_embeds, pooled, add_time_ids):
    return unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids},
        return_dict=False,
    )[0]


@torch.no_grad()
def fixed_noise_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    add_time_ids: torch.Tensor,
    seed: int = 0,
    t_range: tuple[int, int] = (0, 1000),
    prediction_type: PredictionType = "epsilon",
    n_timesteps: int = 4,
) -> float:
    """Deterministic loss: each sample at ``n_timesteps`` evenly spaced timesteps with noise from ``seed``.

    The same inputs give the same number before and after training, so the difference measures learning.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ts = torch.linspace(t_range[0], t_range[1] - 1, n_timesteps).round().long()
    total = 0.0
    dtype = next(unet.parameters()).dtype
    for t in ts:
        noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
        timesteps = t.repeat(latents.shape[0]).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet_forward(
            unet,
            noisy.to(dtype),
            timesteps,
            prompt_embeds.to(dtype),
            pooled.to(dtype),
            add_time_ids.to(dtype),
        )
        target = training_target(scheduler, latents, noise, timesteps, prediction_type)
        total += F.mse_loss(pred.float(), target.float()).item()
    return total / len(ts)


def step_generator(seed: int, epoch: int, micro_batch: int, device) -> torch.Generator:
    """A generator for one micro-batch: its draws depend on (seed, epoch, micro-batch) only.

    ``micro_batch`` is the position in the epoch's global order of micro-batches (see
    :class:`ai.common.data.BucketBatchSampler`: local batch k of rank r out of n is global batch k * n + r), not the
    process: the same data then gets the same noise and dropout however the global batch is split, so 1 process x
    2 accumulation steps trains what 2 processes x 1 step do.
    """
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + micro_batch) % 2**63)
    return g
