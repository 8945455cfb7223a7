"""A single-file SDXL checkpoint (original Stability layout) as the base model and VAE: written from the tiny model,
it loads offline, trains (LoRA, ControlNet) and generates exactly as the folder it came from; files that are not
SDXL checkpoints, and architectures that do not fit, are clear errors; vae_fp16_safe is checked after loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdxl_fixtures import make_image_csv, pixels, records
from single_file_writer import VAE, write_single_file

from ai.common.models import ModelSource, load_components
from core.cli import UserError
from core.io import sha256_bytes, sha256_file

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def no_model_dir(monkeypatch, tmp_path):
    """MODEL_DIR (a .env default) and the user cache must not leak into these tests."""
    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def checkpoint(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny model as one .safetensors in the original layout (diffusers converts it back bit for bit)."""
    return write_single_file(tiny_sdxl, tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors")


def state(model) -> dict[str, torch.Tensor]:
    return model.state_dict()


def assert_same_weights(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def test_the_file_is_in_the_original_layout(checkpoint):
    keys = set(load_file(checkpoint))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # conv_in
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's size/crop conditioning
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any("down_blocks" in k for k in keys)


def test_loads_offline_with_the_folders_weights_tokenizers_and_scheduler(checkpoint, tiny_sdxl, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = load_components(tiny_sdxl)
    single = load_components(str(checkpoint), config_from=str(tiny_sdxl))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(folder, part), getattr(single, part))
    unet_config = {k: v for k, v in folder.unet.config.items() if k != "_name_or_path"}
    assert {k: v for k, v in single.unet.config.items() if k != "_name_or_path"} == unet_config
    assert dict(single.scheduler.config) == dict(folder.scheduler.config)
    for tok in ("tokenizer", "tokenizer_2"):
        a, b = getattr(folder, tok), getattr(single, tok)
        assert a.get_vocab() == b.get_vocab() and a.pad_token == b.pad_token
    bf16 = load_components(
        str(checkpoint), config_from=str(tiny_sdxl), dtype=torch.bfloat16, vae_dtype=torch.float32
    )
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.text_encoder_2.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.vae.parameters()} == {torch.float32}


def test_config_from_defaults_to_model_dir_then_to_the_projects_sdxl_configs(
    checkpoint, tiny_sdxl, monkeypatch
):
    from ai.common.single_file import default_config_folder

    monkeypatch.setenv("MODEL_DIR", str(tiny_sdxl))  # as .env sets it
    assert_same_weights(load_components(str(checkpoint)).unet, load_components(tiny_sdxl).unet)
    monkeypatch.delenv("MODEL_DIR")
    # without one, the project's own SDXL base architecture: the tiny file does not fit it, and the error says
    # which part, which folder and which key to set
    with pytest.raises(UserError) as err:
        load_components(str(checkpoint))
    message = str(err.value)
    assert f"{checkpoint}: its UNet does not fit the architecture in {default_config_folder()}" in message
    assert "expected shape torch.Size([1280, 320])" in message and "model.config_from" in message
    assert "randomly initialized" not in message
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(default_config_folder(), subfolder="unet")
    assert config["block_out_channels"] == [320, 640, 1280] and config["cross_attention_dim"] == 2048
    assert config["transformer_layers_per_block"] == [1, 2, 10]


def sd15_like(path: Path) -> Path:
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(
                77, 8
            ),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (
            sd15_like,
            "found a Stable Diffusion 1.x checkpoint (one CLIP text encoder under cond_stage_model.transformer.)",
        ),
        (
            lambda p: save_file({"alpha": torch.rand(3), "beta": torch.rand(2, 2)}, str(p)) or p,
            "found no SDXL unet, vae, text_encoder, text_encoder_2 keys; its first keys are alpha, beta",
        ),
        (
            lambda p: (p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json"), p)[1],
            "cannot be read as safetensors",
        ),
    ],
)
def test_a_file_that_is_not_an_sdxl_checkpoint_is_refused_naming_what_it_holds(
    make, found, tiny_sdxl, tmp_path
):
    from ai.lora.train_lora_sdxl import main

    bad = make(tmp_path / "model.safetensors")
    csv = make_image_csv(tmp_path / "data", n=2)
    cfg = write_lora_config(tmp_path, bad, csv, "x")
    with pytest.raises(UserError) as err:
        main(["--config", str(cfg), "--check", f"model.config_from={tiny_sdxl}"])
    assert str(bad) in str(err.value) and found in str(err.value), str(err.value)
    with pytest.raises(UserError, match="is not an SDXL base checkpoint|cannot be read"):
        load_components(str(bad), config_from=str(tiny_sdxl))


