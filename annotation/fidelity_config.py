"""The schema of config/fidelity.yaml (every key is documented there): what annotation/evaluate_fidelity.py scores and
how. Its flags are other spellings of these keys (``--imgsz`` is ``detector.imgsz``); paths that must exist are
checked here, so ``--check`` and a bad run fail the same way, before anything is read. No torch, no ultralytics."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from annotation.metrics import EVAL_CONF
from annotation.settings import ClassMapValue, check_bdd_class
from core.config import Section

SEG_MODEL_HELP = (
    "pass a local folder with a transformers semantic segmentation model trained on Cityscapes' 19 classes "
    "(config.json, weights, preprocessor_config.json); fetch one once on a host with internet, e.g. "
    "`huggingface-cli download nvidia/segformer-b0-finetuned-cityscapes-1024-1024 --local-dir FOLDER`"
)
FID_HELP = (
    "pass torch-fidelity's InceptionV3 weights file; fetch it once on a host with internet from "
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class FidelityPaths(Section):
    generations: str  # generated images with their metadata.jsonl (ControlNet generation's output)
    bdd_data_dir: str | None = None  # where the real source frames are: a BDD100K folder's images/ ...
    real_images: str | None = None  # ... or any folder, searched recursively
    out: str | None = None  # report folder; None: <generations>/../fidelity

    @model_validator(mode="after")
    def _one_real_source(self) -> FidelityPaths:
        if (self.bdd_data_dir is None) == (self.real_images is None):
            raise ValueError(
                "set paths.bdd_data_dir (--bdd_data_dir) or paths.real_images (--real_images): where the real "
                "source frames are; exactly one (clear the other with e.g. paths.bdd_data_dir=null)"
            )
        return self


class DetectorSettings(Section):
    model: str  # local YOLO weights (.pt): nothing is downloaded
    imgsz: int = Field(640, ge=1)
    batch: int = Field(16, ge=1)  # images per batch: detector, segmenter and FID alike
    device: str | int | None = None  # None: the first GPU, else the CPU
    conf: float = Field(EVAL_CONF, ge=0.0, le=1.0)  # lowest confidence kept: as for any mAP
    iou: float = Field(0.7, gt=0.0, le=1.0)  # NMS
    classes: list[str] | None = None  # BDD classes scored; None: every class the detector maps to
    class_map: ClassMapValue = None  # model class -> BDD class, as annotation's; None: auto

    @field_validator("classes")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            check_bdd_class(name, "--classes")
        return value


class ScoringSettings(Section):
    min_box_size: float = Field(0.0, ge=0.0)  # layout boxes with a shorter side (px) are left out
    max_images: int | None = Field(None, ge=1)  # only the first N generations by file name
    allow_missing_real: bool = False  # skip generations whose real frame is missing (else: an error)


class SegmentationSettings(Section):
    model: str | None = None  # local Cityscapes-class segmentation model folder: mask mIoU; None: off

    @field_validator("model")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"segmentation model folder not found: {value}; {SEG_MODEL_HELP}")
        return value


class DistributionSettings(Section):
    features: str | None = None  # local torch-fidelity InceptionV3 weights file: FID/KID; None: off
    dims: Literal[64, 192, 768, 2048] = 2048

    @field_validator("features")
    @classmethod
    def _file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"--fid_features file not found: {value}; {FID_HELP}")
        return value


class FidelityConfig(Section):
    paths: FidelityPaths
    detector: DetectorSettings
    scoring: ScoringSettings = ScoringSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    distribution: DistributionSettings = DistributionSettings()
