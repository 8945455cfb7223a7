"""Settings of the annotation stage: the pydantic schema of config/annotation.yaml and the class mapping.

The schema is built on :class:`core.config.Section` (unknown keys are errors, all errors reported at once with
their dotted key). Command-line flags are merged into the YAML data before validation, so a bad ``--conf`` is
reported as ``predict.conf: ...`` just like a bad value in the file. The file's values may name environment
variables (``model: ${YOLO_MODEL:-yolov8n.pt}``): :func:`core.config.read_yaml` loads ``.env`` and expands them
(the flags come expanded from the shell); a class-map file is read the same way.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from annotation.consensus import LABEL_SOURCES
from core.cli import UserError
from core.config import Section, read_yaml
from vocab import bdd

#: COCO class names (as in ultralytics' coco.yaml) -> BDD100K detection classes. COCO has no rider and no general
#: traffic-sign class: riders are never produced and only stop signs become traffic signs.
COCO_TO_BDD: dict[str, str] = {
    "person": "pedestrian",
    "bicycle": "bicycle",
    "car": "car",
    "motorcycle": "motorcycle",
    "bus": "bus",
    "train": "train",
    "truck": "truck",
    "traffic light": "traffic light",
    "stop sign": "traffic sign",
}

ClassMapValue = dict[str | int, str] | str | None


def check_bdd_class(name: Any, where: str) -> str:
    """Return ``name`` if it is one of the 10 BDD100K detection classes, else raise with the valid names."""
    if isinstance(name, str) and name in bdd.DET_CLASS_YOLO_ID:
        return name
    close = difflib.get_close_matches(str(name), bdd.DET_CLASSES, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"{where}: {name!r} is not a BDD100K detection class{hint}; valid classes: {', '.join(bdd.DET_CLASSES)}"
    )


class PredictSettings(Section):
    """Arguments of ultralytics' predict()."""

    conf: float = Field(0.1, ge=0.0, le=1.0)
    iou: float = Field(0.7, gt=0.0, le=1.0)
    imgsz: int = Field(640, ge=32, le=4096)
    batch: int = Field(16, ge=1, le=1024)
    device: str | int | None = None
    max_det: int = Field(300, ge=1)


class FilterSettings(Section):
    """Which detections become labels and which images are accepted."""

    min_confidence: float = Field(0.25, ge=0.0, le=1.0)
    min_detections: int = Field(1, ge=0)
    min_recall: float = Field(0.5, ge=0.0, le=1.0)
    min_precision: float = Field(0.3, ge=0.0, le=1.0)
    layout_iou: float = Field(0.5, gt=0.0, le=1.0)
    layout_min_box_size: float = Field(0.0, ge=0.0)


class LabelsSettings(Section):
    """Where an image's labels come from when its metadata names a source layout (annotation/consensus.py)."""

    source: Literal[tuple(LABEL_SOURCES)] = "consensus"
    policy: Literal["keep_layout", "confirmed", "strict"] = "keep_layout"
    geometry: Literal["layout", "detector"] = "layout"
    confirm_min_confidence: float | None = Field(None, ge=0.0, le=1.0)
    detector_only_min_confidence: float | None = Field(0.5, ge=0.0, le=1.0)
    max_disagreement: float = Field(0.5, ge=0.0, le=1.0)


class SplitSettings(Section):
    val_fraction: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0


class OutputSettings(Section):
    image_mode: Literal["hardlink", "copy"] = "hardlink"
    confidence_sidecars: bool = True
    previews: bool = True
    preview_max_side: int = Field(640, ge=64)
    contact_sheet_max_images: int = Field(64, ge=0)
    contact_sheet_thumb: int = Field(256, ge=32)


class AnnotationConfig(Section):
    """The whole annotation config (config/annotation.yaml)."""

    model: str = "yolov8n.pt"
    predict: PredictSettings = PredictSettings()
    class_map: ClassMapValue = None
    classes: list[str] | None = None
    filter: FilterSettings = FilterSettings()
    labels: LabelsSettings = LabelsSettings()
    split: SplitSettings = SplitSettings()
    output: OutputSettings = OutputSettings()

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty model path; pass a .pt file or an architecture such as yolov8n.yaml")
        return value

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("empty list; leave classes out (null) to keep every mapped class")
            for name in value:
                check_bdd_class(name, "classes")
        return value

    @field_validator("class_map")
    @classmethod
    def _known_targets(cls, value: ClassMapValue) -> ClassMapValue:
        if isinstance(value, dict):
            for key, target in value.items():
                check_bdd_class(target, f"class_map[{key!r}]")
        return value

    @model_validator(mode="after")
    def _thresholds_consistent(self) -> AnnotationConfig:
        if self.filter.min_confidence < self.predict.conf:
            raise ValueError(
                f"filter.min_confidence ({self.filter.min_confidence}) is below predict.conf ({self.predict.conf}): "
                "detections under predict.conf are never returned, so lower predict.conf too"
            )
        return self


