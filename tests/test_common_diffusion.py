"""ai/common/diffusion.py: noise, timesteps, targets, Min-SNR weights, time ids, SDXL prompt encoding."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from ai.common import diffusion

SCHED = DDPMScheduler(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def test_noise_offset_shifts_whole_channels_and_is_seeded():
    lat = torch.zeros(2, 4, 8, 8)
    plain = diffusion.sample_noise(lat, torch.Generator().manual_seed(0))
    again = diffusion.sample_noise(lat, torch.Generator().manual_seed(0))
    assert torch.equal(plain, again)
    offset = diffusion.sample_noise(lat, torch.Generator().manual_seed(0), offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))  # constant per (sample, channel)
    assert shift.abs().max() > 0


def test_timesteps_stay_in_range():
    t = diffusion.sample_timesteps(4000, 200, 300, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 200 and t.max() <= 299 and len(t.unique()) == 100


def test_targets_epsilon_and_v():
    lat, noise, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([0, 500, 999])
    assert torch.equal(diffusion.training_target(SCHED, lat, noise, t, "epsilon"), noise)
    ab = SCHED.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * lat
    torch.testing.assert_close(diffusion.training_target(SCHED, lat, noise, t, "v_prediction"), v)


def test_min_snr_weights():
    t = torch.tensor([10, 500, 990])
    snr = SCHED.alphas_cumprod[t] / (1 - SCHED.alphas_cumprod[t])
    w_eps = diffusion.min_snr_weights(SCHED, t, 5.0, "epsilon")
    torch.testing.assert_close(w_eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w_eps[0] < 1.0 and w_eps[2] == pytest.approx(1.0)  # low-noise steps are down-weighted
    w_v = diffusion.min_snr_weights(SCHED, t, 5.0, "v_prediction")
    torch.testing.assert_close(w_v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    pred, target = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    assert diffusion.diffusion_loss(pred, target, t, SCHED).item() == pytest.approx(1.0)
    weighted = diffusion.diffusion_loss(pred, target, t, SCHED, "epsilon", 5.0).item()
    assert weighted == pytest.approx(w_eps.mean().item())


def test_time_ids_layout():
    ids = diffusion.time_ids([(720, 1280, 0, 10, 768, 1344)])
    assert ids.shape == (1, 6) and ids.tolist()[0] == [720, 1280, 0, 10, 768, 1344]


@pytest.fixture(scope="module")
def components(tiny_sdxl):
    from ai.common.models import load_components

    return load_components(tiny_sdxl)


def test_prompt_encoding_is_sdxl_shaped_and_penultimate(components):
    c = components
    embeds, pooled = diffusion.encode_prompts([c.text_encoder, c.text_encoder_2], [c.tokenizer, c.tokenizer_2],
                                              ["a road", ""])  # fmt: skip
    d1, d2 = c.text_encoder.config.hidden_size, c.text_encoder_2.config.hidden_size
    assert embeds.shape == (2, 77, d1 + d2)
    assert pooled.shape == (2, c.text_encoder_2.config.projection_dim)
    ids = diffusion.tokenize(c.tokenizer, ["a road"])
    penultimate = c.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(embeds[:1, :, :d1], penultimate)
    assert not torch.allclose(embeds[0], embeds[1])  # the empty prompt differs


def test_fixed_noise_loss_is_deterministic(components):
    c = components
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb, pooled = diffusion.encode_prompts(
        [c.text_encoder, c.text_encoder_2], [c.tokenizer, c.tokenizer_2], ["x"]
    )
    tid = diffusion.time_ids([(64, 64, 0, 0, 64, 64)])
    a = diffusion.fixed_noise_loss(c.unet, c.scheduler, lat, emb, pooled, tid, seed=1)
    b = diffusion.fixed_noise_loss(c.unet, c.scheduler, lat, emb, pooled, tid, seed=1)
    other = diffusion.fixed_noise_loss(c.unet, c.scheduler, lat, emb, pooled, tid, seed=2)
    assert a == b and a != other and 0 < a < 10


def test_training_noises_with_the_ddpm_forward_process_not_the_samplers_sigmas(tmp_path):
    """SDXL folders ship an Euler sampler, whose add_noise is x0 + sigma * noise; training must not use that."""
    from ai.common import trainer
    from ai.common.build_model import build_model_folder
    from ai.common.models import load_components

    comps = load_components(build_model_folder("tiny", tmp_path / "tiny"))
    sched = trainer.noise_scheduler(comps)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    v = diffusion.training_target(
        sched, x0, noise, t, "v_prediction"
    )  # get_velocity works with int timesteps
    torch.testing.assert_close(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    assert torch.equal(
        sched.alphas_cumprod, comps.scheduler.alphas_cumprod
    )  # same beta schedule as the model's


def test_a_micro_batchs_draws_follow_its_place_in_the_global_order_not_the_process():
    """run_loop keys a micro-batch's generator on (seed, epoch, k * n + r) for local batch k of rank r out of n: the
    sampler deals the epoch's global batches round-robin, so that key names the same data (and so the same noise)
    however many processes share the epoch; 1 process x 2 accumulation steps then trains what 2 processes do."""
    from ai.common.data import BucketBatchSampler

    buckets = [(64, 64)] * 5 + [(96, 48)] * 7
    whole = BucketBatchSampler(buckets, 2, seed=3).batches(epoch=1)
    for n in (2, 3):
        for r in range(n):
            for k, batch in enumerate(BucketBatchSampler(buckets, 2, 3, n, r).batches(epoch=1)):
                assert batch == whole[k * n + r]

    def draw(seed, epoch, micro_batch):
        return torch.rand(3, generator=diffusion.step_generator(seed, epoch, micro_batch, "cpu"))

    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    keys = [(0, 1, 5), (0, 1, 6), (0, 2, 5), (1, 1, 5), (0, 0, 1_000_005)]
    draws = [draw(*k) for k in keys]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])
