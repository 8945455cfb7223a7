"""Every registered YAML in config/ loads through its schema; every accelerate config loads in accelerate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from config_registry import SCHEMAS
from test_import_cycles import PACKAGES

from core.cli import UserError
from core.config import Section, load_config

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted(
    p.relative_to(REPO).as_posix() for p in (REPO / "config").glob("accelerate_config_*.yaml")
)


def _schema(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", sorted(SCHEMAS))
def test_config_loads_through_its_schema(path):
    cfg = load_config(_schema(SCHEMAS[path]), REPO / path)
    assert cfg.model_dump()  # validated, defaults filled in


@pytest.mark.parametrize("path", sorted(SCHEMAS))
def test_every_schema_key_is_written_in_the_main_configs(path):
    """The documented configs (not demo/) spell out every key, so users see all knobs."""
    if "/demo/" in path:
        pytest.skip("demo configs set only what differs")
    import yaml

    schema = _schema(SCHEMAS[path])
    written = yaml.safe_load((REPO / path).read_text())
    missing = [
        f"{section}.{key}"
        for section, field in schema.model_fields.items()
        for key in getattr(field.annotation, "model_fields", {})
        if key not in (written.get(section) or {})
    ]
    assert not missing, f"{path} does not document: {missing}"


#: config/ as the release before the generation configs took training's key names shipped it (its users' copies)
RELEASE_CONFIGS = REPO / "tests" / "data" / "release_configs"


@pytest.mark.parametrize("path", sorted(SCHEMAS))
def test_configs_written_for_the_last_release_still_load(path, monkeypatch, capsys):
    """Each old key (paths.base_model_path, paths.vae_path, paths.variant) is read as its new one, with a warning
    that names it; the base model, VAE and variant are what the old keys said."""
    monkeypatch.setenv("BDD_SDXL_ENV_FILE", "")
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    old_path = RELEASE_CONFIGS / Path(path).relative_to("config")
    if not old_path.is_file():
        pytest.skip("new since the last release: no users' copies to keep loading")
    schema = _schema(SCHEMAS[path])
    old = load_config(schema, old_path)
    err = capsys.readouterr().err
    written = yaml.safe_load(old_path.read_text(encoding="utf-8"))
    renamed = getattr(schema, "RENAMED_KEYS", {})
    for old_key, new_key in renamed.items():
        section, key = old_key.split(".")
        if key not in (written.get(section) or {}):
            continue
        assert f"warning: {old_path}: {old_key} is deprecated; use {new_key}" in err
    paths = written.get("paths") or {}
    if "base_model_path" in paths:
        assert old.model.pretrained_model == paths["base_model_path"].replace("${MODEL_DIR:-", "").rstrip("}")
        assert old.model.vae is None and old.model.variant == paths.get("variant")  # ${VAE_DIR:-}: null


def test_a_key_and_its_old_name_must_agree(tmp_path, monkeypatch):
    from ai.lora.infer_lora_sdxl import LoraInferConfig

    monkeypatch.setenv("BDD_SDXL_ENV_FILE", "")
    path = tmp_path / "both.yaml"
    path.write_text("model:\n  pretrained_model: a\npaths:\n  base_model_path: b\n", encoding="utf-8")
    with pytest.raises(
        UserError, match="model.pretrained_model and paths.base_model_path .its old name. are both"
    ):
        load_config(LoraInferConfig, path)
    # an old-name override replaces the file's new key (overrides come last, as always)
    path.write_text("model:\n  pretrained_model: a\n", encoding="utf-8")
    cfg = load_config(LoraInferConfig, path, ["paths.base_model_path=b", "paths.vae_path=v"])
    assert (cfg.model.pretrained_model, cfg.model.vae) == ("b", "v")


def test_registry_names_existing_files():
    assert all((REPO / p).is_file() for p in SCHEMAS)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / path))
    assert cfg.num_processes >= 1 and cfg.compute_environment.value == "LOCAL_MACHINE"
    if "cpu" in path:
        assert str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) == "no"


# ---------------------------------------------------------------------------------------------------------------
# ${VAR} and ${VAR:-default} in values; .env read by the Python stages and the launchers alike
# ---------------------------------------------------------------------------------------------------------------

ENV_VARS = ("MODEL_DIR", "VAE_DIR", "BDD_DATA_DIR", "YOLO_MODEL", "STEPS", "FLAG", "NOT_SET")
BASE_MODEL_KEYS = {  # config -> its base model key (the four must agree)
    "config/lora_train.yaml": ("model", "pretrained_model"),
    "config/controlnet_train.yaml": ("model", "pretrained_model"),
    "config/lora_infer.yaml": ("model", "pretrained_model"),
    "config/controlnet_infer.yaml": ("model", "pretrained_model"),
}
VAE_KEYS = {
    "config/lora_train.yaml": ("model", "vae"),
    "config/controlnet_train.yaml": ("model", "vae"),
    "config/lora_infer.yaml": ("model", "vae"),
    "config/controlnet_infer.yaml": ("model", "vae"),
}


@pytest.fixture
def environ(monkeypatch):
    """A private copy of os.environ (loading .env writes to it) without the user's variables and without .env."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["BDD_SDXL_ENV_FILE"] = ""
    monkeypatch.setattr(os, "environ", env)
    return env


