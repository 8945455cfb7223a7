"""Training and validation numerics that only show on a GPU, tested through their logic on the tiny model (CPU):
the VAE outside autocast, caption dropout's unconditional, the xformers fallback, frozen parts loaded in the
weight dtype, an exact fresh ControlNet from a bf16 UNet, and the trained ControlNet in a bf16 validation pipeline.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sdxl_fixtures import make_image_csv

from ai.common import data, diffusion, trainer, validation

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def comps(tiny_sdxl):
    from ai.common.models import load_components

    return load_components(tiny_sdxl)


def encoder(comps):
    def encode(prompts):
        return diffusion.encode_prompts(
            [comps.text_encoder, comps.text_encoder_2], [comps.tokenizer, comps.tokenizer_2], prompts
        )

    return encode


class VaeWatch:
    """Records, for every VAE encoder/decoder convolution call, the dtype it computed in and whether autocast was
    on (an input pre-hook would only see what was passed in, not what autocast computes in)."""

    def __init__(self, vae):
        self.seen: list[tuple[str, torch.dtype, bool]] = []
        self.handles = [
            vae.encoder.conv_in.register_forward_hook(self.hook("encode")),
            vae.decoder.conv_out.register_forward_hook(self.hook("decode")),
        ]

    def hook(self, where):
        def record(module, args, output):
            self.seen.append((where, output.dtype, torch.is_autocast_enabled("cpu")))

        return record

    def close(self):
        for h in self.handles:
            h.remove()


# --- the VAE computes in its own dtype under the evaluation passes' autocast ------------------------------------


def test_vae_runs_in_its_own_dtype_under_autocast(comps, tmp_path):
    """bf16 autocast (CPU's only autocast dtype; on CUDA fp16 it overflows the stock SDXL VAE): the held-out rows
    encode, training batches encode, and validation latents decode in the fp32 VAE's fp32, outside autocast."""
    csv = make_image_csv(tmp_path / "data", n=2)
    rows = data.load_rows(str(csv)).rows
    geometry = data.Geometry(((64, 48), (48, 64), (64, 64)), "center", False, 0)
    watch = VaeWatch(comps.vae)
    pipe = validation.sdxl_pipeline(comps, comps.unet, None, None, comps.vae)
    embeds = encoder(comps)(["a road"])
    try:
        with torch.autocast("cpu", dtype=BF16):
            assert torch.is_autocast_enabled("cpu")
            loss_set = validation.encode_loss_set(rows, geometry, comps.vae, encoder(comps), "cpu")
            batch = {"pixel_values": torch.rand(1, 3, 32, 32) * 2 - 1}
            trainer.batch_latents(batch, comps.vae, torch.float32, torch.Generator().manual_seed(0), "cpu")
            image = validation.generate_image(
                pipe, embeds, 0, "cpu", num_inference_steps=1, guidance_scale=1.0, width=32, height=32
            )
    finally:
        watch.close()
    assert [w for w, _, _ in watch.seen] == ["encode", "encode", "encode", "decode"]
    assert {(dtype, autocast) for _, dtype, autocast in watch.seen} == {(torch.float32, False)}
    assert loss_set[0][0].dtype == torch.float32 and image.size == (32, 32)
    assert np.asarray(image).std() > 0  # not a constant (black) image


def test_validation_images_are_the_pipelines_own(comps):
    """Latents from the pipeline, decoded by validation.decode_latents, give the pipeline's own image (fp32, where
    nothing rounds differently), with prompt embeddings passed in and without text encoders in the pipeline."""
    from diffusers import StableDiffusionXLPipeline

    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, width=48, height=32)
    full = StableDiffusionXLPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
        scheduler=validation.sdxl_pipeline(comps, comps.unet, None, None, comps.vae).scheduler,
    )  # fmt: skip
    full.set_progress_bar_config(disable=True)
    expected = full("a road", generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    pipe = validation.sdxl_pipeline(comps, comps.unet, None, None, comps.vae)
    got = validation.generate_image(pipe, encoder(comps)(["a road"]), 3, "cpu", **kwargs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_latents_mean_and_std_of_the_vae_config_are_undone_before_decoding(comps):
    """Some SDXL-family VAEs normalise latents per channel (config latents_mean/std); the pipelines undo that before
    decoding, so must validation, and training's latents must be normalised the same way."""
    import copy

    vae = copy.deepcopy(comps.vae)
    vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 1.5])
    pipe = validation.sdxl_pipeline(comps, comps.unet, None, None, vae)
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    got = np.asarray(validation.decode_latents(pipe, latents)[0])
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    with torch.no_grad():
        decoded = vae.decode(latents * std / vae.config.scaling_factor + mean).sample
    expected = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
    np.testing.assert_array_equal(got, expected)
    sample = torch.randn(1, 4, 4, 6)
    torch.testing.assert_close(diffusion.unscale_latents(vae.config, diffusion.scale_latents(vae.config, sample)),
                               sample)  # fmt: skip


