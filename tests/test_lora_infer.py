"""ai/lora/infer_lora_sdxl.py on the tiny SDXL (CPU): images + metadata, resume, seeds, LoRA effect, processes, launcher.

The tiny model and a LoRA for it (PEFT on the tiny UNet, non-zero init, saved with
``StableDiffusionXLPipeline.save_lora_weights`` inside a ``checkpoint-10`` folder like training writes) are built once
per session. Images are 64x64 with 2 steps: each run is a second or two.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sdxl_fixtures import pixels, records, run_launcher, save_random_lora

from ai.common.generation import LORA_WEIGHTS_NAME
from ai.common.pipelines import model_fingerprint
from ai.lora import infer_lora_sdxl
from ai.lora.infer_lora_sdxl import LoraInferConfig
from core.cli import run_main
from core.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "config" / "demo" / "lora_infer.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def lora_run(tiny_sdxl, tmp_path_factory) -> Path:
    """A training run folder ``lora_run/checkpoint-10/pytorch_lora_weights.safetensors`` (+ state files)."""
    run = tmp_path_factory.mktemp("lora_run")
    checkpoint = save_random_lora(tiny_sdxl, run / "checkpoint-10")
    (checkpoint / "optimizer.bin").write_bytes(b"")
    return run


def infer(tmp_path, model, *overrides, name="out", capsys=None) -> Path:
    """Run the script in-process on the demo config; returns the generations folder."""
    out = tmp_path / name
    argv = [
        "--config",
        str(DEMO_CONFIG),
        f"model.pretrained_model={model}",
        f"paths.infer_path={out}",
        "resolution.width=64",
        "resolution.height=64",
        *overrides,
    ]
    assert infer_lora_sdxl.main(argv) == 0
    return out / "generations"


@pytest.fixture(scope="module")
def lora_output(tiny_sdxl, lora_run, tmp_path_factory) -> Path:
    """The demo config with the LoRA: 2 prompts x 2 images, batch 2."""
    return infer(
        tmp_path_factory.mktemp("lora_out"),
        tiny_sdxl,
        f"paths.lora_weights_path={lora_run / 'checkpoint-10'}",
    )


def test_writes_images_and_one_record_per_image(lora_output, tiny_sdxl, lora_run):
    gen = lora_output
    files = ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]
    assert sorted(p.name for p in gen.iterdir()) == [*files, "metadata.jsonl"]
    for name in files:
        with Image.open(gen / name) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
    recs = records(gen)
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    assert [(r["file"], r["prompt"], r["seed"]) for r in recs] == [
        ("00000_00.png", demo["prompt"], 0),
        ("00000_01.png", demo["prompt"], 1),
        ("00001_00.png", demo["prompts"][0], 2),
        ("00001_01.png", demo["prompts"][0], 3),
    ]
    lora_file = lora_run / "checkpoint-10" / LORA_WEIGHTS_NAME
    first = recs[0]
    assert first["lora_sha256"] == sha256_file(lora_file)
    assert first["lora_path"] == str(lora_file)
    assert first["base_model_fingerprint"] == model_fingerprint(str(tiny_sdxl))
    assert (first["width"], first["height"], first["num_inference_steps"]) == (
        64,
        64,
        demo["num_inference_steps"],
    )
    assert (first["guidance_scale"], first["scheduler"], first["lora_scale"]) == (7.5, "euler", 1.0)
    assert first["negative_prompt"] is None and first["source_frame"] is None and first["mask_path"] is None
    assert first["config"] == str(DEMO_CONFIG) and first["time"].endswith("+00:00")
    resolved = yaml.safe_load((gen.parent / "config.resolved.yaml").read_text())
    cfg = LoraInferConfig.model_validate(resolved)  # loads back through the schema
    assert cfg.paths.lora_weights_path == str(lora_run / "checkpoint-10") and cfg.resolution.width == 64


def test_rerun_does_no_work_and_redoes_only_a_deleted_image(
    lora_output, tiny_sdxl, lora_run, tmp_path, capsys
):
    import shutil

    gen = tmp_path / "out" / "generations"
    shutil.copytree(lora_output, gen)
    lora = f"paths.lora_weights_path={lora_run / 'checkpoint-10'}"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in gen.iterdir()}
    capsys.readouterr()
    infer(tmp_path, tiny_sdxl, lora)
    assert "nothing to do: all 4 images are in" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in gen.iterdir()} == before

    (gen / "00001_00.png").unlink()
    infer(tmp_path, tiny_sdxl, lora)
    assert "1 generated, 3 already done, 0 failed, 4 in the work list" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in gen.iterdir()}
    changed = sorted(name for name in after if after[name] != before[name][1])
    assert changed == ["00001_00.png", "metadata.jsonl"]
    # made alone now, in a batch of 2 before: the same noise, float rounding of batched matmuls at most 1 level
    assert np.abs(pixels(gen / "00001_00.png") - pixels(lora_output / "00001_00.png")).max() <= 1
    assert [r["file"] for r in records(gen)] == [
        r["file"] for r in records(lora_output)
    ]  # no duplicate lines


def test_same_seeds_reproduce_and_seeds_are_per_image(lora_output, tiny_sdxl, lora_run, tmp_path):
    lora = f"paths.lora_weights_path={lora_run / 'checkpoint-10'}"
    again = infer(tmp_path, tiny_sdxl, lora, name="again")
    for name in ("00000_00.png", "00001_01.png"):
        assert np.array_equal(pixels(again / name), pixels(lora_output / name))
    a, b = (
        pixels(lora_output / "00000_00.png"),
        pixels(lora_output / "00000_01.png"),
    )  # same prompt, seeds 0 and 1
    assert np.abs(a - b).mean() > 5
    # seed=1, one image per prompt, batch 1: image 00000_00 gets seed 1, i.e. the batch-2 run's 00000_01;
    # a different batch changes only float rounding (at most one level), never the noise
    shifted = infer(
        tmp_path, tiny_sdxl, lora, "seed=1", "images_per_prompt=1", "batch_size=1", name="shifted"
    )
    assert records(shifted)[0]["seed"] == 1
    assert np.abs(pixels(shifted / "00000_00.png") - b).max() <= 1


def test_lora_changes_images_and_scale_zero_equals_base(lora_output, tiny_sdxl, lora_run, tmp_path):
    base = infer(tmp_path, tiny_sdxl, "paths.lora_weights_path=null", name="base")
    assert records(base)[0]["lora_sha256"] is None and records(base)[0]["lora_scale"] is None
    zero = infer(
        tmp_path,
        tiny_sdxl,
        f"paths.lora_weights_path={lora_run / 'checkpoint-10'}",
        "lora_scale=0",
        name="zero",
    )
    for name in ("00000_00.png", "00001_01.png"):
        assert np.abs(pixels(base / name) - pixels(lora_output / name)).mean() > 5
        assert np.array_equal(pixels(zero / name), pixels(base / name))


def test_captions_csv_prompts_carry_their_source_frame(tiny_sdxl, lora_run, tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("image,text\nframes/a.jpg,a rainy street\nframes/b.jpg,\nframes/c.jpg,a tunnel\n")
    gen = infer(
        tmp_path,
        tiny_sdxl,
        f"paths.lora_weights_path={lora_run / 'checkpoint-10' / LORA_WEIGHTS_NAME}",
        "prompt=null",
        "prompts=[]",
        f"captions_csv={csv_path}",
        "on_error=skip",
        "images_per_prompt=1",
        "num_inference_steps=1",
        "scheduler=dpm++_2m_karras",
    )
    recs = records(gen)
    assert [(r["file"], r["prompt"], r["source_frame"]) for r in recs] == [
        ("00000_00.png", "a rainy street", str(tmp_path / "frames/a.jpg")),
        ("00001_00.png", "a tunnel", str(tmp_path / "frames/c.jpg")),
    ]
    assert recs[0]["scheduler"] == "dpm++_2m_karras" and recs[0]["prompt_source"] == f"{csv_path}:2"


def test_speed_switches_keep_the_images(lora_output, tiny_sdxl, lora_run, tmp_path):
    fast = infer(
        tmp_path,
        tiny_sdxl,
        f"paths.lora_weights_path={lora_run / 'checkpoint-10'}",
        "fuse_lora=true",
        "speed.channels_last=true",
        "speed.vae_slicing=true",
        "speed.vae_tiling=true",
        name="fast",
    )
    for name in ("00000_00.png", "00001_01.png"):
        assert np.abs(pixels(fast / name) - pixels(lora_output / name)).max() <= 2


@pytest.mark.slow
def test_torch_compile_keeps_the_images(lora_output, tiny_sdxl, lora_run, tmp_path):
    """speed.torch_compile through inductor (CPU here: about a minute of compiling) with the unfused LoRA."""
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    compiled = infer(
        tmp_path,
        tiny_sdxl,
        f"paths.lora_weights_path={lora_run / 'checkpoint-10'}",
        "speed.torch_compile=true",
        name="compiled",
    )
    assert counters["stats"]["unique_graphs"] > graphs_before  # the UNet really went through dynamo
    for name in ("00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"):
        assert np.abs(pixels(compiled / name) - pixels(lora_output / name)).max() <= 2


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = run_main(infer_lora_sdxl.main, list(argv))
    return code, capsys.readouterr().err


def test_bad_inputs_give_clear_errors(tiny_sdxl, lora_run, tmp_path, capsys):
    cfg = [
        "--config",
        str(DEMO_CONFIG),
        f"model.pretrained_model={tiny_sdxl}",
        f"paths.infer_path={tmp_path / 'o'}",
    ]
    lora = f"paths.lora_weights_path={lora_run / 'checkpoint-10'}"
    cases = [
        ([f"model.pretrained_model={tmp_path / 'nope'}"], f"model folder not found: {tmp_path / 'nope'}"),
        (
            [lora, "paths.lora_weights_path=" + str(tmp_path / "missing")],
            f"LoRA weights not found: {tmp_path / 'missing'}",
        ),
        (
            [f"paths.lora_weights_path={lora_run}"],
            f"no {LORA_WEIGHTS_NAME} in {lora_run}; found: checkpoint-10; the newest checkpoint with weights is "
            f"{lora_run / 'checkpoint-10'}",
        ),
        (["lora_scal=0.5"], "lora_scal: unknown key (did you mean 'lora_scale'"),
        (["guidance_scale=high"], "guidance_scale: Input should be a valid number"),
        (["resolution.width=100"], "resolution.width: Value error, must be a positive multiple of 8"),
        (["prompt=null", "prompts=[]"], "no prompts: set prompt, prompts"),
        ([lora, "dtype=fp16", "device=cpu"], "dtype fp16 needs a GPU (the device is cpu)"),
    ]
    for overrides, message in cases:
        code, err = run_cli(capsys, *cfg, *overrides)
        assert code == 2 and message in err, (overrides, err)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text("{}")
    code, err = run_cli(capsys, *cfg, f"model.pretrained_model={incomplete}")
    assert code == 2 and "missing unet, vae, text_encoder" in err and "found model_index.json" in err
    empty_checkpoint = tmp_path / "checkpoint-3"
    empty_checkpoint.mkdir()
    (empty_checkpoint / "random_states_0.pkl").write_bytes(b"")
    code, err = run_cli(capsys, *cfg, f"paths.lora_weights_path={empty_checkpoint}")
    assert code == 2 and f"no {LORA_WEIGHTS_NAME} in {empty_checkpoint}; found: random_states_0.pkl." in err
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("image,caption\na.jpg,x\n")
    code, err = run_cli(capsys, *cfg, f"captions_csv={csv_path}", "captions_column=text")
    assert code == 2 and f"{csv_path} has no column 'text'; its columns are: image, caption" in err
    assert not (tmp_path / "o").exists()  # every error came before any output


def test_a_lora_that_only_partly_fits_the_base_is_refused(tiny_sdxl, lora_run, tmp_path, capsys):
    """diffusers loads the modules that fit and only warns about the rest (a warning the script used to silence)."""
    from safetensors.torch import load_file, save_file

    state = load_file(lora_run / "checkpoint-10" / LORA_WEIGHTS_NAME)
    renamed = tmp_path / "renamed.safetensors"
    save_file({k.replace(".attn1.to_q.", ".attn1.query."): v for k, v in state.items()}, renamed)
    code, err = run_cli(
        capsys, "--config", str(DEMO_CONFIG), f"model.pretrained_model={tiny_sdxl}",
        f"paths.infer_path={tmp_path / 'o'}", f"paths.lora_weights_path={renamed}", "resolution.width=64",
        "resolution.height=64",
    )  # fmt: skip
    n = sum(".attn1.to_q.lora_A." in k for k in state)
    assert code == 2 and f"{renamed} does not fit this base model: {n} of its" in err, err
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.query" in err
    # nothing written: no empty generations/ and no config.resolved.yaml of a run that never generated
    assert not (tmp_path / "o").exists(), sorted(p.name for p in (tmp_path / "o").rglob("*"))


def test_a_config_of_the_last_release_runs_unchanged(lora_output, tiny_sdxl, lora_run, tmp_path, capsys):
    """The demo config as the last release shipped it, with its old key names (paths.base_model_path) in the file
    and in the overrides, makes the same images as today's config, and says which keys to write instead."""
    release = REPO / "tests" / "data" / "release_configs" / "demo" / "lora_infer.yaml"
    argv = [
        "--config", str(release), f"paths.base_model_path={tiny_sdxl}", f"paths.infer_path={tmp_path / 'old'}",
        "resolution.width=64", "resolution.height=64", f"paths.lora_weights_path={lora_run / 'checkpoint-10'}",
    ]  # fmt: skip
    assert run_main(infer_lora_sdxl.main, argv) == 0
    err = capsys.readouterr().err
    assert f"warning: {release}: paths.base_model_path is deprecated; use model.pretrained_model" in err
    assert "warning: paths.base_model_path is deprecated; use model.pretrained_model" in err  # the override
    made = sorted(p.name for p in lora_output.glob("*.png"))
    assert made == sorted(p.name for p in (tmp_path / "old" / "generations").glob("*.png"))
    for name in made:
        assert np.array_equal(pixels(lora_output / name), pixels(tmp_path / "old" / "generations" / name))


