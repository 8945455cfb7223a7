"""Output sizes on and off SDXL's bucket grid, in LoRA and ControlNet inference (CPU, tiny models).

* Off the grid: SDXL's UNet has three levels (two downsamplings), so a latent side must divide by 4 to come back up
  to its skip connections' size; 1280x720 is 160x90 latents and 90 does not. diffusers' UNet then resizes the
  upsampled maps to the skips (``forward_upsample_size``) and the ControlNet's residuals have the UNet's down-block
  sizes, so both scripts must still make such images. The tiny preset's UNet has two levels, so a three-level
  variant is built here in-process (ai.common.models' builders), and 160x72 pixels give 20x9 latents.
* ``resolution.generate_at_bucket``: an image is generated at the nearest bucket and resized (stretched, not
  cropped) to the requested size; its record says both sizes.
* Stage 4 in every ControlNet size mode: the source frame's boxes, scaled by annotation/layout.py from the
  metadata to the saved image, land where the mask put those pixels in the saved image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_fixtures import pixels, records

from ai.controlnet import infer_controlnet_sdxl
from ai.controlnet.conditioning import read_ids, resize_ids
from ai.lora import infer_lora_sdxl
from vocab import bdd

REPO = Path(__file__).resolve().parents[1]
LORA_DEMO = REPO / "config" / "demo" / "lora_infer.yaml"
CONTROLNET_DEMO = REPO / "config" / "demo" / "controlnet_infer.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def three_level(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL with a three-level UNet (two downsamplings, like SDXL's) and a fresh ControlNet for it."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel

    from ai.common.build_model import build_pipeline, preset_configs
    from ai.common.models import check_model_folder

    unet_config = dict(preset_configs("tiny")["unet"])
    unet_config.update(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=(1, 1, 1),
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config)
    assert (
        len(unet.config.block_out_channels) == 3
    )  # two downsamplings: latents must divide by 4 to stay exact
    pipe = StableDiffusionXLPipeline(**{**build_pipeline("tiny").components, "unet": unet})
    root = tmp_path_factory.mktemp("three_level")
    pipe.save_pretrained(root / "model")
    check_model_folder(root / "model")
    ControlNetModel.from_unet(unet, conditioning_channels=3).save_pretrained(root / "controlnet")
    return {"model": root / "model", "controlnet": root / "controlnet"}


@pytest.fixture(scope="module")
def masks(mini_bdd, tmp_path_factory) -> Path:
    """The val masks whose frames have det_20 boxes, with captions: <root>/masks/*.png, <root>/captions/*.txt."""
    root = tmp_path_factory.mktemp("size_masks")
    (root / "masks").mkdir()
    (root / "captions").mkdir()
    labelled = {f.stem for f in bdd.load_frames(mini_bdd / "labels/det_20/det_val.json") if f.label_list()}
    for path in sorted((mini_bdd / "labels/sem_seg/masks/val").glob("*.png")):
        if path.stem in labelled:
            shutil.copy(path, root / "masks" / path.name)
            (root / "captions" / f"{path.stem}.txt").write_text("a city street, dashcam photo\n")
    assert any((root / "masks").iterdir())
    return root


def lora_infer(model: Path, out: Path, *overrides: str) -> Path:
    argv = ["--config", str(LORA_DEMO), f"model.pretrained_model={model}", f"paths.infer_path={out}"]
    argv += ["paths.lora_weights_path=null", "prompts=[]", "images_per_prompt=1", "batch_size=1", *overrides]
    assert infer_lora_sdxl.main(argv) == 0
    return out / "generations"


def controlnet_infer(model: Path, controlnet: Path, masks: Path, out: Path, *overrides: str) -> Path:
    argv = [
        "--config",
        str(CONTROLNET_DEMO),
        f"model.pretrained_model={model}",
        f"paths.controlnet_path={controlnet}",
    ]
    argv += [f"paths.masks_path={masks / 'masks'}", f"paths.captions_path={masks / 'captions'}"]
    argv += [f"paths.infer_path={out}", "paths.source_labels=null", "batch_size=1", *overrides]
    assert infer_controlnet_sdxl.main(argv) == 0
    return out / "generations"


def sizes(record: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    return (record["generated_width"], record["generated_height"]), (record["width"], record["height"])


def test_odd_latent_sizes_work_in_both_scripts_on_a_three_level_unet(three_level, masks, tmp_path):
    """160x72 pixels = 20x9 latents: 9 does not divide by the UNet's factor 4, as 720 rows (90) do not at SDXL."""
    gen = lora_infer(three_level["model"], tmp_path / "lora", "resolution.width=160", "resolution.height=72")
    (record,) = records(gen)
    assert sizes(record) == ((160, 72), (160, 72))
    with Image.open(gen / record["file"]) as im:
        assert im.size == (160, 72)
    assert pixels(gen / record["file"]).std() > 1  # a real image, not a constant fill

    out = tmp_path / "controlnet"
    gen = controlnet_infer(
        three_level["model"],
        three_level["controlnet"],
        masks,
        out,
        "resolution.width=160",
        "resolution.height=72",
    )
    for record in records(gen):
        assert sizes(record) == ((160, 72), (160, 72))
        with Image.open(gen / record["file"]) as im:
            assert im.size == (160, 72)


def test_lora_generate_at_bucket_generates_at_the_bucket_and_resizes_to_the_requested_size(
    three_level, tmp_path
):
    model = three_level["model"]
    bucket = lora_infer(model, tmp_path / "bucket", "resolution.width=160", "resolution.height=96")
    resized = lora_infer(
        model,
        tmp_path / "resized",
        "resolution.width=1280",
        "resolution.height=720",
        "resolution.generate_at_bucket=true",
    )
    (record,) = records(resized)
    # BDD's frame size from the three-level model's 16:9 bucket at its native 128 px (sides multiples of 32)
    assert sizes(record) == ((160, 96), (1280, 720)) and record["generate_at_bucket"] is True
    with Image.open(resized / record["file"]) as im, Image.open(bucket / record["file"]) as at_bucket:
        assert im.size == (1280, 720)
        stretched = at_bucket.convert("RGB").resize((1280, 720), Image.Resampling.LANCZOS)
        expected = np.asarray(stretched, dtype=np.int16)
        # the same noise and pixels as generating at the bucket, then stretched whole (a crop would shift them)
        assert np.abs(np.asarray(im.convert("RGB"), dtype=np.int16) - expected).max() <= 1

    # the size settings are part of what a rerun compares: switching the mode is refused, not mixed
    from core.cli import UserError

    with pytest.raises(UserError, match="generate_at_bucket: True -> False"):
        lora_infer(model, tmp_path / "resized", "resolution.width=1280", "resolution.height=720")


def fake_pipeline(monkeypatch):
    """The ControlNet script's pipeline call returns its condition (the mask's palette at the generation size)
    as the image: what the saved image shows is then exactly where the mask's pixels went."""

    def call(pipe, batch, cfg, size=None, image=None, **_):
        assert image.shape[-2:] == (size[1], size[0])
        arrays = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arrays]

    monkeypatch.setattr(infer_controlnet_sdxl, "call_pipeline", call)


@pytest.mark.parametrize(
    ("overrides", "generated", "saved"),
    [
        ((), (160, 96), (160, 96)),  # each mask's bucket (320x180 mask, tiny native 128)
        (("resolution.generate_at_bucket=true",), (160, 96), (320, 180)),  # ... resized to the mask's size
        (
            ("resolution.width=152", "resolution.height=88"),
            (152, 88),
            (152, 88),
        ),  # a fixed size, off the grid
        (
            ("resolution.width=152", "resolution.height=88", "resolution.generate_at_bucket=true"),
            (160, 96),
            (152, 88),
        ),
    ],
    ids=["bucket", "bucket-resized-to-mask", "fixed", "fixed-from-bucket"],
)
def test_stage4_source_boxes_land_on_the_mask_in_every_size_mode(
    overrides,
    generated,
    saved,
    tiny_sdxl,
    masks,
    mini_bdd,
    tmp_path,
    monkeypatch,
):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from annotation.layout import LayoutSources, read_metadata

    controlnet = tmp_path / "controlnet"
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    ControlNetModel.from_unet(unet, conditioning_channels=3).save_pretrained(controlnet)
    fake_pipeline(monkeypatch)
    labels = mini_bdd / "labels/det_20/det_val.json"
    gen = controlnet_infer(
        tiny_sdxl, controlnet, masks, tmp_path / "out", f"paths.source_labels={labels}", *overrides
    )

    layout = LayoutSources()
    checked = 0
    for record in records(gen):
        assert sizes(record) == (generated, saved)
        image = pixels(gen / record["file"])
        assert image.shape[:2] == (saved[1], saved[0])
        ids = read_ids(record["mask_path"])
        mask = np.asarray(ids)
        # the saved image is the whole generation stretched to the saved size (the condition, here): no crop
        condition = Image.fromarray(bdd.ids_to_palette_rgb(np.asarray(resize_ids(ids, generated))))
        stretched = np.asarray(condition.resize(saved, Image.Resampling.LANCZOS), dtype=np.int16)
        assert np.abs(image - stretched).max() <= 1
        ref = read_metadata(gen / "metadata.jsonl")[record["file"]]
        assert ref.source_size == mask.shape[::-1]  # the mask's own size: stage 4's source pixel space
        boxes, note = layout.source_boxes(
            ref, saved, keep_classes=set(range(10))
        )  # what stage 4 expects, where
        src_boxes, _ = layout.source_boxes(ref, ref.source_size, keep_classes=set(range(10)))
        assert boxes and len(boxes) == len(src_boxes), note
        for (_, box), (_, src) in zip(boxes, src_boxes, strict=True):
            sx, sy = round((src[0] + src[2]) / 2), round((src[1] + src[3]) / 2)
            patch = mask[max(sy - 6, 0) : sy + 7, max(sx - 6, 0) : sx + 7]
            if (patch != patch.flat[0]).any():
                continue  # near a class edge: resampling blends colours there
            expected = bdd.ids_to_palette_rgb(patch[:1, :1])[0, 0].astype(np.int16)
            x, y = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            assert np.abs(image[y, x] - expected).max() <= 40, (record["file"], box, image[y, x], expected)
            checked += 1
    assert checked >= 2
    for line in (gen / "metadata.jsonl").read_text().splitlines():
        assert json.loads(line)["source_labels"] == str(labels.resolve())