class _Model(Section):
    path: str = "x"
    vae: str | None = "own-vae"
    steps: int = 1
    flag: bool = False
    seeds: list[int] = [0]


class _Cfg(Section):
    model: _Model = _Model()
    prompt: str | None = None


def test_env_references_expand_in_values_and_overrides(environ, tmp_path):
    environ.update(MODEL_DIR="/models/sdxl", VAE_DIR="", STEPS="7", B="from-b")
    path = tmp_path / "c.yaml"
    path.write_text(
        "# ${NOT_SET} in a comment is never read\n"
        "model:\n"
        "  path: ${MODEL_DIR}/unet   # ${NOT_SET} here neither\n"
        "  vae: ${VAE_DIR:-}\n"
        "  steps: ${UNSET_STEPS:-1000}\n"
        "  flag: ${FLAG:-true}\n"
        'prompt: "costs $5 or $$5, literal $${HOME}, ${A:-${B:-nested}} and ${A:-${C:-{x}}}"\n',
        encoding="utf-8",
    )
    cfg = load_config(_Cfg, path)
    assert cfg.model.path == "/models/sdxl/unet"
    assert cfg.model.vae is None  # an optional key whose whole value expands to nothing is null
    assert cfg.model.steps == 1000 and cfg.model.flag is True  # text from a variable validates as int / bool
    assert cfg.prompt == "costs $5 or $$5, literal ${HOME}, from-b and {x}"
    cfg = load_config(_Cfg, path, ["model.steps=${STEPS}", "model.vae=${VAE_DIR:-${MODEL_DIR}/vae}"])
    assert cfg.model.steps == 7 and cfg.model.vae == "/models/sdxl/vae"
    environ["UNSET_STEPS"] = "12"
    assert load_config(_Cfg, path).model.steps == 12


def test_env_errors_name_the_key_the_variable_and_where_to_set_it(environ, tmp_path):
    environ.update(VAE_DIR="", STEPS="many")
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: ${NOT_SET}\n  vae: ${VAE_DIR}/x\n  seeds: [1, '${ALSO_NOT_SET}']\n")
    with pytest.raises(UserError) as exc:
        load_config(_Cfg, path)
    lines = str(exc.value).splitlines()
    assert lines[0] == f"{path}: cannot expand environment variables"
    assert (
        lines[1]
        == "  model.path: ${NOT_SET} is not set: set NOT_SET in .env (see .env.example) or in the environment"
    )
    assert lines[2].startswith("  model.vae: ${VAE_DIR} is empty, which would leave '${VAE_DIR}/x' as '/x'")
    assert lines[3].startswith("  model.seeds.1: ${ALSO_NOT_SET} is not set")
    with pytest.raises(UserError, match=r"model\.steps: Input should be a valid integer.*\(got 'many'\) \(the value "
                       r"comes from '\$\{STEPS\}': set the variable in \.env"):  # fmt: skip
        load_config(_Cfg, None, ["model.steps=${STEPS}"])
    for bad, message in (
        ("${1A}", "is not a variable reference"),
        ("${A:?x}", r"\$\{A:\?...\} is not supported; use \$\{A\} or \$\{A:-default\}"),
        ("${A", r"not closed with \}"),
        ("${A:-{x}", r"not closed with \}"),
    ):
        with pytest.raises(UserError, match=rf"prompt: .*{message}"):
            load_config(_Cfg, None, [f"prompt={bad}"])


def test_yaml_no_and_off_are_strings_so_mixed_precision_no_works(environ):
    from ai.lora.train_lora_sdxl import Config

    cfg = load_config(
        Config, REPO / "config/lora_train.yaml", ["train.mixed_precision=no", "data.use_buckets=no"]
    )
    assert cfg.train.mixed_precision == "no" and cfg.data.use_buckets is False


