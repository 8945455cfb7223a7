"""Rough edges a new user hit (issue 18, "Smoother runs"), each pinned by a test.

The others live beside the code they concern: a refused LoRA leaves no output folder (test_lora_infer.py,
test_a_lora_that_only_partly_fits_the_base_is_refused) and the README's gain command names no device
(test_gain.py, test_shipped_config_is_the_readme_command).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from sdxl_fixtures import make_image_csv, run_launcher

from core.cli import UserError

REPO = Path(__file__).resolve().parents[1]


def test_readme_says_how_to_activate_the_venv_before_its_python_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    activate = readme.find("source .venv/bin/activate")
    first_python = re.search(r"^python3? ", readme, flags=re.M)
    assert first_python and 0 <= activate < first_python.start(), (
        "say how to activate .venv before `python …`"
    )
    assert re.search(r"^install:", (REPO / "Makefile").read_text(encoding="utf-8"), flags=re.M)
    # ... and the launchers really find it themselves
    assert '"$repo_root/.venv/bin/python"' in (REPO / "ai" / "common" / "launch.sh").read_text(
        encoding="utf-8"
    )


# --- --check catches a table too small for the held-out validation rows --------------------------------------


def write_table(folder: Path, rows: int) -> Path:
    """A stage-1 style CSV of ``rows`` rows (the files need not exist: --check reads no image)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,conditioning_image,text"] + [f"{i}.jpg,{i}.png,a road {i}" for i in range(rows)]
    csv = folder / "train.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv


def check(module: str, config: str, *overrides: str) -> int:
    import importlib

    main = importlib.import_module(module).main
    return main(["--config", str(REPO / config), "--check", *overrides])


TRAINERS = [
    ("ai.lora.train_lora_sdxl", "config/lora_train.yaml"),
    ("ai.controlnet.train_controlnet_sdxl", "config/controlnet_train.yaml"),
]


@pytest.mark.parametrize("module, config", TRAINERS)
def test_check_refuses_loss_rows_that_leave_no_training_rows_and_names_the_fix(
    module, config, tiny_sdxl, tmp_path
):
    csv = write_table(tmp_path / "csv", rows=20)  # the README's mini data set is this small
    shipped = yaml.safe_load((REPO / config).read_text(encoding="utf-8"))["validation"]["loss_rows"]
    paths = [
        f"model.pretrained_model={tiny_sdxl}",
        f"data.train_csv={csv}",
        f"output.runs_dir={tmp_path / 'r'}",
    ]
    if shipped >= 20:
        with pytest.raises(UserError) as err:
            check(module, config, *paths)
        message = str(err.value)
        assert f"validation.loss_rows={shipped} leaves no training rows" in message
        assert f"data.train_csv {csv} has 20 rows" in message
        fix = re.search(r"e\.g\. (validation\.loss_rows=\d+)", message).group(1)
        assert check(module, config, *paths, fix) == 0  # the override it names passes
    # whatever the shipped value, a table that small is refused at --check, not after accelerate launch
    with pytest.raises(UserError, match=r"validation\.loss_rows=20 leaves no training rows"):
        check(module, config, *paths, "validation.loss_rows=20")
    with pytest.raises(UserError, match=r"data\.max_rows=3 keeps 3\)"):
        check(module, config, *paths, "validation.loss_rows=5", "data.max_rows=3")
    empty = write_table(tmp_path / "empty", rows=0)
    with pytest.raises(UserError, match="has 0 rows: nothing to train on"):
        check(module, config, *paths, f"data.train_csv={empty}")


def test_quoted_multiline_captions_count_as_one_row(tmp_path):
    from ai.common.train_config import count_csv_rows

    csv = tmp_path / "t.csv"
    csv.write_text('image,text\na.jpg,"a road\nat night"\nb.jpg,plain\n', encoding="utf-8")
    assert count_csv_rows(csv) == 2


# --- .gitignore covers every default output folder --------------------------------------------------------------

OUTPUT_FLAGS = ("--out", "--output_folder", "--caption_txt_output_folder")


def config_paths() -> set[str]:
    """Relative paths in the shipped stage configs: outputs, and inputs that an earlier stage writes."""
    found = set()

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, str) and ("/" in node or key in ("runs_dir", "dir", "out", "infer_path")):
            found.add(node)

    for path in sorted((REPO / "config").rglob("*.yaml")):
        if not path.name.startswith("accelerate_config"):
            walk(yaml.safe_load(path.read_text(encoding="utf-8")))
    return {p for p in found if p and not p.startswith(("/", "config/")) and "${" not in p}


def readme_output_paths() -> set[str]:
    found = set()
    for readme in [REPO / "README.md", *REPO.glob("*/README.md")]:
        text = readme.read_text(encoding="utf-8")
        for flag in OUTPUT_FLAGS:
            for value in re.findall(rf"{flag} ([\w./-]+)", text):
                if not value.startswith(("/", "$")) and value not in ("A",):  # "A": a placeholder in prose
                    found.add(value.rstrip(".,"))
    return found


def test_gitignore_covers_every_default_output_folder():
    paths = config_paths() | readme_output_paths()
    for expected in ("runs", "cache/sdxl", "inference_outputs/lora", "eval/gain", "data/real", "csv", "plan"):
        assert expected in paths or any(p.startswith(expected + "/") for p in paths), expected
    probes = [f"{p}/probe" for p in sorted(paths)]  # a file inside: folder patterns match it
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(probes) + "\n",
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    ignored = set(out.stdout.split())
    missing = sorted(p[: -len("/probe")] for p in probes if p not in ignored)
    assert not missing, f"default output paths that git would offer to commit: {missing}"


# --- the resume message is logged once ---------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_message_is_logged_once_with_two_processes(tiny_sdxl, tmp_path):
    csv = make_image_csv(tmp_path / "data", n=4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"pretrained_model": str(tiny_sdxl)},
                "data": {"train_csv": str(csv), "resolution": 128, "bucket_step": 16, "num_workers": 0},
                "cache": {"dir": str(tmp_path / "cache"), "dtype": "float32"},
                "lora": {"rank": 4, "alpha": 4},
                "optim": {"lr_warmup_steps": 0},
                "train": {"max_train_steps": 1, "batch_size": 1, "mixed_precision": "no"},
                "checkpoint": {"every_n_steps": 1, "resume_from": "latest"},
                "validation": {"every_n_steps": 0},
                "log": {"report_to": "none"},
                "output": {"runs_dir": str(tmp_path / "runs"), "name": "r", "kohya_copy": False},
            }
        )
    )
    accelerate = "config/accelerate_config_cpu_2proc.yaml"
    fresh = run_launcher("ai/lora/run_lora_train.sh", cfg, accelerate_config=accelerate)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (fresh.stdout + fresh.stderr).count("no complete checkpoint") == 1, fresh.stderr
    resumed = run_launcher(
        "ai/lora/run_lora_train.sh", cfg, "train.max_train_steps=2", accelerate_config=accelerate
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert log.count(f"resuming from {tmp_path / 'runs' / 'r' / 'checkpoint-1'}") == 1, log[-3000:]
    assert "no complete checkpoint" not in log
