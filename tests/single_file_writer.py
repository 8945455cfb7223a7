"""Write a diffusers SDXL folder as one ``.safetensors`` in the original Stability (sgm) key layout, as community
checkpoints are distributed: the test's way to get such a file from the tiny model (diffusers only reads them).

The mapping is the inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``); it
reuses that module's own top-level key table, and :func:`check_round_trip` converts the written tensors back with
diffusers' ``convert_ldm_*`` functions and requires every tensor of the folder back, bit for bit, so the writer
cannot drift from what diffusers reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET, VAE, TE1, TE2 = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
)
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = {
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"],
    }
    per = config["layers_per_block"] + 1  # resnets (+ attention) per level, then the down/upsampler
    with_attention = {
        int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k
    }
    out = {}
    for key, value in state.items():
        if key in table:
            out[table[key]] = value
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = 1 + i * per + j
            out[
                f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
            ] = value
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"] = value
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            out[f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"] = value
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            out[f"middle_block.1.{m[1]}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = i * per + j
            out[
                f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
            ] = value
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            out[f"output_blocks.{i * per + per - 1}.{2 if i in with_attention else 1}.conv.{m[2]}"] = value
        else:
            raise KeyError(f"no original name for UNet key {key}")
    return {UNET + k: v for k, v in out.items()}


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        key_out = None
        if key in table:
            key_out = table[key]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            key_out = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            key_out = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            key_out = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"  # the original counts upward
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            key_out = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            key_out = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            key_out = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]  # the original's attention projections are 1x1 convolutions
        if key_out is None:
            raise KeyError(f"no original name for VAE key {key}")
        out[key_out.replace("conv_shortcut", "nin_shortcut")] = value
    return {VAE + k: v for k, v in out.items()}


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (SDXL's first encoder) keeps transformers' names under ``text_model.``."""
    return {TE1 + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def open_clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG (the second encoder): fused q/k/v projections, transposed text projection, open_clip names."""
    names = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {"text_projection": state["text_projection.weight"].T.contiguous()}
    for key, value in state.items():
        if key in names:
            out[names[key]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer, kind = m[1], m[2]
            fused = [state[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(fused)
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)", key):
            out[f"transformer.resblocks.{m[1]}.attn.out_proj.{m[2]}"] = value
        elif m := re.match(
            r"text_model\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(.*)", key
        ):
            out[f"transformer.resblocks.{m[1]}.{parts[m[2]]}.{m[3]}"] = value
        elif not re.match(r"text_model\.encoder\.layers\.\d+\.self_attn\.[kv]_proj\.", key) and key != (
            "text_projection.weight"
        ):
            raise KeyError(f"no original name for OpenCLIP key {key}")
    return {TE2 + k: v for k, v in out.items()}


def folder_to_original(folder: Path) -> dict[str, torch.Tensor]:
    """Every part of a diffusers SDXL folder, in the original single-file layout (fp32 as stored)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te1 = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    return {
        **unet_to_original(unet.state_dict(), dict(unet.config)),
        **vae_to_original(vae.state_dict(), dict(vae.config)),
        **clip_to_original({k: v for k, v in te1.state_dict().items() if "position_ids" not in k}),
        **open_clip_to_original({k: v for k, v in te2.state_dict().items() if "position_ids" not in k}),
    }


def check_round_trip(original: dict[str, torch.Tensor], folder: Path) -> None:
    """diffusers' own conversion of ``original`` gives back every UNet and VAE tensor of ``folder`` exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae_part = {k: v for k, v in original.items() if k.startswith(VAE)}
    for model, converted in (
        (unet, convert_ldm_unet_checkpoint(original, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(vae_part, dict(vae.config))),
    ):
        expected = model.state_dict()
        assert set(converted) == set(expected), set(converted) ^ set(expected)
        for key, value in expected.items():
            assert torch.equal(converted[key].reshape(value.shape), value), key


def write_single_file(folder: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    original = folder_to_original(folder)
    check_round_trip(original, folder)
    save_file({k: v.contiguous() for k, v in original.items()}, str(out))
    return out