def test_changed_settings_are_refused_not_mixed(lora_output, tiny_sdxl, lora_run, tmp_path, capsys):
    import shutil

    shutil.copytree(lora_output, tmp_path / "out" / "generations")
    lora = f"paths.lora_weights_path={lora_run / 'checkpoint-10'}"
    out = [
        "--config",
        str(DEMO_CONFIG),
        f"model.pretrained_model={tiny_sdxl}",
        f"paths.infer_path={tmp_path / 'out'}",
    ]
    code, err = run_cli(capsys, *out, "resolution.width=64", "resolution.height=64", lora, "lora_scale=0.5")
    assert code == 2 and "made with other settings (e.g. 00000_00.png: lora_scale: 1.0 -> 0.5)" in err


# --- under accelerate: the launcher, one and two processes ----------------------------------------------------


def launch(tmp_path, model, lora_dir, accelerate_config: str, name: str) -> Path:
    env = dict(
        os.environ,
        ACCELERATE_CONFIG=str(REPO / accelerate_config),
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
    )
    out = tmp_path / name
    cmd = [
        "bash",
        str(REPO / "ai/lora/run_lora_infer.sh"),
        str(DEMO_CONFIG),
        f"model.pretrained_model={model}",
        f"paths.lora_weights_path={lora_dir}",
        f"paths.infer_path={out}",
        "resolution.width=64",
        "resolution.height=64",
        "batch_size=1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 generated, 0 already done, 0 failed, 4 in the work list" in proc.stdout
    return out / "generations"


@pytest.mark.slow
def test_launcher_one_and_two_processes_make_the_same_images(tiny_sdxl, lora_run, tmp_path):
    one = launch(tmp_path, tiny_sdxl, lora_run / "checkpoint-10", "config/accelerate_config_cpu.yaml", "one")
    two = launch(
        tmp_path, tiny_sdxl, lora_run / "checkpoint-10", "config/accelerate_config_cpu_2proc.yaml", "two"
    )
    for gen in (one, two):
        assert sorted(p.name for p in gen.iterdir()) == [
            f"0000{p}_0{i}.png" for p in (0, 1) for i in (0, 1)
        ] + ["metadata.jsonl"]
    recs_one, recs_two = records(one), records(two)
    assert [(r["file"], r["seed"]) for r in recs_two] == [(r["file"], r["seed"]) for r in recs_one]
    for rec in recs_one:
        assert np.array_equal(pixels(one / rec["file"]), pixels(two / rec["file"])), rec["file"]


def test_launcher_checks_config_before_accelerate(tmp_path):
    proc = run_launcher("ai/lora/run_lora_infer.sh", DEMO_CONFIG, "num_inference_step=3")
    assert proc.returncode == 2
    assert "num_inference_step: unknown key (did you mean 'num_inference_steps'" in proc.stderr
    assert "accelerate" not in proc.stderr.lower()
