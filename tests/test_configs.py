"""Every registered YAML in config/ loads through its schema; every accelerate config loads in accelerate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from config_registry import SCHEMAS

from ai.common.config import load_config

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


def test_registry_names_existing_files():
    assert all((REPO / p).is_file() for p in SCHEMAS)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / path))
    assert cfg.num_processes >= 1 and cfg.compute_environment.value == "LOCAL_MACHINE"
    if "cpu" in path:
        assert str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) == "no"
