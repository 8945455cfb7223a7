"""Ultralytics, offline by construction: environment, fonts, model loading and batched streamed inference.

:func:`prepare_offline` must run before the first ``import ultralytics`` (which otherwise probes the network
for ``ONLINE``); everything that imports ultralytics lives behind it, inside functions.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.cli import UserError
from core.io import atomic_write_text

WEIGHTS_HELP = (
    "This tool never downloads weights. On a host with internet, fetch them once, e.g. "
    "`python -c \"from ultralytics import YOLO; YOLO('yolov8n.pt')\"` or from "
    "https://github.com/ultralytics/assets/releases, copy the .pt file here and pass its path with --model; "
    "for a dry run without weights use an architecture such as --model yolov8n.yaml (random weights)"
)
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def prepare_offline(default_config_dir: Path) -> Path:
    """Set ultralytics' offline switches (unless already set) and return its config dir.

    YOLO_CONFIG_DIR defaults to ``default_config_dir`` so settings never land in the user's home.
    """
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(default_config_dir))
    config_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    install_fonts(config_dir)
    return config_dir


def dejavu_font() -> Path:
    """DejaVuSans.ttf from the matplotlib wheel (always present: matplotlib is an ultralytics dependency)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def install_fonts(config_dir: Path) -> None:
    """Put the fonts ultralytics' check_font looks for where it looks first, so it never goes online."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        if not (config_dir / name).is_file():
            tmp = config_dir / f".{name}.tmp{os.getpid()}"
            shutil.copyfile(dejavu_font(), tmp)
            os.replace(tmp, config_dir / name)


def import_ultralytics():
    """Import ultralytics after :func:`prepare_offline`, switch telemetry off, fonts into its real config dir."""
    import ultralytics
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    install_fonts(
        Path(USER_CONFIG_DIR)
    )  # the dir ultralytics fixed at its first import (may predate our env)
    if SETTINGS.get("sync"):
        SETTINGS.update({"sync": False})
    restore_pil_open()
    return ultralytics


def restore_pil_open() -> None:
    """Undo ultralytics' process-wide PIL.Image.open patch.

    On an unreadable image the patch tries to install pi-heif; offline that raises ModuleNotFoundError instead of
    PIL's UnidentifiedImageError, which breaks every caller's corrupt-image handling in the same process.
    """
    from PIL import Image
    from ultralytics.utils import patches

    original = getattr(patches, "_image_open", None)
    if original is not None:
        Image.open = original


@dataclass
class LoadedModel:
    model: object  # ultralytics.YOLO
    names: dict[int, str]
    description: str
    fingerprint: str  # identifies the weights, for resume


def check_model_spec(spec: str) -> None:
    """Fail fast (before any output is written) on a weights path that does not exist."""
    path = Path(spec).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml") and not path.is_file():
        raise UserError(f"model weights not found: {path}. {WEIGHTS_HELP}")


def load_model(spec: str) -> LoadedModel:
    """A local weights file (.pt and other ultralytics formats) or a built-in architecture yaml (random weights)."""
    import_ultralytics()
    from ultralytics import YOLO

    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            model = YOLO(str(path) if path.is_file() else spec)
        except (FileNotFoundError, AssertionError) as exc:
            raise UserError(
                f"model architecture {spec!r} not found ({exc}); use a file path or a built-in name such as "
                "yolov8n.yaml, yolo11n.yaml, yolo12n.yaml"
            ) from None
        names = dict(model.model.names)
        if _placeholder_names(names) and len(names) == 80:
            names = coco_names()
            model.model.names = names  # a yaml model has names '0'..'79'; it is COCO-shaped
        return LoadedModel(
            model, names, f"{spec} (architecture only, RANDOM weights: dry run)", f"yaml:{spec}"
        )
    check_model_spec(spec)
    from core.io import sha256_file

    try:
        model = YOLO(str(path.resolve()))
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise UserError(f"cannot load model weights {path}: {type(exc).__name__}: {exc}") from None
    if getattr(model, "task", "detect") != "detect":
        raise UserError(f"{path} is a {model.task} model; annotation needs a detection model")
    return LoadedModel(model, dict(model.names), str(path), f"sha256:{sha256_file(path)}")


def _placeholder_names(names: dict[int, str]) -> bool:
    return all(str(k) == str(v) for k, v in names.items())


def coco_names() -> dict[int, str]:
    """The 80 COCO names shipped in the ultralytics wheel (cfg/datasets/coco.yaml)."""
    from ultralytics.utils import ROOT, YAML

    return dict(YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"])


@dataclass
class Detection:
    model_class: int
    confidence: float
    xyxy: tuple[float, float, float, float]


@dataclass
class ImageResult:
    path: Path
    width: int
    height: int
    detections: list[Detection]


def stream_predictions(
    loaded: LoadedModel,
    images: Sequence[Path],
    list_file: Path,
    *,
    conf: float,
    iou: float,
    imgsz: int,
    batch: int,
    device: str | int | None,
    max_det: int,
    classes: list[int] | None,
) -> Iterator[ImageResult]:
    """Batched, streamed inference over ``images`` (absolute paths) via a source list file.

    A list file (not a Python list) lets ultralytics load ``batch`` images at a time instead of all at once. Results
    are keyed by ``r.path``: an image ultralytics cannot read is skipped by it, so results may be fewer than images.
    """
    atomic_write_text(list_file, "".join(f"{p}\n" for p in images))
    results = loaded.model.predict(
        source=str(list_file),
        stream=True,
        conf=conf,
        iou=iou,
        imgsz=imgsz,
        batch=batch,
        device=device,
        max_det=max_det,
        classes=classes,
        verbose=False,
        save=False,
    )
    for r in results:
        boxes = r.boxes
        xyxy = boxes.xyxy.cpu().numpy().tolist()
        cls = boxes.cls.cpu().numpy().astype(int).tolist()
        confs = boxes.conf.cpu().numpy().tolist()
        dets = [
            Detection(c, float(p), tuple(float(v) for v in b))
            for c, p, b in zip(cls, confs, xyxy, strict=True)
        ]
        h, w = r.orig_shape
        yield ImageResult(Path(r.path), int(w), int(h), dets)