# --- caption dropout trains the unconditional that generation uses ----------------------------------------------


class Recorder(torch.nn.Module):
    """A UNet stand-in that records the text conditioning it gets."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict=False):
        self.calls.append((encoder_hidden_states, added_cond_kwargs["text_embeds"]))
        return (sample * self.w,)


@pytest.mark.parametrize("cached", [True, False])
def test_dropped_captions_are_zeros_like_the_pipelines_unconditional(comps, cached):
    """The SDXL pipelines (force_zeros_for_empty_prompt, on in the validation pipelines and SDXL's model_index)
    guide against zero prompt and pooled embeddings; caption dropout must train exactly that, not the encoded ""."""
    from types import SimpleNamespace

    assert validation.sdxl_pipeline(
        comps, comps.unet, None, None, comps.vae
    ).config.force_zeros_for_empty_prompt
    encode = encoder(comps)
    texts = ["a road", "a street at night", "rain"]
    batch = {"latent_mean": torch.randn(3, 4, 4, 4), "latent_std": torch.zeros(3, 4, 4, 4), "text": texts,
             "time_ids": diffusion.time_ids([(32, 32, 0, 0, 32, 32)] * 3)}  # fmt: skip
    if cached:
        batch["prompt_embeds"], batch["pooled_prompt_embeds"] = encode(texts)
    cfg = SimpleNamespace(
        data=SimpleNamespace(caption_dropout=1.0),
        loss=SimpleNamespace(noise_offset=0.0, timestep_min=0, timestep_max=1000, prediction_type="epsilon",
                             snr_gamma=None),
    )  # fmt: skip
    model = Recorder()
    scheduler = trainer.noise_scheduler(comps)
    gen = torch.Generator().manual_seed(0)
    trainer.denoising_loss(cfg, batch, gen, model, scheduler, comps.vae, torch.float32, torch.float32, encode)
    ((embeds, pooled),) = model.calls
    assert embeds.shape == (3, 77, comps.unet.config.cross_attention_dim) and pooled.shape[0] == 3
    assert not embeds.any() and not pooled.any()
    cfg.data.caption_dropout = 0.0  # nothing dropped: the captions' own embeddings
    trainer.denoising_loss(cfg, batch, gen, model, scheduler, comps.vae, torch.float32, torch.float32, encode)
    torch.testing.assert_close(model.calls[1][0], encode(texts)[0])


# --- the attention backend: auto falls back to SDPA on any xformers failure -----------------------------------


def test_auto_attention_falls_back_to_sdpa_on_any_xformers_failure(tiny_sdxl, monkeypatch, caplog):
    """One model switched to xformers, the next fails with an error that is not an ImportError (a build without
    kernels for this GPU): ``auto`` restores the first model's processors and warns once; ``xformers`` refuses."""
    from diffusers import ControlNetModel
    from diffusers.models.attention_processor import XFormersAttnProcessor

    from ai.common.models import load_components
    from core.cli import UserError

    unet = load_components(tiny_sdxl).unet
    controlnet = ControlNetModel.from_unet(unet)
    before = {k: type(v) for k, v in unet.attn_processors.items()}

    def partly(self):  # what diffusers does, without needing xformers installed
        self.set_attn_processor(XFormersAttnProcessor())

    def broken(self):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(type(unet), "enable_xformers_memory_efficient_attention", partly)
    monkeypatch.setattr(ControlNetModel, "enable_xformers_memory_efficient_attention", broken)
    cuda = torch.device("cuda")  # only its type is read: auto tries xformers on CUDA only
    with caplog.at_level(logging.WARNING, logger="ai.common.trainer"):
        assert trainer.enable_attention([unet, controlnet], "auto", cuda) is False
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before  # not left half on xformers
    warnings = [r for r in caplog.records if "xformers" in r.getMessage()]
    assert len(warnings) == 1 and "no kernel image" in warnings[0].getMessage()
    with pytest.raises(UserError, match="train.attention=xformers but xformers is unusable here"):
        trainer.enable_attention([unet, controlnet], "xformers", cuda)


def test_fp16_safe_flag_with_a_vae_that_needs_fp32_is_refused(tiny_sdxl, tmp_path):
    """model.vae_fp16_safe=true with a VAE whose config says force_upcast (the tiny one does, as SDXL's) is refused
    before accelerate starts, naming both keys; a VAE without force_upcast is accepted."""
    import json
    import shutil

    import yaml

    from ai.lora.train_lora_sdxl import main
    from core.cli import UserError

    csv = make_image_csv(tmp_path / "data", n=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"pretrained_model": str(tiny_sdxl)}, "data": {"train_csv": str(csv)},
                                   "validation": {"every_n_steps": 0}, "output": {"runs_dir": str(tmp_path)}}))  # fmt: skip
    with pytest.raises(UserError) as err:
        main(["--config", str(cfg), "--check", "model.vae_fp16_safe=true"])
    assert "model.vae_fp16_safe=true" in str(err.value) and "force_upcast: true" in str(err.value)
    assert str(tiny_sdxl / "vae" / "config.json") in str(err.value)
    safe = shutil.copytree(tiny_sdxl / "vae", tmp_path / "safe_vae")
    config = json.loads((safe / "config.json").read_text())
    (safe / "config.json").write_text(json.dumps(dict(config, force_upcast=False)))
    assert main(["--config", str(cfg), "--check", "model.vae_fp16_safe=true", f"model.vae={safe}"]) == 0


