"""EMA of the trained weights (``ema:``): the average itself, exact resume, and what validation and export use."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from sdxl_fixtures import make_image_csv
from test_controlnet_train import write_config as controlnet_config
from test_controlnet_train import write_controlnet_csv
from test_lora_train import write_config as lora_config

from core.cli import UserError


def test_average_follows_the_warmed_up_decay_and_applied_restores_the_live_weights():
    from ai.common.ema import Ema

    layer = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    ema = Ema([layer, frozen], decay=0.5, every_n_steps=2)
    assert len(ema.params) == 2  # the frozen layer is not averaged
    expected = [p.detach().clone() for p in layer.parameters()]
    updates = 0
    for step in range(1, 7):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(float(step))
        ema.update(step)
        if step % 2 == 0:
            updates += 1
            # diffusers' schedule: no decay at the first update, then min(decay, (1 + n) / (10 + n)), n = updates - 1
            n = updates - 1
            d = 0.0 if n <= 0 else min(0.5, (1 + n) / (10 + n))
            expected = [
                d * e + (1 - d) * p.detach() for e, p in zip(expected, layer.parameters(), strict=True)
            ]
    live = [p.detach().clone() for p in layer.parameters()]
    with ema.applied():
        for p, e in zip(layer.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e)
    for p, v in zip(layer.parameters(), live, strict=True):
        assert torch.equal(p.detach(), v)
    # the state round-trips (accelerate saves and loads it through these)
    other = Ema([layer], decay=0.5, every_n_steps=2)
    other.load_state_dict(ema.state_dict())
    assert other.average.optimization_step == 3
    for a, b in zip(other.average.shadow_params, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_ema_with_deepspeed_is_refused_naming_the_key():
    from ai.common.trainer import build_ema

    cfg = types.SimpleNamespace(ema=types.SimpleNamespace(enabled=True, decay=0.9, every_n_steps=1))
    run = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=1))
    )
    with pytest.raises(UserError, match=r"ema\.enabled=true with a DeepSpeed"):
        build_ema(cfg, run, [torch.nn.Linear(2, 2)])
    cfg.ema.enabled = False
    assert build_ema(cfg, run, [torch.nn.Linear(2, 2)]) is None


@pytest.mark.slow
def test_lora_ema_exports_the_average_trains_the_same_and_resumes_exactly(tiny_sdxl, tmp_path):
    from safetensors.torch import load_file

    from ai.lora.train_lora_sdxl import main

    csv = make_image_csv(tmp_path / "data", n=6)
    runs = tmp_path / "runs"
    ema = {"enabled": True, "decay": 0.5}
    plain = lora_config(tmp_path / "plain.yaml", tiny_sdxl, csv, runs, "plain")
    full = lora_config(tmp_path / "full.yaml", tiny_sdxl, csv, runs, "full", ema=ema)
    part = lora_config(
        tmp_path / "part.yaml", tiny_sdxl, csv, runs, "part", ema=ema, train={"max_train_steps": 2}
    )
    for cfg in (plain, full, part):
        assert main(["--config", str(cfg)]) == 0
    assert main(["--config", str(part), "train.max_train_steps=4", "checkpoint.resume_from=latest"]) == 0

    def export(name):
        return load_file(runs / name / "pytorch_lora_weights.safetensors")

    def live(name):  # the checkpoint's training state: the live LoRA
        return load_file(runs / name / "checkpoint-4" / "lora_state.safetensors")

    # the average changes neither the training nor its state; the export is the average, not the live weights
    assert all(torch.equal(live("plain")[k], live("full")[k]) for k in live("plain"))
    assert any(not torch.equal(export("plain")[k], export("full")[k]) for k in export("plain"))
    # the checkpoint's export is the average too, and a resume from step 2 continues it exactly
    ckpt = load_file(runs / "full" / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(ckpt[k], export("full")[k]) for k in ckpt)
    assert all(torch.equal(export("part")[k], export("full")[k]) for k in export("full"))
    # turning the average on or off is not a resume-compatible change
    with pytest.raises(UserError, match=r"ema\.enabled"):
        main(["--config", str(part), "--check", "checkpoint.resume_from=latest", "ema.enabled=false"])


@pytest.mark.slow
def test_controlnet_ema_exports_the_average_beside_the_live_checkpoint(tiny_sdxl, mini_bdd, tmp_path):
    from safetensors.torch import load_file

    from ai.controlnet.train_controlnet_sdxl import main

    train_csv = write_controlnet_csv(mini_bdd, "train", tmp_path / "train.csv")
    runs = tmp_path / "runs"
    cfg = controlnet_config(tmp_path / "c.yaml", tiny_sdxl, train_csv, runs, "ema", ema={"enabled": True, "decay": 0.5},
                            validation={"every_n_steps": 2, "loss_rows": 2})  # fmt: skip
    assert main(["--config", str(cfg)]) == 0
    weights = "diffusion_pytorch_model.safetensors"
    final = load_file(runs / "ema" / "controlnet" / weights)
    averaged = load_file(runs / "ema" / "checkpoint-4" / "ema" / "controlnet" / weights)
    live = load_file(runs / "ema" / "checkpoint-4" / "controlnet" / weights)
    for k in final:
        np.testing.assert_array_equal(final[k].numpy(), averaged[k].numpy(), err_msg=k)
    assert any(not torch.equal(final[k], live[k]) for k in final)
