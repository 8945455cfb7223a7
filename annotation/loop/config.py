"""The schema of config/loop.yaml (every key is documented there): inputs, the stage configs, and per step the
settings the loop passes to that stage's command. No torch, no ultralytics: ``--check`` answers in a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import field_validator

from core.config import Section

#: plan_generation flags a loop may set (``plan:``); the loop sets --bdd_data_dir, --split, --targets, --out itself
PLAN_FLAGS = ("scenes", "seed", "labels_file", "templates", "image_size")
#: yolo_annotate_folders flags the loop sets itself (``annotate:`` may set the others, by flag name)
ANNOTATE_RESERVED = ("model", "input_folder", "output_folder", "config")
#: dotted keys the loop sets itself, per step whose mapping holds dotted overrides
RESERVED_KEYS = {
    "diagnose": ("paths.val", "paths.out", "detector.model"),
    "generate": ("paths.plan", "paths.infer_path"),
    "gain": ("data.real", "data.val", "data.synthetic", "out"),
}


class LoopData(Section):
    bdd_data_dir: str  # BDD100K root: the plan takes its layouts from the TRAIN frames' labels
    real: str  # bdd_to_yolo data.yaml whose train split is the gain run's real data
    val: str  # bdd_to_yolo data.yaml whose val split (frames.csv beside it) diagnose and gain score on


class StageConfigs(Section):
    diagnose: str = "config/diagnose.yaml"
    generate: str = "config/controlnet_infer.yaml"
    annotate: str = "config/annotation.yaml"
    gain: str = "config/gain.yaml"


def dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{a: {b: 1}, c.d: 2}`` -> ``{"a.b": 1, "c.d": 2}``: nested sections and dotted keys alike."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(dotted(value, name + "."))
        else:
            out[name] = value
    return out


def as_text(value: Any) -> str:
    """A value as a command-line word the stage reads back as YAML (strings as they are)."""
    return value if isinstance(value, str) else json.dumps(value)


class LoopConfig(Section):
    out: str = "outputs/loop"  # every step's folder, loop_state.json, loop.log
    detector: str  # the user's detector (.pt): diagnosed, and stage 4's labeller
    accelerate_config: str | None = None  # generation's accelerate config; None: the launcher's default
    data: LoopData
    configs: StageConfigs = StageConfigs()
    diagnose: dict[str, Any] = {}  # dotted overrides of configs.diagnose
    plan: dict[str, Any] = {}  # plan_generation flags
    generate: dict[str, Any] = {}  # dotted overrides of configs.generate
    annotate: dict[str, Any] = {}  # yolo_annotate_folders flags
    gain: dict[str, Any] = {}  # dotted overrides of configs.gain

    @field_validator("diagnose", "generate", "gain")
    @classmethod
    def _not_the_loops(cls, value: dict[str, Any], info) -> dict[str, Any]:
        taken = sorted(set(dotted(value)) & set(RESERVED_KEYS[info.field_name]))
        if taken:
            keys = ", ".join(f"{info.field_name}.{k}" for k in taken)
            raise ValueError(
                f"{keys}: the loop sets these itself (from data.*, detector and out); leave them out"
            )
        return value

    @field_validator("plan")
    @classmethod
    def _plan_flags(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(PLAN_FLAGS))
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not a plan_generation flag the loop passes on (valid: {', '.join(PLAN_FLAGS)}; "
                "--bdd_data_dir, --split, --targets and --out are the loop's)"
            )
        return value

    @field_validator("annotate")
    @classmethod
    def _annotate_flags(cls, value: dict[str, Any]) -> dict[str, Any]:
        from annotation.yolo_annotate_folders import FLAG_KEYS

        allowed = sorted(set(FLAG_KEYS) - set(ANNOTATE_RESERVED))
        bad = sorted(set(value) - set(allowed))
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: not a yolo_annotate_folders flag the loop passes on (valid: {', '.join(allowed)}; "
                "--model, --input_folder and --output_folder are the loop's)"
            )
        return value

    @property
    def out_dir(self) -> Path:
        return Path(self.out)