def test_a_pickled_checkpoint_is_refused(tmp_path):
    from ai.common.generation import check_base_model

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"model.ckpt is not a .safetensors file.*can run code"):
        check_base_model(ModelSource(pretrained_model=str(ckpt)))


def test_a_single_file_vae_in_either_layout_replaces_the_models_own(checkpoint, tiny_sdxl, tmp_path):
    original = {k.removeprefix(VAE): v for k, v in load_file(checkpoint).items() if k.startswith(VAE)}
    bare = tmp_path / "vae.safetensors"
    save_file(original, str(bare))  # e.g. stabilityai's sdxl_vae.safetensors: original names, no prefix
    folder = load_components(tiny_sdxl)
    with_vae = load_components(tiny_sdxl, vae=str(bare), config_from=str(tiny_sdxl))
    assert_same_weights(with_vae.vae, folder.vae)
    diffusers_layout = tmp_path / "vae_diffusers.safetensors"
    save_file(state(folder.vae), str(diffusers_layout))
    both = load_components(str(checkpoint), vae=str(diffusers_layout), config_from=str(tiny_sdxl))
    assert_same_weights(both.vae, folder.vae)
    not_a_vae = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, str(not_a_vae))
    with pytest.raises(UserError, match=r"model.vae: .*unet_only.safetensors holds no VAE"):
        load_components(tiny_sdxl, vae=str(not_a_vae), config_from=str(tiny_sdxl))


def test_a_checkpoint_without_its_vae_needs_model_vae(checkpoint, tiny_sdxl, tmp_path):
    from ai.common.generation import check_base_model

    tensors = load_file(checkpoint)
    no_vae = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith(VAE)}, str(no_vae))
    vae = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith(VAE)}, str(vae))
    with pytest.raises(
        UserError, match=r"found no SDXL vae keys.*; a checkpoint without its VAE needs model.vae"
    ):
        check_base_model(ModelSource(pretrained_model=str(no_vae), config_from=str(tiny_sdxl)))
    check_base_model(ModelSource(pretrained_model=str(no_vae), vae=str(vae), config_from=str(tiny_sdxl)))
    parts = load_components(str(no_vae), vae=str(vae), config_from=str(tiny_sdxl))
    assert_same_weights(parts.vae, load_components(tiny_sdxl).vae)


def test_vae_fp16_safe_is_checked_after_loading_a_single_file(checkpoint, tiny_sdxl, tmp_path):
    """The tiny VAE's config says force_upcast (as SDXL's): refused at --check (the config folder's vae config)
    and, for what --check cannot see (a hub id), after loading, with the same message."""
    from ai.lora.train_lora_sdxl import main

    with pytest.raises(UserError) as err:
        load_components(str(checkpoint), config_from=str(tiny_sdxl), vae_fp16_safe=True)
    assert "model.vae_fp16_safe=true" in str(err.value) and "force_upcast: true" in str(err.value)
    assert str(checkpoint) in str(err.value)
    csv = make_image_csv(tmp_path / "data", n=2)
    cfg = with_config_from(write_lora_config(tmp_path, checkpoint, csv, "x"), tiny_sdxl)
    with pytest.raises(
        UserError, match=r"model.vae_fp16_safe=true but .*vae/config.json says force_upcast: true"
    ):
        main(["--config", str(cfg), "--check", "model.vae_fp16_safe=true"])
    assert load_components(
        str(checkpoint), config_from=str(tiny_sdxl)
    ).vae.config.force_upcast  # flag off: fine


def test_vae_fp16_safe_is_checked_after_loading_a_hub_vae(tiny_sdxl, monkeypatch):
    """A hub id's config is not on disk at --check: load_components refuses it once loaded."""
    from ai.common import models

    real = models._load_vae
    monkeypatch.setattr(models, "_load_vae", lambda vae, dtype: real(tiny_sdxl / "vae", dtype))
    monkeypatch.setattr(models, "is_local", lambda p: not str(p).startswith("madebyollin"))
    with pytest.raises(UserError, match=r"VAE loaded from madebyollin/not-really says force_upcast: true"):
        load_components(tiny_sdxl, vae="madebyollin/not-really", vae_fp16_safe=True)