# --- text-encoder LoRA under DDP: every LoRA parameter gets a gradient ------------------------------------------


def test_text_encoder_lora_parameters_all_get_gradients(tiny_sdxl):
    """SDXL reads text encoder 1's penultimate layer, so a LoRA on its last layer would get no gradient (and DDP,
    which averages the text encoders' gradients over processes, fails on such parameters): none is put there, and
    every text-encoder LoRA parameter, of both encoders, gets a gradient from the SDXL conditioning."""
    from peft import LoraConfig

    from ai.common.models import load_components
    from ai.lora.train_lora_sdxl import LoraConfig as Section
    from ai.lora.train_lora_sdxl import unread_text_encoder_modules

    c = load_components(tiny_sdxl)
    targets = [*Section().text_encoder_target_modules, "fc1", "fc2"]
    last = c.text_encoder.config.num_hidden_layers - 1
    unread = unread_text_encoder_modules(c.text_encoder, targets)
    assert sorted(unread) == sorted(f"encoder.layers.{last}.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))  # fmt: skip
    for te, exclude in ((c.text_encoder, unread), (c.text_encoder_2, None)):
        te.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, exclude_modules=exclude,
                                  init_lora_weights="gaussian"))  # fmt: skip
        for name, p in te.named_parameters():
            if "lora_B" in name:  # B starts at zero, so only B's gradient is non-zero on the first step
                torch.nn.init.normal_(p, std=0.1)
    embeds, pooled = encoder(c)(["a road at night", "rain"])
    (embeds.square().mean() + pooled.square().mean()).backward()
    trained = {
        n: p for te in (c.text_encoder, c.text_encoder_2) for n, p in te.named_parameters() if p.requires_grad
    }
    assert len(trained) == 2 * 6 * (2 * last + 1)  # A and B of 6 modules: TE1 without its last layer, TE2 all
    no_grad = [n for n, p in trained.items() if p.grad is None or not p.grad.any()]
    assert no_grad == []


