"""config/lora_infer.yaml keeps the manual's keys and documents every key (loading: tests/test_configs.py)."""

from __future__ import annotations

from pathlib import Path

from ai.lora.infer_lora_sdxl import LoraInferConfig
from core.config import load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]


def test_user_config_keeps_the_manual_keys_and_comments_every_key(monkeypatch):
    for name in ("MODEL_DIR", "VAE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BDD_SDXL_ENV_FILE", "")  # no .env: the defaults of the ${VAR:-default} values
    path = REPO / "config/lora_infer.yaml"
    data = read_yaml(path)
    assert set(data["paths"]) >= {"base_model_path", "lora_weights_path", "infer_path"}
    assert {"prompt", "resolution", "guidance_scale"} <= set(data)
    cfg = load_config(LoraInferConfig, path)
    assert (
        cfg.paths.base_model_path == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.paths.vae_path is None
    )
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