# --- training and inference --------------------------------------------------------------------------------------


def with_config_from(config: Path, folder: Path) -> Path:
    """The training config at ``config`` with ``model.config_from: folder``."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["config_from"] = str(folder)
    config.write_text(yaml.safe_dump(cfg))
    return config


def write_lora_config(tmp_path: Path, base: Path, csv: Path, name: str, **sections) -> Path:
    from test_lora_train import write_config

    return write_config(tmp_path / f"{name}.yaml", base, csv, tmp_path / "runs", name, **sections)


def assert_same_training(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict | None = None
) -> None:
    """Trained weights agree to float rounding: the loaded weights are bit-identical (tested above), but a CPU
    GEMM's last bits depend on where its operands sit in memory (a folder model's own weights, cloned, already give
    other bits), and the file's tensors are mapped at other offsets. Adam's first steps move each weight by about
    the learning rate whatever the gradient's size (1e-3 here), so a model that computed other gradients would
    differ by that much; rounding noise stays 100x below."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=2e-5), (k, (a[k] - b[k]).abs().max())
    if start is not None:
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # it trained


@pytest.mark.slow
def test_lora_trains_the_same_weights_from_the_file_and_reuses_the_folders_caches(
    checkpoint, tiny_sdxl, tmp_path
):
    from ai.lora.train_lora_sdxl import main

    csv = make_image_csv(tmp_path / "data", n=2)
    steps = {"train": {"max_train_steps": 2}, "checkpoint": {"every_n_steps": 2}}
    folder_cfg = write_lora_config(tmp_path, tiny_sdxl, csv, "folder", **steps)
    file_cfg = with_config_from(write_lora_config(tmp_path, checkpoint, csv, "file", **steps), tiny_sdxl)
    assert main(["--config", str(folder_cfg)]) == 0
    cache = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs" / "cache").rglob("*.safetensors"))
    assert main(["--config", str(file_cfg)]) == 0
    # the caches key on the weights, not the path: the file's run found every entry and wrote none
    assert (
        sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs" / "cache").rglob("*.safetensors")) == cache
    )
    a = load_file(tmp_path / "runs" / "folder" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "runs" / "file" / "pytorch_lora_weights.safetensors")
    assert_same_training(a, b, start={k: torch.zeros_like(v) if "lora_B" in k else v for k, v in a.items()})
    resolved = (tmp_path / "runs" / "file" / "config.resolved.yaml").read_text()
    assert f"config_from: {tiny_sdxl}" in resolved


def test_lora_inference_gives_the_folders_images_and_records_the_files_hash(checkpoint, tiny_sdxl, tmp_path):
    from sdxl_fixtures import save_random_lora
    from test_lora_infer import infer

    lora = save_random_lora(tiny_sdxl, tmp_path / "lora")
    lora_arg = f"paths.lora_weights_path={lora}"
    folder = infer(tmp_path, tiny_sdxl, lora_arg, "images_per_prompt=1", name="folder")
    single = infer(
        tmp_path, checkpoint, lora_arg, "images_per_prompt=1", f"model.config_from={tiny_sdxl}", name="file"
    )
    images = sorted(p.name for p in folder.glob("*.png"))
    assert images and images == sorted(p.name for p in single.glob("*.png"))
    for name in images:
        assert (pixels(folder / name) == pixels(single / name)).all(), name
    fingerprint = records(single)[0]["base_model_fingerprint"]
    assert fingerprint == sha256_bytes(sha256_file(checkpoint).encode())
    assert fingerprint != records(folder)[0]["base_model_fingerprint"]


