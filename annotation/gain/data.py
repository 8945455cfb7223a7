"""The gain evaluation's inputs: YOLO data yamls, their images and labels, fingerprints, the val frames' conditions.

Three data sets come in as YOLO data yamls with the 10 BDD100K classes in stage 4's order: the real frames (their
train split), the synthetic set (stage 4's data.yaml) and the real val frames (their val split, with
``frames.csv`` beside the yaml for each frame's weather and time of day). Messages name the flag that names each
file (``--real``, ``--synthetic``, ``--val``; the config keys ``data.real``, ...).

ultralytics is imported only inside :func:`split_items` (its image formats and label paths), never at import time.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.cli import UserError
from vocab import bdd

#: per-condition cells and margins: "weather|timeofday", "weather|*", "*|timeofday"
ANY = "*"
CONDITIONS_FILE = "frames.csv"
CONDITION_COLUMNS = ("split", "image", "weather", "timeofday", "scene")
#: the BDD100K frame attributes among them
ATTRIBUTE_COLUMNS = ("weather", "timeofday", "scene")


@dataclass(frozen=True)
class Item:
    """One image of a data set: a stable ``key`` (path under the data root), the image and its YOLO label file."""

    key: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DataYaml:
    path: Path  # the yaml file
    root: Path  # its resolved ``path:``
    data: dict[str, Any]
    flag: str  # the option that named it, for messages


def load_data_yaml(path: Path, flag: str) -> DataYaml:
    """A YOLO data yaml with the 10 BDD100K classes in stage 4's order; ``path:`` resolved (relative: to the yaml)."""
    if not path.is_file():
        raise UserError(f"{flag}: data yaml not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{flag}: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag}: {path} is not a YOLO data yaml (a mapping with path, train, val, names)")
    names = data.get("names")
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            names = list(names.values())
    if list(names or []) != list(bdd.DET_CLASSES):
        raise UserError(
            f"{flag}: {path}: names must be the 10 BDD100K classes in stage 4's order "
            f"({', '.join(bdd.DET_CLASSES)}), got {names!r}; write it with convert/bdd_to_yolo.py (real frames) "
            "or annotation/yolo_annotate_folders.py (generations)"
        )
    root = Path(str(data.get("path") or path.parent)).expanduser()
    if not root.is_absolute():
        root = path.parent / root
    return DataYaml(path, root.resolve(), data, flag)


def image_formats() -> frozenset[str]:
    from ultralytics.data.utils import IMG_FORMATS

    return frozenset(IMG_FORMATS)


def split_items(spec: DataYaml, split: str) -> list[Item]:
    """The images of ``split`` (a folder, an image-list .txt or a list of them, as ultralytics reads them), by key."""
    from ultralytics.data.utils import img2label_paths

    value = spec.data.get(split)
    if value is None:
        raise UserError(f"{spec.flag}: {spec.path} has no '{split}' key")
    formats = image_formats()
    images: list[Path] = []
    for entry in value if isinstance(value, list) else [value]:
        source = Path(str(entry)).expanduser()
        source = source if source.is_absolute() else spec.root / source
        if source.is_dir():
            images += [p for p in source.rglob("*") if p.suffix[1:].lower() in formats and p.is_file()]
        elif source.is_file() and source.suffix == ".txt":
            for line in source.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line:
                    continue
                p = source.parent / line[2:] if line.startswith("./") else Path(line)
                if p.suffix[1:].lower() in formats:
                    images.append(p)
        else:
            raise UserError(f"{spec.flag}: {spec.path}: '{split}' source not found: {source}")
    items: dict[str, Item] = {}
    for image in images:
        absolute = image.resolve()
        try:
            key = image.absolute().relative_to(spec.root).as_posix()
        except ValueError:
            key = absolute.as_posix()
        items.setdefault(key, Item(key, absolute, Path(img2label_paths([str(image.absolute())])[0])))
    return [items[k] for k in sorted(items)]


