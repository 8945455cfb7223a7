"""What a ControlNet folder holds and whether it can steer a base model, read from the config.json files alone.

No torch: the launchers' ``--check`` (milliseconds, before accelerate starts) and the training and inference
scripts call these before any weights are loaded.

* :func:`resolve_controlnet`: a ControlNet folder, or a training run's ``controlnet/`` inside it.
* :func:`read_model_config`: a diffusers model's config.json, from a local folder or a hub id.
* :func:`check_controlnet_fits`: a ControlNet that cannot steer this UNet is refused with the differing keys.
* :func:`conditioning_record` / :func:`recorded_layout`: which label maps a trained ControlNet takes. Training
  writes ``"_bdd_conditioning": {"layout": <a name of vocab/layouts.py's table>, "encoding": "palette" |
  "one_hot", ...}`` into its config.json: diffusers ignores keys starting with ``_`` when it builds the model, keeps
  them on the loaded model's config and writes them back on ``save_pretrained``, so the record travels with every
  copy of the folder. ControlNets without it (made before box layouts existed, or elsewhere) take segmentation
  masks (``layouts.UNMARKED``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.cli import UserError
from vocab import layouts

#: UNet config keys a ControlNet copies from its UNet (``ControlNetModel.from_unet``): all must agree.
ARCHITECTURE_KEYS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "use_linear_projection",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


def read_model_config(path_or_id: str | Path, subfolder: str | None = None) -> dict[str, Any]:
    """A diffusers model's config.json: read from disk for a local folder, via diffusers for a hub id."""
    from ai.common.models import is_local, local_files_only

    if is_local(path_or_id):
        path = Path(path_or_id) / (subfolder or "") / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
    from diffusers import ConfigMixin

    try:
        return dict(
            ConfigMixin.load_config(
                str(path_or_id),
                subfolder=subfolder,
                local_files_only=local_files_only(path_or_id),
            )
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of {path_or_id}: {exc}".replace("\n", " ")) from None


def resolve_controlnet(path: str) -> Path | str:
    """The ControlNet folder (``config.json`` + weights): ``path`` itself or its ``controlnet/`` (a training run)."""
    from ai.common.models import is_local

    if not is_local(path):
        return path  # hub id: checked when its config is read
    p = Path(path)
    if not p.is_dir():
        parent = p.parent
        found = ", ".join(sorted(c.name for c in parent.iterdir())) if parent.is_dir() else "does not exist"
        raise UserError(
            f"ControlNet folder not found: {p} ({parent}: {found or 'empty'}); set paths.controlnet_path to the "
            "folder training writes (<runs_dir>/<name>/controlnet)"
        )
    for folder in (p, p / "controlnet"):
        if (folder / "config.json").is_file():
            weights = [c for c in folder.iterdir() if c.suffix in (".safetensors", ".bin")]
            if not weights:
                raise UserError(f"ControlNet folder {folder} has config.json but no weights (*.safetensors)")
            return folder
    found = ", ".join(sorted(c.name for c in p.iterdir())) or "nothing"
    raise UserError(
        f"{p} is not a ControlNet folder (no config.json; found: {found}); point paths.controlnet_path at the "
        "folder with config.json and diffusion_pytorch_model.safetensors (training writes <runs_dir>/<name>/controlnet)"
    )


def _as_list(value: Any, n: int) -> Any:
    """Per-block settings written as one number or a list compare equal when they mean the same."""
    if isinstance(value, int) and not isinstance(value, bool) and n:
        return [value] * n
    return list(value) if isinstance(value, list | tuple) else value


def check_controlnet_fits(controlnet: dict, unet: dict, controlnet_name: str, base_name: str) -> None:
    """Refuse a ControlNet built for another UNet architecture (before any weights load)."""
    class_name = controlnet.get("_class_name", "ControlNetModel")
    if class_name != "ControlNetModel":
        raise UserError(f"{controlnet_name} is a {class_name}, not a ControlNetModel (its config.json)")
    n = len(unet.get("block_out_channels") or ())
    differences = [
        f"{key} {controlnet[key]} vs the UNet's {unet[key]}"
        for key in ARCHITECTURE_KEYS
        if key in controlnet and key in unet and _as_list(controlnet[key], n) != _as_list(unet[key], n)
    ]
    if differences:
        raise UserError(
            f"ControlNet {controlnet_name} does not fit the base model {base_name}: {'; '.join(differences)}. "
            "A ControlNet works only with the UNet architecture it was trained on (SDXL with SDXL); train one on "
            "this base model or point model.pretrained_model at the model it was trained on"
        )


#: The config.json key (a private one: diffusers loads such keys silently and saves them again) of the layout
#: record.
CONDITIONING_KEY = "_bdd_conditioning"


def conditioning_record(layout: str, kind: str, channels: int) -> dict[str, Any]:
    """What a trained ControlNet says about its input (``CONDITIONING_KEY`` in its config.json)."""
    return {"layout": layout, "encoding": kind, "channels": channels, **layouts.get(layout).record}


def recorded_layout(controlnet: dict, controlnet_name: str) -> str:
    """The layout a ControlNet config records (none recorded: ``layouts.UNMARKED``, segmentation masks)."""
    record = controlnet.get(CONDITIONING_KEY)
    if record is None:
        return layouts.UNMARKED
    layout = record.get("layout") if isinstance(record, dict) else None
    if layout not in layouts.LAYOUTS:
        raise UserError(
            f"{controlnet_name}: config.json has {CONDITIONING_KEY}={record!r}; its layout must be one of "
            f"{', '.join(layouts.NAMES)} (written by ai/controlnet/train_controlnet_sdxl.py)"
        )
    return layout


def layout_of(controlnet: dict, controlnet_name: str) -> str:
    """:func:`recorded_layout`, phrased for messages: "box layouts (recorded in its config.json)"."""
    spec = layouts.get(recorded_layout(controlnet, controlnet_name))
    how = (
        f"its config.json says {CONDITIONING_KEY}.layout={spec.name}"
        if CONDITIONING_KEY in controlnet
        else f"no layout recorded in its config.json: a ControlNet trained on {spec.short}"
    )
    return f"{spec.what} ({how})"


def check_init_layout(controlnet: dict, init_from: str, layout: str) -> None:
    """A ControlNet to continue training from must have been trained on the layout this run trains on: a mask
    ControlNet would read a box layout's ids as mask classes (and the other way round)."""
    recorded = recorded_layout(controlnet, init_from)
    if recorded != layout:
        raise UserError(
            f"controlnet.init_from {init_from} was trained on {layout_of(controlnet, init_from)}, but "
            f"controlnet.layout={layout} trains on {layouts.get(layout).what}: set controlnet.layout={recorded} "
            "(with a CSV of that layout), or start a fresh ControlNet (controlnet.init_from=null)"
        )