@pytest.mark.slow
def test_controlnet_trains_the_same_weights_from_the_file(checkpoint, tiny_sdxl, mini_bdd, tmp_path):
    from test_controlnet_train import run_inprocess, write_config, write_controlnet_csv

    csv = write_controlnet_csv(mini_bdd, "train", tmp_path / "train.csv")
    steps = {"train": {"max_train_steps": 2, "batch_size": 1}, "checkpoint": {"every_n_steps": 2}}
    runs = tmp_path / "runs"
    assert run_inprocess(write_config(tmp_path / "a.yaml", tiny_sdxl, csv, runs, "folder", **steps)) == 0
    file_cfg = with_config_from(
        write_config(tmp_path / "b.yaml", checkpoint, csv, runs, "file", **steps), tiny_sdxl
    )
    assert run_inprocess(file_cfg) == 0
    a = load_file(runs / "folder" / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(runs / "file" / "controlnet" / "diffusion_pytorch_model.safetensors")
    zero_convs = {k: torch.zeros_like(v) for k, v in a.items() if k.startswith("controlnet_down_blocks")}
    assert_same_training(a, b)
    assert_same_training({k: a[k] for k in zero_convs}, {k: b[k] for k in zero_convs}, start=zero_convs)


def test_controlnet_inference_gives_the_folders_images(checkpoint, tiny_sdxl, mini_bdd, tmp_path):
    import shutil

    from diffusers import ControlNetModel, UNet2DConditionModel
    from sdxl_fixtures import steer_outputs

    from ai.controlnet import infer_controlnet_sdxl

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    steer_outputs(ControlNetModel.from_unet(unet, conditioning_channels=3), seed=0).save_pretrained(
        tmp_path / "cn"
    )
    masks, captions = tmp_path / "masks", tmp_path / "captions"
    masks.mkdir()
    captions.mkdir()
    mask = sorted((mini_bdd / "labels/sem_seg/masks/val").glob("*.png"))[0]
    shutil.copy(mask, masks / mask.name)
    (captions / f"{mask.stem}.txt").write_text("a street\n", encoding="utf-8")
    outputs = {}
    for name, model, extra in (
        ("folder", tiny_sdxl, []),
        ("file", checkpoint, [f"model.config_from={tiny_sdxl}"]),
    ):
        argv = [
            "--config", str(REPO / "config" / "demo" / "controlnet_infer.yaml"),
            f"model.pretrained_model={model}", f"paths.controlnet_path={tmp_path / 'cn'}",
            f"paths.masks_path={masks}", f"paths.captions_path={captions}", "paths.source_labels=null",
            f"paths.infer_path={tmp_path / name}", "images_per_prompt=1", "on_error=stop",
            "resolution.width=64", "resolution.height=64", *extra,
        ]  # fmt: skip
        assert infer_controlnet_sdxl.main(argv) == 0
        outputs[name] = sorted((tmp_path / name / "generations").glob("*.png"))
    assert outputs["folder"] and [p.name for p in outputs["folder"]] == [p.name for p in outputs["file"]]
    for a, b in zip(outputs["folder"], outputs["file"], strict=True):
        assert (pixels(a) == pixels(b)).all(), a.name


@pytest.mark.slow
def test_at_sdxls_topology_the_file_is_what_diffusers_calls_sdxl_base_and_loads_exactly(tmp_path):
    """SDXL base's topology (3 levels of 2 layers, transformer depths 1/2/10, a 32-layer OpenCLIP wider than the
    CLIP) at small widths: diffusers' own model-type detection, which keys on the real layout's names (e.g.
    OpenCLIP's resblocks.9), calls the written file xl_base, and every part loads bit for bit."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ai.common import build_model
    from vocab.clip_tokenizer import build_clip_tokenizer

    cfg = build_model.preset_configs("sdxl-base")
    cfg["unet"].update(
        block_out_channels=(32, 64, 128), attention_head_dim=(2, 4, 8), norm_num_groups=8, sample_size=16,
        cross_attention_dim=32 + 48, addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48,
    )  # fmt: skip
    cfg["vae"].update(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, sample_size=128)
    cfg["text_encoder"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
    cfg["text_encoder_2"].update(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, projection_dim=48
    )
    assert (
        cfg["unet"]["transformer_layers_per_block"] == (1, 2, 10)
        and cfg["text_encoder_2"]["num_hidden_layers"] == 32
    )
    torch.manual_seed(0)
    StableDiffusionXLPipeline(
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**cfg["unet"]),
        scheduler=EulerDiscreteScheduler(**build_model._SCHEDULER_CONFIG),
    ).save_pretrained(tmp_path / "folder")
    single = write_single_file(tmp_path / "folder", tmp_path / "sdxl-topology.safetensors")
    assert infer_diffusers_model_type(load_file(single)) == "xl_base"
    folder = load_components(tmp_path / "folder")
    loaded = load_components(str(single), config_from=str(tmp_path / "folder"))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(folder, part), getattr(loaded, part))