# ---------------------------------------------------------------------------------------------------------------
# Class mapping: model class ids -> BDD100K YOLO ids
# ---------------------------------------------------------------------------------------------------------------


def parse_class_map_arg(text: str) -> dict[str | int, str] | str:
    """``--class_map`` value: a YAML file path, an inline YAML mapping, or ``name=bdd class,...`` pairs."""
    if text.strip().lower() == "auto":
        return "auto"
    if Path(text).suffix.lower() in (".yaml", ".yml", ".json") or os.path.isfile(text):
        return text
    if text.lstrip().startswith("{"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"--class_map {text!r}: not a YAML mapping: {exc}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise UserError(f"--class_map {text!r}: expected a mapping such as '{{person: pedestrian}}'")
        return data
    pairs: dict[str | int, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise UserError(
                f"--class_map: {part.strip()!r} is not name=bdd_class; use e.g. 'person=pedestrian,stop sign=traffic "
                "sign', an inline mapping '{person: pedestrian}', or a YAML file"
            )
        key, value = (s.strip() for s in part.split("=", 1))
        pairs[int(key) if key.isdigit() else key] = value
    return pairs


def load_class_map_file(path: str | os.PathLike) -> dict[str | int, str]:
    data = read_yaml(path)
    for key, target in data.items():
        try:
            check_bdd_class(target, f"{path}: {key!r}")
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return data


def resolve_class_map(
    model_names: dict[int, str], class_map: ClassMapValue, classes: list[str] | None
) -> tuple[dict[int, int], str]:
    """Model class id -> BDD YOLO id, and a short description of where the mapping came from.

    ``class_map`` None or 'auto': identity when every model class name is a BDD class (a detector trained on
    BDD100K), else the COCO -> BDD default by name. A mapping's keys are model class names or ids; its values
    BDD class names. ``classes`` keeps only those BDD classes.
    """
    if isinstance(class_map, str) and class_map != "auto":
        class_map = load_class_map_file(class_map)
    if class_map is None or class_map == "auto":
        if all(name in bdd.DET_CLASS_YOLO_ID for name in model_names.values()):
            mapping, origin = (
                {name: name for name in model_names.values()},
                "identity (model classes are BDD classes)",
            )
        else:
            mapping, origin = dict(COCO_TO_BDD), "COCO -> BDD100K default"
    else:
        mapping, origin = class_map, "configured class_map"

    by_name = {name: i for i, name in model_names.items()}
    out: dict[int, int] = {}
    for key, target in mapping.items():
        target = _checked(target, key)
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and key not in by_name):
            model_id = int(key)
            if model_id not in model_names:
                raise UserError(
                    f"class_map: model class id {model_id} does not exist (model has 0-{len(model_names) - 1})"
                )
        elif key in by_name:
            model_id = by_name[key]
        elif origin == "COCO -> BDD100K default":
            continue  # the default names classes a non-COCO model may not have
        else:
            close = difflib.get_close_matches(str(key), list(by_name), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UserError(
                f"class_map: the model has no class {key!r}{hint}; its classes: {_short_list(model_names.values())}"
            )
        if classes is None or target in classes:
            out[model_id] = bdd.DET_CLASS_YOLO_ID[target]
    if not out:
        raise UserError(
            f"no model class maps to a BDD100K class ({origin}); model classes: {_short_list(model_names.values())}. "
            "Pass --class_map, e.g. 'vehicle=car'"
        )
    return out, origin


def _checked(target: Any, key: Any) -> str:
    try:
        return check_bdd_class(target, f"class_map[{key!r}]")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _short_list(names, limit: int = 20) -> str:
    names = list(names)
    text = ", ".join(map(str, names[:limit]))
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")
