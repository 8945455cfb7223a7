"""config/lora_infer.yaml documents every key, and the users' manual's config shape still loads (loading:
tests/test_configs.py)."""

from __future__ import annotations

from pathlib import Path

from ai.lora.infer_lora_sdxl import LoraInferConfig
from core.config import load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]


MANUAL_CONFIG = """\
paths:
  base_model_path: "stabilityai/stable-diffusion-xl-base-1.0"
  lora_weights_path: "runs/lora_train/checkpoint-5000"
  infer_path: "inference_outputs"
prompt: "High resolution, 4k Traffic scene. Pedestrians walking."
resolution:
  width: 1280
  height: 720
guidance_scale: 7.5
"""


def test_the_manuals_config_shape_still_loads_and_names_the_new_keys(tmp_path, monkeypatch, capsys):
    """The inference config of the users' manual (../shared/DESIGN.md) says paths.base_model_path, generation's
    name before it took training's model.pretrained_model: it loads as before, with a warning naming the new key."""
    monkeypatch.setenv("BDD_SDXL_ENV_FILE", "")
    path = tmp_path / "manual.yaml"
    path.write_text(MANUAL_CONFIG, encoding="utf-8")
    cfg = load_config(LoraInferConfig, path)
    assert cfg.model.pretrained_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.paths.lora_weights_path == "runs/lora_train/checkpoint-5000"
    assert (cfg.resolution.width, cfg.resolution.height, cfg.guidance_scale) == (1280, 720, 7.5)
    assert (
        f"warning: {path}: paths.base_model_path is deprecated; use model.pretrained_model"
        in capsys.readouterr().err
    )


def test_user_config_keeps_the_manual_keys_and_comments_every_key(monkeypatch):
    for name in ("MODEL_DIR", "VAE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BDD_SDXL_ENV_FILE", "")  # no .env: the defaults of the ${VAR:-default} values
    path = REPO / "config/lora_infer.yaml"
    data = read_yaml(path)
    assert set(data["paths"]) >= {"lora_weights_path", "infer_path"} and set(data["model"]) >= {
        "pretrained_model"
    }
    assert {"prompt", "resolution", "guidance_scale"} <= set(data)
    cfg = load_config(LoraInferConfig, path)
    assert cfg.model.pretrained_model == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.model.vae is None
    assert cfg.paths.lora_weights_path == "runs/lora_train"  # the run folder the training default writes
    assert (cfg.resolution.width, cfg.resolution.height) == (1280, 720)

    # every key is in the file (so users see all of them) and every key line carries a comment
    def keys(model, prefix=""):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if hasattr(value, "model_fields"):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield prefix + name

    flat = {}
    for section, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    assert sorted(flat) == sorted(keys(cfg))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#") and any("bash ai/lora/run_lora_infer.sh" in line for line in lines[:12])
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"uncommented key line: {line!r}"
