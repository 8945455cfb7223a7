"""README.md followed stage by stage with the shipped configs, on the mini-BDD100K and the tiny SDXL (CPU).

The commands come from README.md itself, so the README and this test cannot drift: the first ```bash block of
each section in :data:`SECTIONS` (set-up, stage 1, LoRA, ControlNet, stage 4), run in that order by one bash in a
copy of the repo (relative defaults land there). As a user would, the test edits only ``.env`` after
``cp .env.example .env``: MODEL_DIR (the tiny model), BDD_DATA_DIR (the mini-BDD100K), VAE_DIR empty and
YOLO_MODEL (the tests' small detector). It appends size and speed overrides only (steps, resolution, workers;
never a path) and runs the launchers with ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml. Docker lines are
skipped. Then every stage must have found what the previous one wrote, where its defaults say.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_import_cycles import PACKAGES
from yolo_fixture import cached_detector

REPO = Path(__file__).resolve().parents[1]
#: Sections whose first bash block is the walk-through, in the order a user follows them.
SECTIONS = (
    "## Your data and models",
    "## Stage 1",
    "## Stage 2 and 3: LoRA",
    "## Stage 2 and 3: ControlNet",
    "## Stage 4",
)
#: What a user on a small CPU machine would append (sizes and speed; no path). Keyed by the command's start.
TRAIN_FAST = (
    "data.resolution=128 data.bucket_step=16 data.num_workers=0 train.batch_size=2 train.max_train_steps=2 "
    "train.mixed_precision=no train.gradient_checkpointing=false optim.lr_warmup_steps=0 "
    "checkpoint.every_n_steps=2 validation.every_n_steps=0 validation.loss_rows=0 log.report_to=none"
)
INFER_FAST = "num_inference_steps=2 dtype=fp32"
FAST = {
    "bash ai/lora/run_lora_train.sh": TRAIN_FAST,
    "bash ai/lora/run_lora_infer.sh": f"{INFER_FAST} resolution.width=160 resolution.height=96",
    "bash ai/controlnet/run_controlnet_train.sh": TRAIN_FAST,
    "bash ai/controlnet/run_controlnet_infer.sh": INFER_FAST,
    "python annotation/yolo_annotate_folders.py": "--imgsz 224 --batch 4 --device cpu",
}
SKIPPED = ("docker ",)


def readme_commands(text: str) -> list[str]:
    """The walk-through's commands: continuation lines joined, comments dropped, blank lines skipped."""
    commands = []
    for heading in SECTIONS:
        start = text.index(f"\n{heading}")
        end = text.find("\n## ", start + 1)
        section = text[start : end if end != -1 else len(text)]
        block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
        assert block, f"README.md: no bash block in {heading!r}"
        for line in block.group(1).replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#") and not line.startswith(SKIPPED):
                commands.append(" ".join(line.split()))
    return commands


def walk_script(commands: list[str], env_edits: dict[str, str]) -> str:
    lines = []
    for command in commands:
        extra = next((fast for start, fast in FAST.items() if command.startswith(start)), "")
        lines.append(f"echo '+ {command}'")
        lines.append(f"{command} {extra}".strip())
        if command == "cp .env.example .env":  # the user's edit
            for key, value in env_edits.items():
                lines.append(f"sed -i 's|^{key}=.*|{key}={value}|' .env")
    return "\n".join(lines) + "\n"


def copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*PACKAGES, "config"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("README.md", ".env.example", "pyproject.toml"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def test_readme_commands_are_found_in_order():
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    starts = [
        "cp .env.example .env",
        "set -a; source .env; set +a",
        "python convert/generate_bdd_captions.py",
        "python convert/generate_bdd_captions.py",
        "python convert/lora_bdd_to_huggingface_csv.py",
        "python convert/controlnet_bdd_to_huggingface_csv.py",
        "bash ai/lora/run_lora_train.sh",
        "bash ai/lora/run_lora_infer.sh",
        "bash ai/controlnet/run_controlnet_train.sh",
        "bash ai/controlnet/run_controlnet_infer.sh",
        "python annotation/yolo_annotate_folders.py",
    ]
    assert len(commands) == len(starts) and all(
        c.startswith(s) for c, s in zip(commands, starts, strict=True)
    )
    # the launchers run with their default configs: paths come from the configs' defaults and .env, not flags
    for command in commands:
        if command.startswith("bash ai/"):
            assert command.split()[2:] == [], command
        assert " paths." not in command and " data.train_csv" not in command and "--model" not in command


@pytest.mark.slow
def test_following_the_readme_with_only_env_edited(tiny_sdxl, mini_bdd, tmp_path):
    detector = cached_detector(mini_bdd, tmp_path / "detector_work")
    work = copy_repo(tmp_path / "repo")
    env_edits = {
        "MODEL_DIR": str(tiny_sdxl),
        "VAE_DIR": "",
        "BDD_DATA_DIR": str(mini_bdd),
        "YOLO_MODEL": str(detector),
    }
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    (work / "walk.sh").write_text(walk_script(commands, env_edits), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if k not in (*env_edits, "BDD_SDXL_ENV_FILE", "PYTHONPATH")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # `python` is this venv's
        PYTHON=sys.executable,
        PYTHONPATH=str(work),  # the copy's code, whose .env is the copy's
        ACCELERATE_CONFIG="config/accelerate_config_cpu.yaml",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "walk.sh"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"

    # .env differs from .env.example only in the edited lines
    example = (work / ".env.example").read_text().splitlines()
    edited = (work / ".env").read_text().splitlines()
    changed = {a.split("=")[0] for a, b in zip(example, edited, strict=True) if a != b}
    assert changed <= set(env_edits)

    # stage 1 wrote what the training configs read
    assert (work / "csv/bdd_hf_dataset_lora_train.csv").is_file()
    assert any((work / "captions/val").glob("*.txt"))

    # LoRA: trained from the stage 1 CSV on MODEL_DIR, generation read the run's final weights
    lora_cfg = yaml.safe_load((work / "runs/lora_train/config.resolved.yaml").read_text())
    assert lora_cfg["model"]["pretrained_model"] == str(tiny_sdxl) and lora_cfg["model"]["vae"] is None
    assert lora_cfg["data"]["train_csv"] == "csv/bdd_hf_dataset_lora_train.csv"
    lora_gen = work / "inference_outputs/lora/generations"
    lora_records = [json.loads(line) for line in (lora_gen / "metadata.jsonl").read_text().splitlines()]
    assert lora_records and all((lora_gen / r["file"]).is_file() for r in lora_records)
    assert {r["lora_path"] for r in lora_records} == {"runs/lora_train/pytorch_lora_weights.safetensors"}
    assert {r["base_model"] for r in lora_records} == {str(tiny_sdxl)}

    # ControlNet: trained from its stage 1 CSV, generation read it, the val masks, captions/val and det_val
    cn_cfg = yaml.safe_load((work / "runs/controlnet_train/config.resolved.yaml").read_text())
    assert cn_cfg["data"]["train_csv"] == "csv/bdd_hf_dataset_controlnet_train.csv"
    cn_gen = work / "inference_outputs/controlnet/generations"
    cn_records = [json.loads(line) for line in (cn_gen / "metadata.jsonl").read_text().splitlines()]
    captioned = {p.stem for p in (work / "captions/val").glob("*.txt")}
    masks = {p.stem for p in (mini_bdd / "labels/sem_seg/masks/val").glob("*.png")}
    assert sorted(r["file"] for r in cn_records) == sorted(f"{m}_00.png" for m in masks & captioned)
    det_val = str((mini_bdd / "labels/det_20/det_val.json").resolve())
    assert {r["source_labels"] for r in cn_records} == {det_val}
    assert {r["controlnet_path"] for r in cn_records} == {"runs/controlnet_train/controlnet"}

    # two generation runs, two folders: nothing mixed, each its own resolved config
    assert sorted(p.name for p in (work / "inference_outputs").iterdir()) == ["controlnet", "lora"]
    assert sorted(p.name for p in lora_gen.iterdir()) == sorted(
        [*(r["file"] for r in lora_records), "metadata.jsonl"]
    )
    lora_resolved = yaml.safe_load((work / "inference_outputs/lora/config.resolved.yaml").read_text())
    cn_resolved = yaml.safe_load((work / "inference_outputs/controlnet/config.resolved.yaml").read_text())
    assert "lora_weights_path" in lora_resolved["paths"] and "controlnet_path" in cn_resolved["paths"]

    # stage 4 annotated the ControlNet images with YOLO_MODEL and checked each against its source frame's boxes
    manifest = [
        json.loads(line) for line in (work / "annotated/controlnet/manifest.jsonl").read_text().splitlines()
    ]
    assert len(manifest) == len(cn_records)
    assert all(m["layout"] is not None and m["layout"]["n_source"] > 0 for m in manifest), manifest
    assert (work / "annotated/controlnet/data.yaml").is_file()
    config = yaml.safe_load((work / "annotated/controlnet/annotation_config.yaml").read_text())
    assert config["model"] == str(detector)