# --- frozen parts in the weight dtype; a fresh ControlNet's init stays exact -----------------------------------


def test_fresh_controlnet_from_a_bf16_unet_starts_from_the_fp32_weights(tiny_sdxl):
    """The ControlNet trainer loads the frozen UNet in bf16; the fresh ControlNet it copies from it must hold the
    fp32 path's weights exactly (read from the UNet's file), not bf16-rounded ones."""
    from ai.common.models import load_components, safetensors_files
    from ai.controlnet import control

    files = safetensors_files(tiny_sdxl, "unet")
    assert files == [tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors"]
    unet32 = load_components(tiny_sdxl).unet
    unet16 = load_components(tiny_sdxl, dtype=BF16, vae_dtype=torch.float32).unet
    torch.manual_seed(5)
    expected = control.build_controlnet(unet32, "palette").state_dict()
    torch.manual_seed(5)
    got = control.build_controlnet(unet16, "palette", unet_weights=files).state_dict()
    assert got.keys() == expected.keys()
    assert all(v.dtype == torch.float32 for v in got.values())
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert differ == []
    torch.manual_seed(5)
    rounded = control.build_controlnet(unet16, "palette").state_dict()  # copied from the bf16 UNet itself
    assert not torch.equal(rounded["conv_in.weight"], expected["conv_in.weight"])


# --- the trained ControlNet in a bf16 validation pipeline: its own forward, no copy ------------------------------


def test_trained_controlnet_validates_with_its_own_forward_under_autocast(comps):
    """accelerate's mixed precision wraps the trained ControlNet's forward to return fp32. In validation the
    pipeline must get residuals in the UNet's dtype from the same weights: inside own_forward the wrapped model
    gives a plain fp32 copy's image under autocast (same weights, same numerics), and the wrapper is back after."""
    import copy
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    from ai.controlnet import control

    unet = copy.deepcopy(comps.unet).to(BF16)
    trained = control.build_controlnet(comps.unet, "palette")
    with torch.no_grad():
        for block in (*trained.controlnet_down_blocks, trained.controlnet_mid_block):  # "trained": not zero
            block.weight.normal_(0, 0.05)
    plain = copy.deepcopy(trained)
    # what accelerator.prepare does to a model under mixed precision (accelerate 1.x prepare_model)
    autocast = torch.autocast("cpu", dtype=BF16)
    trained.forward = MethodType(convert_outputs_to_fp32(autocast(type(trained).forward)), trained)
    wrapped = trained.forward
    residual_dtypes = []
    unet.register_forward_pre_hook(
        lambda m, a, kw: residual_dtypes.extend(
            r.dtype for r in kw.get("down_block_additional_residuals") or ()
        ),
        with_kwargs=True,
    )
    cond = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    embeds = [e.to(BF16) for e in encoder(comps)(["a road"])]

    def image(controlnet):
        pipe = validation.sdxl_pipeline(comps, unet, None, None, comps.vae, controlnet=controlnet)
        with torch.autocast("cpu", dtype=BF16):
            return np.asarray(validation.generate_image(
                pipe, embeds, 1, "cpu", image=cond, width=48, height=32, num_inference_steps=2, guidance_scale=3.0))  # fmt: skip

    with control.own_forward(trained) as model:
        assert model is trained
        got = image(trained)
    assert set(residual_dtypes) == {BF16}
    assert trained.forward == wrapped  # accelerate's wrapper is back for training
    np.testing.assert_array_equal(got, image(plain))