def test_shipped_configs_take_model_vae_data_and_detector_from_the_environment(environ):
    from annotation.settings import AnnotationConfig

    def load(path):
        return load_config(_schema(SCHEMAS.get(path, "annotation.settings:AnnotationConfig")), REPO / path)

    def value(cfg, keys):
        return getattr(getattr(cfg, keys[0]), keys[1])

    defaults = {path: value(load(path), keys) for path, keys in BASE_MODEL_KEYS.items()}
    assert set(defaults.values()) == {"stabilityai/stable-diffusion-xl-base-1.0"}  # train and infer agree
    assert all(value(load(path), keys) is None for path, keys in VAE_KEYS.items())
    assert load("config/annotation.yaml").model == AnnotationConfig().model == "yolov8n.pt"

    environ.update(MODEL_DIR="/m/sdxl", VAE_DIR="", BDD_DATA_DIR="/data/bdd", YOLO_MODEL="/m/yolo.pt")
    assert {value(load(path), keys) for path, keys in BASE_MODEL_KEYS.items()} == {"/m/sdxl"}
    assert all(value(load(path), keys) is None for path, keys in VAE_KEYS.items())  # empty VAE_DIR: null
    cn = load("config/controlnet_infer.yaml")
    assert cn.paths.masks_path == "/data/bdd/labels/sem_seg/masks/val"
    assert cn.paths.source_labels == "/data/bdd/labels/det_20/det_val.json"  # stage 4's layout check is on
    assert load("config/annotation.yaml").model == "/m/yolo.pt"
    environ["VAE_DIR"] = "/m/vae"
    assert {value(load(path), keys) for path, keys in VAE_KEYS.items()} == {"/m/vae"}


def test_shipped_defaults_chain_the_stages():
    """Each config's default input is where the previous stage's README command writes; outputs never collide."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")

    def raw(name):
        return yaml.safe_load((REPO / "config" / name).read_text(encoding="utf-8"))

    for name, method in (("lora_train.yaml", "lora"), ("controlnet_train.yaml", "controlnet")):
        assert raw(name)["data"]["train_csv"] == f"csv/bdd_hf_dataset_{method}_train.csv"
    assert "--output_folder csv" in readme
    lora_infer, cn_infer = raw("lora_infer.yaml")["paths"], raw("controlnet_infer.yaml")["paths"]
    assert lora_infer["lora_weights_path"] == "runs/lora_train"  # the run folder: its final weights
    assert cn_infer["controlnet_path"] == "runs/controlnet_train/controlnet"
    assert (
        cn_infer["captions_path"] == "captions/val" and "--caption_txt_output_folder captions/val" in readme
    )
    assert lora_infer["infer_path"] != cn_infer["infer_path"]
    assert f"--input_folder {cn_infer['infer_path']}/generations" in readme


def test_env_file_is_read_by_the_python_stages_and_the_launchers_and_the_environment_wins(tmp_path):
    """A repo copy with its own .env: `python -m <stage> --check` and `bash <launcher>` read MODEL_DIR from it (a
    missing folder, so --check stops before accelerate), unless the environment sets MODEL_DIR."""
    import os
    import shutil
    import subprocess
    import sys

    work = tmp_path / "repo"
    for name in (*PACKAGES, "config"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    (work / ".env").write_text(
        "# comment\nexport MODEL_DIR=/nonexistent/from-dotenv\nVAE_DIR=\nQUOTED='a b'\n", encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*ENV_VARS, "BDD_SDXL_ENV_FILE")}
    env.update(
        PYTHONPATH=str(work), PYTHON=sys.executable, ACCELERATE_CONFIG="config/accelerate_config_cpu.yaml"
    )
    commands = {
        "python": [
            sys.executable,
            "-m",
            "ai.lora.infer_lora_sdxl",
            "--config",
            "config/lora_infer.yaml",
            "--check",
        ],
        "launcher": ["bash", "ai/lora/run_lora_infer.sh"],
    }
    for how, command in commands.items():
        for environment, expected in (
            (env, "/nonexistent/from-dotenv"),
            ({**env, "MODEL_DIR": "/from-env"}, "/from-env"),
        ):
            proc = subprocess.run(
                command, cwd=work, env=environment, capture_output=True, text=True, timeout=120
            )
            assert proc.returncode == 2, (how, proc.stdout, proc.stderr)
            assert f"error: model folder not found: {expected}\n" in proc.stderr, (how, proc.stderr)

    # the launcher exports the file's new variables (quoted values intact) for accelerate and its processes
    env["BDD_SDXL_ENV_FILE"] = str(work / ".env")
    out = subprocess.run(
        [sys.executable, "-m", "core.envfile"],
        env={**env, "VAE_DIR": "/set"},
        capture_output=True,
        text=True,
    ).stdout
    assert out.splitlines() == ["export MODEL_DIR=/nonexistent/from-dotenv", "export QUOTED='a b'"]
    env["BDD_SDXL_ENV_FILE"] = str(work / "missing.env")
    proc = subprocess.run(
        ["bash", "ai/lora/run_lora_infer.sh"], cwd=work, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and f"BDD_SDXL_ENV_FILE={work / 'missing.env'}: file not found" in proc.stderr