def fingerprint(items: Sequence[Item]) -> str:
    """What a data set's rows depend on: image keys and sizes, label contents and ignore-region side files (the
    crowd regions annotation/metrics.py reads beside val labels); not image bytes: too slow at 100k."""
    from annotation.metrics import ignore_path

    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.key}\0{item.image.stat().st_size}\0".encode())
        h.update(item.label.read_bytes() if item.label.is_file() else b"<no label>")
        ignore = ignore_path(item.label)
        if ignore is not None and ignore.is_file():
            h.update(b"\0ignore\0" + ignore.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------------
# Val conditions (frames.csv beside the val yaml)
# ---------------------------------------------------------------------------------------------------------------


def conditions_path(val_yaml: Path) -> Path:
    return val_yaml.parent / CONDITIONS_FILE


def conditions_fingerprint(val_yaml: Path) -> str:
    """What the per-condition figures depend on besides the val images: the bytes of frames.csv."""
    return hashlib.sha256(conditions_path(val_yaml).read_bytes()).hexdigest()[:20]


def read_frame_attributes(
    val: DataYaml, items: Sequence[Item], *, flag: str = "--val", hint: str | None = None
) -> dict[str, dict[str, str]]:
    """key -> {weather, timeofday, scene} of every val image, from ``frames.csv`` beside the val yaml (a missing
    or empty value reads "undefined").

    Written by convert/bdd_to_yolo.py (``split,image,weather,timeofday,scene``; ``image`` relative to its folder).
    A val set without it, or with images it does not list, is an error naming ``flag`` that ends with ``hint``
    (what to do).
    """
    path = conditions_path(val.path)
    hint = hint or (
        "the per weather x time-of-day table needs each val frame's BDD attributes: write the val set with "
        "convert/bdd_to_yolo.py (it writes frames.csv), or pass --skip_conditions to leave that table out"
    )
    if not path.is_file():
        raise UserError(f"{flag}: val set without attributes: {path} not found; {hint}")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CONDITION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{flag}: {path}: missing column(s) {', '.join(missing)}; {hint}")
        by_image = {
            (path.parent / row["image"]).resolve(): {
                k: (row[k] or "undefined").strip() for k in ATTRIBUTE_COLUMNS
            }
            for row in reader
        }
    out, lacking = {}, []
    for item in items:
        cond = by_image.get(item.image)
        if cond is None:
            lacking.append(item.key)
        else:
            out[item.key] = cond
    if lacking:
        raise UserError(
            f"{flag}: {len(lacking)} of {len(items)} val images have no row in {path} (first: {lacking[0]}); {hint}"
        )
    return out


def read_conditions(val: DataYaml, items: Sequence[Item]) -> dict[str, tuple[str, str]]:
    """key -> (weather, timeofday) of every val image (:func:`read_frame_attributes`)."""
    return {k: (a["weather"], a["timeofday"]) for k, a in read_frame_attributes(val, items).items()}


def condition_groups(conditions: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """'weather|timeofday' cells plus 'weather|*' and '*|timeofday' margins -> the val keys in each, sorted."""
    groups: dict[str, list[str]] = {}
    for key, (weather, tod) in sorted(conditions.items()):
        for name in (f"{weather}|{tod}", f"{weather}|{ANY}", f"{ANY}|{tod}"):
            groups.setdefault(name, []).append(key)
    # cells first, then the weather margins, then the time-of-day margins
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].startswith(ANY), kv[0].endswith(ANY), kv[0])))


# ---------------------------------------------------------------------------------------------------------------
# All three sets at once
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The items of the three sets, and each val frame's (weather, timeofday) unless conditions are skipped."""

    real: list[Item]
    synthetic: list[Item]
    val: list[Item]
    conditions: dict[str, tuple[str, str]] | None
    synthetic_yaml: DataYaml | None = None  # where stage 4's records of the synthetic images are (leaks.py)


def load_inputs(
    real: Path, synthetic: Path, val: Path, synthetic_splits: Sequence[str], *, skip_conditions: bool
) -> Inputs:
    """Read the real train split, the synthetic ``synthetic_splits`` and the val split; refuse empty sets; read
    the val frames' conditions (unless ``skip_conditions``). Val leaks are :mod:`annotation.gain.leaks`' check."""
    real_yaml = load_data_yaml(real, "--real")
    syn_yaml = load_data_yaml(synthetic, "--synthetic")
    val_yaml = load_data_yaml(val, "--val")
    real_items = split_items(real_yaml, "train")
    if not real_items:
        raise UserError(f"--real: {real}'s train split lists no images")
    by_image: dict[Path, Item] = {}  # by image: a data.yaml whose val is its train lists each image once
    for split in synthetic_splits:
        for item in split_items(syn_yaml, split):
            by_image.setdefault(item.image, item)
    syn_items = sorted(by_image.values(), key=lambda i: i.key)
    if not syn_items:
        raise UserError(
            f"--synthetic: the synthetic set is empty: {synthetic}'s {','.join(synthetic_splits)} split(s) list "
            "no images (did stage 4 accept any? see its summary.json)"
        )
    val_items = split_items(val_yaml, "val")
    if not val_items:
        raise UserError(f"--val: {val}'s val split lists no images")
    conditions = None if skip_conditions else read_conditions(val_yaml, val_items)
    return Inputs(real_items, syn_items, val_items, conditions, syn_yaml)
