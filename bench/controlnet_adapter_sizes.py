r"""Trainable parameters, optimizer state and file sizes of the full ControlNet and ControlNet-LoRA at SDXL size.

Usage::

    python bench/controlnet_adapter_sizes.py [--ranks 16 64 128]

Counted, not estimated: ``ControlNetModel.from_unet`` of the sdxl-base UNet built on the meta device (no weights
drawn, seconds on a CPU), with the project's LoRA layers (``ai/controlnet/adapter.py``, default target modules).
Prints the Markdown table of the ControlNet README's "ControlNet-LoRA" section.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count(rank: int | None) -> tuple[int, int, int]:
    """(trainable, LoRA, frozen) parameters of a ControlNet for the sdxl-base UNet; ``rank`` None: full."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ai.common.build_model import preset_configs
    from ai.controlnet.adapter import LoraSettings, add_lora
    from ai.controlnet.train_controlnet_sdxl import ControlNetConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(preset_configs("sdxl-base")["unet"])
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3, load_weights_from_unet=False)
    if rank is not None:
        targets = tuple(ControlNetConfig().lora_target_modules)
        add_lora(controlnet, LoraSettings(rank, float(rank), targets), torch.bfloat16)
    params = list(controlnet.named_parameters())
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    lora = sum(p.numel() for n, p in params if ".lora_" in n)
    return trainable, lora, sum(p.numel() for _, p in params) - trainable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    args = parser.parse_args(argv)

    def gb(n_bytes: float) -> str:
        return f"{n_bytes / 1e9:.2f} GB"

    print("| adapter | trainable parameters | trained weights + grads (fp32) | AdamW state (fp32) / 8-bit "
          "| frozen encoder copy (bf16) | checkpoint / adapter file |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for rank in (None, *args.ranks):
        trainable, lora, frozen = count(rank)
        name = "full" if rank is None else f"lora, rank {rank}"
        lora_note = f" (LoRA {lora / 1e6:,.0f}M)" if rank else ""
        print(
            f"| {name} | {trainable / 1e6:,.0f}M{lora_note} | {gb(trainable * 8)} | {gb(trainable * 8)} / "
            f"{gb(trainable * 2)} | {gb(frozen * 2) if frozen else '-'} | {gb(trainable * 4)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
