"""What a complete diffusers SDXL folder holds (below :mod:`ai.common.models`, which loads it, and
:mod:`ai.common.build_model`, which writes one)."""

from __future__ import annotations

import os
from pathlib import Path

from core.cli import UserError

#: Subfolders a diffusers SDXL folder has (model_index.json beside them).
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def check_model_folder(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a complete diffusers SDXL folder; the error lists what is missing and what was found."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    missing = [name for name in ("model_index.json", *SDXL_SUBFOLDERS) if not (path / name).exists()]
    if missing:
        found = sorted(p.name for p in path.iterdir())
        raise UserError(
            f"{path} is not a complete SDXL folder (diffusers layout): missing {', '.join(missing)}; found "
            f"{', '.join(found) or 'nothing'}. Build one with `python -m ai.common.build_model --preset tiny --out {path}` "
            "or download stabilityai/stable-diffusion-xl-base-1.0 on an online host"
        )
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights = [
            p
            for p in (path / sub).glob("*")
            if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
        ]
        if not weights:
            raise UserError(f"{path / sub} has no weights (*.safetensors or *.bin); the folder is incomplete")
    return path
