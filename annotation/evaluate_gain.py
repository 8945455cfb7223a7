"""Does synthetic data help a detector? Real-only vs real + synthetic, at the same number of training iterations.

Trains the same YOLO model on the real training frames alone (share 0 %) and on real + synthetic mixes (a sweep of
synthetic shares, as a percentage of the real count), over several seeds, evaluates every model on the real
validation frames and reports mAP50-95 and mAP50 as mean ± spread over seeds: overall, per class and per weather ×
time of day (the val frames' BDD attributes).

Usage::

    python annotation/evaluate_gain.py --real data/real/data.yaml --synthetic annotated/controlnet/data.yaml \\
        --val data/real/data.yaml --out eval/gain [--shares 0,25,50,100] [--seeds 0,1,2] \\
        [--epochs 50 | --iterations 20000] [--max_real 2000] [--model yolov8n.yaml] [--imgsz 640] [--batch 16]

The equal-iteration rule (why: many published gains vanish once the real-only baseline trains as long as the mix;
Dream4Drive). Every arm trains ``E`` epochs over a training list of the same length ``M = nb * batch`` entries,
written as an ultralytics image-list .txt file, so every arm runs exactly ``E * nb`` iterations and sees
``E * M`` images. ``nb = ceil(largest arm / batch)``: the largest mix sees each of its images once per epoch,
smaller arms repeat theirs (each image ``floor(M / n)`` or one more time; the extra copies are a seeded draw), the
real-only arm most of all. The real images are the same in every arm of a seed (``--max_real N``: a seeded draw of
N frames, the same for every share); a share's synthetic images are a seeded draw that contains every smaller
share's. ``--iterations N`` picks ``E`` as the largest divisor of N whose ``nb = N / E`` still covers the largest
arm, so the count is exact. The script counts the iterations ultralytics runs and refuses a run that differs.

Outputs in ``--out``: ``gain.csv`` (one row per share and seed), ``gain.md`` (tables), ``gain.png`` (mAP vs share),
``gain.json`` (the same, machine-readable), ``gain_settings.json`` (what every row depends on) and
``runs/share<p>_seed<s>/`` (training list, ultralytics run, ``result.json``). A rerun keeps every finished run
(``result.json`` under the same settings key) and retrains an unfinished one from scratch; other settings in the
same ``--out`` are refused, never mixed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.cli import UserError, run_main, setup_logging
from core.io import atomic_write_bytes, atomic_write_text
from vocab import bdd

log = logging.getLogger("bdd-sdxl.gain")

SETTINGS_FILE = "gain_settings.json"
RESULT_FILE = "result.json"
SETTINGS_VERSION = 1
#: ultralytics validates at the end of every training by design; it gets this many val images (not our figures)
PROBE_VAL_IMAGES = 16
#: per-condition cells and margins: "weather|timeofday", "weather|*", "*|timeofday"
ANY = "*"
#: ultralytics training arguments --train_args may set (everything else is fixed by this script or by the rule)
TRAIN_ARGS_ALLOWED = frozenset((
    "optimizer", "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
    "box", "cls", "dfl", "nbs", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
    "flipud", "fliplr", "bgr", "mosaic", "mixup", "cutmix", "copy_paste", "copy_paste_mode", "auto_augment",
    "erasing", "close_mosaic", "cos_lr", "amp", "cache", "dropout", "freeze", "multi_scale", "pretrained",
    "save_period", "channels_last",
))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Data yamls, images and labels
# ---------------------------------------------------------------------------------------------------------------


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


def _image_formats() -> frozenset[str]:
    from ultralytics.data.utils import IMG_FORMATS

    return frozenset(IMG_FORMATS)


def split_items(spec: DataYaml, split: str) -> list[Item]:
    """The images of ``split`` (a folder, an image-list .txt or a list of them, as ultralytics reads them), by key."""
    from ultralytics.data.utils import img2label_paths

    value = spec.data.get(split)
    if value is None:
        raise UserError(f"{spec.flag}: {spec.path} has no '{split}' key")
    formats = _image_formats()
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
    """What a data set's rows depend on: image keys and sizes, label contents (not image bytes: too slow at 100k)."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.key}\0{item.image.stat().st_size}\0".encode())
        h.update(item.label.read_bytes() if item.label.is_file() else b"<no label>")
        h.update(b"\0")
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------------
# Val conditions (frames.csv beside the val yaml)
# ---------------------------------------------------------------------------------------------------------------

CONDITION_COLUMNS = ("split", "image", "weather", "timeofday", "scene")


def read_conditions(val: DataYaml, items: Sequence[Item]) -> dict[str, tuple[str, str]]:
    """key -> (weather, timeofday) of every val image, from ``frames.csv`` beside the val yaml.

    Written by convert/bdd_to_yolo.py (``split,image,weather,timeofday,scene``; ``image`` relative to its folder).
    A val set without it, or with images it does not list, is an error that says how to get one.
    """
    path = val.path.parent / "frames.csv"
    hint = (
        "the per weather x time-of-day table needs each val frame's BDD attributes: write the val set with "
        "convert/bdd_to_yolo.py (it writes frames.csv), or pass --skip_conditions to leave that table out"
    )
    if not path.is_file():
        raise UserError(f"--val: val set without attributes: {path} not found; {hint}")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CONDITION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"--val: {path}: missing column(s) {', '.join(missing)}; {hint}")
        by_image = {
            (path.parent / row["image"]).resolve(): (
                (row["weather"] or "undefined").strip(),
                (row["timeofday"] or "undefined").strip(),
            )
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
            f"--val: {len(lacking)} of {len(items)} val images have no row in {path} (first: {lacking[0]}); {hint}"
        )
    return out


def condition_groups(conditions: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """'weather|timeofday' cells plus 'weather|*' and '*|timeofday' margins -> the val keys in each, sorted."""
    groups: dict[str, list[str]] = {}
    for key, (weather, tod) in sorted(conditions.items()):
        for name in (f"{weather}|{tod}", f"{weather}|{ANY}", f"{ANY}|{tod}"):
            groups.setdefault(name, []).append(key)
    # cells first, then the weather margins, then the time-of-day margins
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].startswith(ANY), kv[0].endswith(ANY), kv[0])))


# ---------------------------------------------------------------------------------------------------------------
# The plan: arms, the equal-iteration schedule, training lists
# ---------------------------------------------------------------------------------------------------------------


def ranked(keys: Iterable[str], seed: int, salt: str) -> list[str]:
    """``keys`` in a seeded pseudo-random order (hash of seed, salt and key): stable, independent of list order."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{salt}:{k}".encode()).digest())


def synthetic_count(share: float, n_real: int) -> int:
    """Synthetic images of a ``share`` % arm: share/100 of the real count, rounded half up."""
    return math.floor(share / 100 * n_real + 0.5)


@dataclass(frozen=True)
class Arm:
    share: float
    seed: int
    real: tuple[Item, ...]
    synthetic: tuple[Item, ...]

    @property
    def name(self) -> str:
        return f"share{self.share:g}_seed{self.seed}"

    @property
    def images(self) -> tuple[Item, ...]:
        return self.real + self.synthetic


def plan_arms(
    real: Sequence[Item], synthetic: Sequence[Item], shares: Sequence[float], seed: int, max_real: int | None
) -> list[Arm]:
    """One arm per share for ``seed``: the same real images in each (all, or a seeded draw of ``max_real``), and a
    seeded draw of synthetic images per share that contains every smaller share's draw."""
    by_key = {i.key: i for i in real}
    keys = sorted(by_key)
    if max_real is not None:
        if max_real > len(keys):
            raise UserError(f"--max_real {max_real}: the real train split has only {len(keys)} images")
        keys = sorted(ranked(keys, seed, "real")[:max_real])
    real_used = tuple(by_key[k] for k in keys)
    syn_by_key = {i.key: i for i in synthetic}
    syn_order = ranked(syn_by_key, seed, "synthetic")
    arms = []
    for share in shares:
        n = synthetic_count(share, len(real_used))
        if share > 0 and n == 0:
            raise UserError(
                f"--shares {share:g}: {share:g} % of {len(real_used)} real images is 0 synthetic images; "
                "raise --max_real or the share"
            )
        if n > len(syn_order):
            raise UserError(
                f"--shares {share:g}: {share:g} % of {len(real_used)} real images needs {n} synthetic images, "
                f"the synthetic set has {len(syn_order)}; lower the share or --max_real, or generate more"
            )
        chosen = tuple(syn_by_key[k] for k in sorted(syn_order[:n]))
        arms.append(Arm(share, seed, real_used, chosen))
    return arms


@dataclass(frozen=True)
class Schedule:
    """Every arm: ``epochs`` passes over a list of ``batches_per_epoch * batch`` entries."""

    epochs: int
    batches_per_epoch: int
    batch: int

    @property
    def list_length(self) -> int:
        return self.batches_per_epoch * self.batch

    @property
    def iterations(self) -> int:
        return self.epochs * self.batches_per_epoch

    @property
    def images_seen(self) -> int:
        return self.epochs * self.list_length


def plan_schedule(
    largest_arm: int, batch: int, epochs: int | None = None, iterations: int | None = None
) -> Schedule:
    """The schedule every arm shares: ``nb = ceil(largest_arm / batch)`` batches per epoch (full batches only);
    with ``iterations`` N, E is the largest divisor of N with N / E >= that nb (E = 1 when N is smaller)."""
    if largest_arm < 1 or batch < 1:
        raise ValueError("largest_arm and batch must be positive")
    nb = math.ceil(largest_arm / batch)
    if iterations is None:
        return Schedule(int(epochs or 1), nb, batch)
    fits = [e for e in range(1, iterations + 1) if iterations % e == 0 and iterations // e >= nb]
    e = max(fits) if fits else 1
    return Schedule(e, iterations // e, batch)


def epoch_list(arm: Arm, length: int) -> list[Item]:
    """The arm's training list of ``length`` entries: each image ``length // n`` times, plus one more copy of a
    seeded draw of ``length % n`` images (so counts differ by at most one); sorted by key as ultralytics sorts."""
    images = {i.key: i for i in arm.images}
    q, r = divmod(length, len(images))
    extra = set(ranked(images, arm.seed, f"extra{arm.share:g}")[:r])
    return [images[k] for k in sorted(images) for _ in range(q + (k in extra))]


# ---------------------------------------------------------------------------------------------------------------
# Spread over seeds
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (n - 1; None for one value), min and max of one figure over seeds."""

    n: int
    mean: float
    std: float | None
    min: float
    max: float


def spread(values: Iterable[float | None]) -> Spread | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Spread(len(vals), statistics.fmean(vals), std, min(vals), max(vals))


def paired_gain(rows: Sequence[dict[str, Any]], share: float, field: str = "map") -> Spread | None:
    """Spread over seeds of (share's figure - 0 %'s figure) at the same seed (same init and real images)."""
    base = {r["seed"]: r[field] for r in rows if r["share"] == 0 and r[field] is not None}
    return spread(
        r[field] - base[r["seed"]]
        for r in rows
        if r["share"] == share and r["seed"] in base and r[field] is not None
    )


# ---------------------------------------------------------------------------------------------------------------
# One run: training list, ultralytics training, evaluation on the real val frames
# ---------------------------------------------------------------------------------------------------------------


def link(src: Path, dest: Path) -> None:
    """A symlink to ``src`` (hard link or copy where symlinks are not allowed)."""
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        os.symlink(src, dest)
    except OSError:
        from annotation.dataset import place_image

        place_image(src, dest, "hardlink")


def write_run_data(run_dir: Path, arm: Arm, length: int, probe: Sequence[Item]) -> tuple[Path, list[Path]]:
    """The run's ultralytics dataset: links to the arm's images, copies of their labels, the training list (with
    repetitions) and a small val probe; returns data.yaml and the list's paths.

    Links live in the run folder so ultralytics' label cache lands there, not in the user's data sets.
    """
    data = run_dir / "data"
    entries: list[Path] = []
    names: dict[str, Path] = {}
    for split, items, tag in (
        ("train", arm.real, "r"),
        ("train", arm.synthetic, "s"),
        ("val", tuple(probe), "v"),
    ):
        (data / "images" / split).mkdir(parents=True, exist_ok=True)
        (data / "labels" / split).mkdir(parents=True, exist_ok=True)
        for item in items:
            stem = f"{tag}__{Path(item.key).with_suffix('').as_posix().replace('/', '__')}"
            image = data / "images" / split / f"{stem}{item.image.suffix.lower()}"
            link(item.image, image)
            text = item.label.read_text(encoding="utf-8") if item.label.is_file() else ""
            atomic_write_text(data / "labels" / split / f"{stem}.txt", text)
            if split == "train":
                names[item.key] = image
    counts: dict[str, int] = {}
    for item in epoch_list(arm, length):
        entries.append(names[item.key])
        counts[item.key] = counts.get(item.key, 0) + 1
    atomic_write_text(data / "train.txt", "".join(f"{p}\n" for p in entries))
    atomic_write_text(
        data / "val_probe.txt", "".join(f"{p}\n" for p in sorted((data / "images" / "val").iterdir()))
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["source", "kind", "copies_per_epoch"])
    for kind, kind_items in (("real", arm.real), ("synthetic", arm.synthetic)):
        for item in kind_items:
            writer.writerow([str(item.image), kind, counts.get(item.key, 0)])
    atomic_write_text(run_dir / "composition.csv", buf.getvalue())
    names_yaml = {"path": str(data.resolve()), "train": "train.txt", "val": "val_probe.txt"}
    names_yaml["names"] = dict(enumerate(bdd.DET_CLASSES))
    data_yaml = data / "data.yaml"
    atomic_write_text(data_yaml, yaml.safe_dump(names_yaml, sort_keys=False))
    return data_yaml, entries


@dataclass
class TrainResult:
    weights: Path
    iterations: int
    list_entries: int
    batch: int
    seconds: float


def train_run(
    run_dir: Path,
    data_yaml: Path,
    model_spec: str,
    schedule: Schedule,
    seed: int,
    *,
    imgsz: int,
    device: str,
    workers: int,
    train_args: dict[str, Any],
    progress: bool = True,
) -> TrainResult:
    """Train ``model_spec`` on the run's list with ultralytics' trainer: seeded, deterministic, no early stop.

    Counts the iterations ultralytics runs and checks that it kept every list entry (it drops unreadable images
    and broken labels, which would break the equal-iteration rule).
    """
    from tqdm import tqdm

    from annotation.yolo_runtime import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    spec = Path(model_spec).expanduser()
    model = YOLO(str(spec.resolve()) if spec.is_file() else model_spec)
    seen = {"batches": 0, "entries": None, "batch": None}

    def check_dataset(trainer) -> None:
        dataset = trainer.train_loader.dataset
        seen["entries"] = len(dataset)
        if len(dataset) != schedule.list_length:
            listed = (data_yaml.parent / "train.txt").read_text(encoding="utf-8").split()
            kept = {str(Path(p)) for p in dataset.im_files}
            dropped = sorted({p for p in listed if str(Path(p)) not in kept})
            raise UserError(
                f"ultralytics kept {len(dataset)} of the {schedule.list_length} training list entries (it drops "
                f"unreadable images and broken labels), so this arm would train fewer iterations; fix or remove "
                f"{len(dropped)} image(s), first: {dropped[:3]} (links to the source images in {data_yaml.parent})"
            )

    bar = tqdm(total=schedule.epochs, desc="  training", unit="epoch", disable=not progress, leave=False)

    def count_batch(trainer) -> None:
        seen["batches"] += 1
        seen["batch"] = trainer.batch_size

    model.add_callback("on_pretrain_routine_end", check_dataset)
    model.add_callback("on_train_batch_end", count_batch)
    model.add_callback("on_train_epoch_end", lambda trainer: bar.update())
    t0 = time.perf_counter()
    try:
        model.train(
            **{
                **train_args,
                "data": str(data_yaml),
                "epochs": schedule.epochs,
                "batch": schedule.batch,
                "imgsz": imgsz,
                "device": device,
                "workers": workers,
                "seed": seed,
                "deterministic": True,
                "patience": 0,  # no early stop: every arm trains its full budget
                "val": False,  # ultralytics still validates once at the end, on the small val probe
                "plots": False,
                "project": str((run_dir / "ultralytics").resolve()),
                "name": "train",
                "exist_ok": True,
                "verbose": False,
            }
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    weights = run_dir / "ultralytics" / "train" / "weights" / "last.pt"
    if not weights.is_file():
        raise RuntimeError(f"ultralytics finished without writing {weights}")
    if seen["batches"] != schedule.iterations or seen["batch"] != schedule.batch:
        raise UserError(
            f"{run_dir.name}: ultralytics ran {seen['batches']} iterations at batch {seen['batch']}, the rule says "
            f"{schedule.iterations} at batch {schedule.batch} (a CUDA out-of-memory retry halves the batch; NaN "
            "recovery repeats an epoch): rerun with a --batch that fits; this run is not kept"
        )
    return TrainResult(weights, seen["batches"], int(seen["entries"] or 0), int(seen["batch"]), seconds)


@dataclass
class ValSet:
    items: list[Item]
    truths: dict[str, Any]  # key -> metrics.Boxes
    groups: dict[str, list[str]] | None  # condition -> keys (None: --skip_conditions)


def load_val_truths(items: Sequence[Item]) -> dict[str, Any]:
    """key -> ground-truth Boxes in the pixels of each val image."""
    from PIL import Image

    from annotation.metrics import read_yolo_labels

    truths = {}
    for item in items:
        try:
            with Image.open(item.image) as im:
                width, height = im.size
            truths[item.key] = read_yolo_labels(item.label, width, height)
        except ValueError as exc:  # a broken label line or an unreadable image
            raise UserError(f"--val: {exc}") from None
        except OSError as exc:
            raise UserError(f"--val: cannot read val image {item.image}: {exc}") from None
    return truths


def evaluate_run(
    weights: Path, val: ValSet, work: Path, *, imgsz: int, batch: int, device: str
) -> dict[str, Any]:
    """COCO mAP of the trained model on the real val frames: overall, per class, per size, per condition."""
    from annotation.metrics import detection_map, predict_boxes

    by_path = {i.image: i.key for i in val.items}
    preds = predict_boxes(
        weights,
        [i.image for i in val.items],
        work / "val_images.txt",
        imgsz=imgsz,
        batch=batch,
        device=device,
    )
    missing = [i.key for i in val.items if i.image not in preds]
    if missing:
        raise UserError(f"--val: ultralytics could not read {len(missing)} val image(s), first: {missing[0]}")
    predictions = {by_path[p]: boxes for p, boxes in preds.items()}
    metrics = detection_map(predictions, val.truths, bdd.DET_CLASSES)
    metrics["per_condition"] = {}
    for group, keys in (val.groups or {}).items():
        m = detection_map(predictions, val.truths, bdd.DET_CLASSES, keys=keys)
        metrics["per_condition"][group] = {k: m[k] for k in ("images", "gt_boxes", "map", "map50")}
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Settings key and resume
# ---------------------------------------------------------------------------------------------------------------


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(out: Path, settings: dict[str, Any]) -> str:
    """The key of ``settings``; refuses an ``--out`` that holds rows made under other settings."""
    key = settings_key(settings)
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path} is damaged; move {out} away to start over") from None
        if previous.get("key") != key:
            old = previous.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:6])
            raise UserError(
                f"{out} holds gain runs made under other settings ({shown}); rows of different settings must "
                "not mix: use another --out (or move this one away to start over)"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            path, json.dumps({"key": key, "settings": settings}, indent=2, sort_keys=True) + "\n"
        )
    return key


def finished_result(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The run's result when it finished under ``key`` (result.json is written last, atomically)."""
    try:
        result = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if result.get("key") == key else None


class RunLock:
    """An exclusive lock on a run folder, so two processes sharing ``--out`` never train the same run."""

    def __init__(self, path: Path):
        self.path, self.fh = path, None

    def acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.path.open("a")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            return False
        return True

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


# ---------------------------------------------------------------------------------------------------------------
# Reports: gain.csv, gain.md, gain.json, gain.png
# ---------------------------------------------------------------------------------------------------------------

CSV_FIXED = [
    "settings_key", "share", "seed", "real_images", "synthetic_images", "list_length", "epochs", "iterations",
    "images_seen", "batch", "imgsz", "model", "device", "train_seconds", "finished_at", "val_images", "map", "map50",
    "map75",
]  # fmt: skip


def csv_row(result: dict[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    row = {k: result.get(k) for k in CSV_FIXED if k not in ("map", "map50", "map75", "val_images")}
    row["settings_key"], row["share"] = result["key"], f"{result['share']:g}"
    row.update(val_images=m["images"], map=m["map"], map50=m["map50"], map75=m["map75"])
    for name, v in m["per_class"].items():
        row[f"map_{name.replace(' ', '_')}"], row[f"map50_{name.replace(' ', '_')}"] = v["map"], v["map50"]
    for size, v in m["per_size"].items():
        row[f"map_{size}"], row[f"map50_{size}"] = v["map"], v["map50"]
    for group, v in m.get("per_condition", {}).items():
        row[f"map@{group}"], row[f"map50@{group}"] = v["map"], v["map50"]
    return row


def write_csv(path: Path, results: Sequence[dict[str, Any]]) -> None:
    rows = [csv_row(r) for r in results]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic_write_text(path, buf.getvalue())


def pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def fmt_spread(s: Spread | None, signed: bool = False) -> str:
    """'31.20 ± 0.40 [30.80, 31.60]' in mAP points (x100); one seed: no ±."""
    if s is None:
        return "–"
    text = pct(s.mean, signed)
    if s.std is not None:
        text += f" ± {s.std * 100:.2f} [{pct(s.min, signed)}, {pct(s.max, signed)}]"
    return text


def fmt_cell(values: list[float | None], base: Spread | None) -> str:
    """'mean ± std' plus the difference of means to the 0 % arm, in points."""
    s = spread(values)
    if s is None:
        return "–"
    text = pct(s.mean) + (f" ± {s.std * 100:.2f}" if s.std is not None else "")
    if base is not None:
        text += f" ({pct(s.mean - base.mean, signed=True)})"
    return text


def summarize(results: Sequence[dict[str, Any]], shares: Sequence[float]) -> dict[str, Any]:
    """Per share: spreads of map/map50 over seeds and the seed-paired gains vs 0 %."""
    out = {}
    flat = [{"share": r["share"], "seed": r["seed"], **r["metrics"]} for r in results]
    for share in shares:
        rows = [r for r in results if r["share"] == share]
        entry = {
            "seeds": sorted(r["seed"] for r in rows),
            "real_images": sorted({r["real_images"] for r in rows}),
            "synthetic_images": sorted({r["synthetic_images"] for r in rows}),
        }
        for field in ("map", "map50"):
            s = spread(r["metrics"][field] for r in rows)
            entry[field] = None if s is None else s.__dict__
            g = paired_gain(flat, share, field) if share != 0 else None
            entry[f"{field}_gain"] = None if g is None else g.__dict__
        out[f"{share:g}"] = entry
    return out


def write_markdown(
    path: Path,
    results: Sequence[dict[str, Any]],
    shares: Sequence[float],
    seeds: Sequence[int],
    settings: dict[str, Any],
    schedule: Schedule,
    missing: Sequence[str],
) -> None:
    by_share = {s: [r for r in results if r["share"] == s] for s in shares}
    flat = [{"share": r["share"], "seed": r["seed"], **r["metrics"]} for r in results]
    lines = [
        "# Gain: real vs real + synthetic at equal iterations",
        "",
        f"Model `{settings['model']}`, imgsz {settings['imgsz']}, batch {schedule.batch}; seeds "
        f"{', '.join(map(str, seeds))}. **Every arm: {schedule.epochs} epoch(s) × {schedule.batches_per_epoch} "
        f"batches = {schedule.iterations} iterations, {schedule.images_seen} images seen** (a training list of "
        f"{schedule.list_length} entries per epoch; smaller arms repeat their images). Figures are COCO mAP × 100 on "
        f"the real val frames ({results[0]['metrics']['images'] if results else 0} images), mean ± sample std "
        "[min, max] over seeds; gains are differences to the 0 % (real-only) arm.",
        "",
    ]
    if missing:
        lines += [f"Not finished (rerun to complete): {', '.join(missing)}.", ""]
    lines += [
        "| synthetic share | real | synthetic | seeds | mAP50-95 | gain (paired by seed) | mAP50 | gain (paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for share, rows in by_share.items():
        if not rows:
            lines.append(f"| {share:g} % | – | – | 0 | – | – | – | – |")
            continue
        real = "/".join(str(v) for v in sorted({r["real_images"] for r in rows}))
        syn = "/".join(str(v) for v in sorted({r["synthetic_images"] for r in rows}))
        cells = []
        for field in ("map", "map50"):
            cells.append(fmt_spread(spread(r["metrics"][field] for r in rows)))
            cells.append(
                "(baseline)" if share == 0 else fmt_spread(paired_gain(flat, share, field), signed=True)
            )
        lines.append(f"| {share:g} % | {real} | {syn} | {len(rows)} | {' | '.join(cells)} |")

    def table(title: str, labels: list[tuple[str, str, int]], getter) -> list[str]:
        head = "| " + title + " | val boxes | " + " | ".join(f"{s:g} %" for s in shares) + " |"
        out = [head, "|" + "---|" * (len(shares) + 2)]
        for label, key, count in labels:
            b = spread(getter(r, key) for r in by_share.get(0, []))
            cells = [
                fmt_cell([getter(r, key) for r in rows], None if s == 0 else b)
                for s, rows in by_share.items()
            ]
            out.append(f"| {label} | {count} | " + " | ".join(cells) + " |")
        return out

    if results:
        m0 = results[0]["metrics"]
        classes = [(n, n, v["gt_boxes"]) for n, v in m0["per_class"].items() if v["gt_boxes"]]
        lines += ["", "## Per class (mAP50-95 × 100, mean ± std; gain vs 0 % in brackets)", ""]
        lines += table("class", classes, lambda r, k: r["metrics"]["per_class"][k]["map"])
        lines += ["", "## Per class, mAP50", ""]
        lines += table("class", classes, lambda r, k: r["metrics"]["per_class"][k]["map50"])
        groups = m0.get("per_condition") or {}
        if groups:
            labels = [
                (g.replace("|", " / ").replace(ANY, "all"), g, v["gt_boxes"]) for g, v in groups.items()
            ]
            lines += ["", "## Per weather / time of day (mAP50-95 × 100; cells, then margins)", ""]
            lines += table(
                "weather / time of day", labels, lambda r, k: r["metrics"]["per_condition"][k]["map"]
            )
            lines += ["", "## Per weather / time of day, mAP50", ""]
            lines += table(
                "weather / time of day", labels, lambda r, k: r["metrics"]["per_condition"][k]["map50"]
            )
        else:
            lines += [
                "",
                "Per weather / time of day: skipped (--skip_conditions: the val set has no attributes).",
            ]
    lines += [
        "",
        "## Reading it",
        "",
        "A gain is only evidence when it is larger than the spread over seeds (and the paired gain keeps its sign "
        "on every seed). A zero or negative gain means the synthetic images did not teach the detector anything "
        "the real frames at the same number of iterations did not: expected when the generations are unrealistic "
        "or their labels wrong (check the fidelity report), or when the real data already suffices (try "
        "--max_real for the low-data regime). A toy model on a few images gives noise, not a finding.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def write_plot(path: Path, results: Sequence[dict[str, Any]], shares: Sequence[float]) -> None:
    """mAP50-95 and mAP50 vs synthetic share: mean with std error bars, every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, field, title in zip(axes, ("map", "map50"), ("mAP50-95", "mAP50"), strict=True):
        xs, means, stds = [], [], []
        for share in shares:
            vals = [
                r["metrics"][field]
                for r in results
                if r["share"] == share and r["metrics"][field] is not None
            ]
            if not vals:
                continue
            s = spread(vals)
            xs.append(share)
            means.append(s.mean * 100)
            stds.append((s.std or 0.0) * 100)
            ax.scatter([share] * len(vals), [v * 100 for v in vals], s=12, color="0.6", zorder=2)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=4, zorder=3, label="mean ± std over seeds")
        ax.set_xlabel("synthetic share (% of the real count)")
        ax.set_ylabel(f"{title} × 100 (real val)")
        ax.set_title(f"{title} at equal iterations")
        ax.set_xticks(list(shares))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

EXAMPLE = """example (GPU host, real BDD100K, 3 seeds, 4 arms; about 12 trainings):
  python convert/bdd_to_yolo.py --bdd_data_dir $BDD_DATA_DIR --split train --out data/real
  python convert/bdd_to_yolo.py --bdd_data_dir $BDD_DATA_DIR --split val --out data/real
  python annotation/evaluate_gain.py --real data/real/data.yaml --val data/real/data.yaml \\
      --synthetic annotated/controlnet/data.yaml --out eval/gain --shares 0,25,50,100 --seeds 0,1,2 \\
      --epochs 50 --max_real 5000 --model yolov8n.yaml --imgsz 640 --batch 32 --device 0
  -> eval/gain/gain.md (tables), gain.png (plot), gain.csv (one row per share and seed)
"""


def parse_list(text: str, flag: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag}: empty list")
    if len(set(values)) != len(values):
        raise UserError(f"{flag}: repeated value in {text!r}")
    return values


def parse_train_args(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in TRAIN_ARGS_ALLOWED:
            raise UserError(
                f"--train_args: {part.strip()!r} is not KEY=VALUE with one of the training hyperparameters this "
                f"script leaves open ({', '.join(sorted(TRAIN_ARGS_ALLOWED))}); epochs, batch, imgsz, seed, data "
                "and the like are set by the equal-iteration rule or their own flags"
            )
        out[key] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the same YOLO model on real-only and real + synthetic mixes at the same number of "
        "iterations, over several seeds; report mAP on the real val frames as mean ± spread (overall, per class, "
        "per weather x time of day). Offline; reruns keep finished runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    p.add_argument(
        "--real", required=True, type=Path, help="YOLO data yaml of the real frames (its train split)"
    )
    p.add_argument(
        "--synthetic",
        required=True,
        type=Path,
        help="YOLO data yaml of the synthetic set (stage 4's data.yaml)",
    )
    p.add_argument(
        "--val",
        required=True,
        type=Path,
        help="YOLO data yaml of the real val frames (its val split; frames.csv beside it)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (tables, plot, runs)")
    p.add_argument(
        "--shares", default="0,25,50,100", help="synthetic shares in %% of the real count; must include 0"
    )
    p.add_argument("--seeds", default="0,1,2", help="seeds (data draws, model init, ultralytics seed)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs of every arm (default 50)")
    budget.add_argument("--iterations", type=int, default=None, help="exact iterations of every arm instead")
    p.add_argument(
        "--max_real", type=int, default=None, help="use a seeded draw of N real frames (low-data regime)"
    )
    p.add_argument(
        "--model", default="yolov8n.yaml", help="architecture yaml (random init, no download) or a local .pt"
    )
    p.add_argument("--imgsz", type=int, default=640, help="training and evaluation size (multiple of 32)")
    p.add_argument("--batch", type=int, default=16, help="images per iteration (the same for every arm)")
    p.add_argument("--device", default="", help="'' (auto), cpu, or one GPU id such as 0")
    p.add_argument("--workers", type=int, default=8, help="dataloader workers (ultralytics uses 0 on CPU)")
    p.add_argument(
        "--synthetic_splits", default="train,val", help="splits of --synthetic to draw synthetic images from"
    )
    p.add_argument(
        "--train_args", default=None, help="more ultralytics training arguments: 'lr0=0.01,mosaic=0'"
    )
    p.add_argument(
        "--skip_conditions",
        action="store_true",
        help="val set without frames.csv: leave out the condition table",
    )
    p.add_argument("--log_level", default=None, help="DEBUG, INFO, WARNING")
    return p


def fail_early(args: argparse.Namespace) -> tuple[list[float], list[int]]:
    shares = parse_list(args.shares, "--shares", float)
    if any(s < 0 or not math.isfinite(s) for s in shares):
        raise UserError(
            f"--shares must be percentages >= 0 (0 = real only, 100 = as many synthetic as real), got {args.shares}"
        )
    if 0 not in shares:
        raise UserError(
            f"--shares must include 0, the real-only baseline every gain is measured against (got {args.shares})"
        )
    seeds = parse_list(args.seeds, "--seeds", int)
    for flag in ("epochs", "iterations", "max_real", "batch", "imgsz"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if args.imgsz % 32:
        raise UserError(f"--imgsz must be a multiple of 32 (YOLO's largest stride), got {args.imgsz}")
    if "," in str(args.device):
        raise UserError(
            f"--device takes one device, got {args.device!r}: ultralytics' multi-GPU mode runs the training in "
            "child processes where this script cannot count iterations; run one process per GPU with different "
            "--seeds into the same --out instead"
        )
    return sorted(shares), seeds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    shares, seeds = fail_early(args)
    train_args = parse_train_args(args.train_args)
    out = args.out

    # --- offline ultralytics, the model ----------------------------------------------------------------------
    from annotation import yolo_runtime

    yolo_runtime.prepare_offline(out / ".ultralytics")
    yolo_runtime.check_model_spec(args.model)  # a missing .pt: a clear error before anything is read
    model_fingerprint = yolo_runtime.load_model(args.model).fingerprint

    # --- data: real train, synthetic, real val (+ attributes) -------------------------------------------------
    real_yaml = load_data_yaml(args.real, "--real")
    syn_yaml = load_data_yaml(args.synthetic, "--synthetic")
    val_yaml = load_data_yaml(args.val, "--val")
    real = split_items(real_yaml, "train")
    if not real:
        raise UserError(f"--real: {args.real}'s train split lists no images")
    synthetic: dict[Path, Item] = {}  # by image: a data.yaml whose val is its train lists each image once
    for split in [s.strip() for s in args.synthetic_splits.split(",") if s.strip()]:
        for item in split_items(syn_yaml, split):
            synthetic.setdefault(item.image, item)
    syn_items = sorted(synthetic.values(), key=lambda i: i.key)
    if not syn_items:
        raise UserError(
            f"--synthetic: the synthetic set is empty: {args.synthetic}'s {args.synthetic_splits} split(s) list no "
            "images (did stage 4 accept any? see its summary.json)"
        )
    val_items = split_items(val_yaml, "val")
    if not val_items:
        raise UserError(f"--val: {args.val}'s val split lists no images")
    leaked = sorted({i.image for i in real} & {i.image for i in val_items})
    if leaked:
        raise UserError(
            f"--real and --val share {len(leaked)} image(s) (first: {leaked[0]}): the real train split must not "
            "contain val frames"
        )
    conditions = None if args.skip_conditions else read_conditions(val_yaml, val_items)

    # --- the plan: arms per seed, one schedule for all --------------------------------------------------------
    plans = {seed: plan_arms(real, syn_items, shares, seed, args.max_real) for seed in seeds}
    largest = max(len(a.images) for arms in plans.values() for a in arms)
    schedule = plan_schedule(
        largest, args.batch, args.epochs or (None if args.iterations else 50), args.iterations
    )
    settings = {
        "version": SETTINGS_VERSION,
        "model": args.model,
        "model_fingerprint": model_fingerprint,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "epochs": schedule.epochs,
        "batches_per_epoch": schedule.batches_per_epoch,
        "max_real": args.max_real,
        "synthetic_splits": args.synthetic_splits,
        "train_args": train_args,
        "real": fingerprint(real),
        "synthetic": fingerprint(syn_items),
        "val": fingerprint(val_items),
        "conditions": None
        if args.skip_conditions
        else hashlib.sha256((args.val.parent / "frames.csv").read_bytes()).hexdigest()[:20],
        "ultralytics": importlib.metadata.version("ultralytics"),
        "torchmetrics": importlib.metadata.version("torchmetrics"),
    }
    key = check_settings(out, settings)
    print(
        f"gain: {len(real)} real train images{f' (using {args.max_real} per seed)' if args.max_real else ''}, "
        f"{len(syn_items)} synthetic, {len(val_items)} real val images"
        + (f" in {len({c for c in conditions.values()})} weather x time-of-day cells" if conditions else "")
    )
    print(
        f"gain: shares {', '.join(f'{s:g} %' for s in shares)} x seeds {', '.join(map(str, seeds))}; every arm "
        f"{schedule.epochs} epochs x {schedule.batches_per_epoch} batches of {schedule.batch} = "
        f"{schedule.iterations} iterations ({schedule.images_seen} images seen); settings key {key}",
        flush=True,
    )

    # --- the runs ---------------------------------------------------------------------------------------------
    val = ValSet(val_items, {}, condition_groups(conditions) if conditions else None)
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    total = sum(len(a) for a in plans.values())
    n = 0
    for seed in seeds:
        for arm in plans[seed]:
            n += 1
            run_dir = out / "runs" / arm.name
            label = f"[{n}/{total}] {arm.share:g} % synthetic, seed {seed}"
            done = finished_result(run_dir, key)
            if done is not None:
                print(
                    f"{label}: kept (finished {done['finished_at']}): mAP50-95 {pct(done['metrics']['map'])}"
                )
                results.append(done)
                continue
            lock = RunLock(out / "runs" / f".{arm.name}.lock")
            if not lock.acquire():
                print(f"{label}: skipped, another process is training it (rerun later to collect it)")
                missing.append(arm.name)
                continue
            try:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an unfinished run restarts clean (see README: why not resume)
                run_dir.mkdir(parents=True)
                print(
                    f"{label}: training on {len(arm.real)} real + {len(arm.synthetic)} synthetic images "
                    f"({schedule.list_length} list entries per epoch)",
                    flush=True,
                )
                data_yaml, _ = write_run_data(
                    run_dir, arm, schedule.list_length, val_items[:PROBE_VAL_IMAGES]
                )
                trained = train_run(
                    run_dir, data_yaml, args.model, schedule, seed, imgsz=args.imgsz, device=args.device,
                    workers=args.workers, train_args=train_args,
                )  # fmt: skip
                if not val.truths:
                    val.truths = load_val_truths(val_items)
                t0 = time.perf_counter()
                metrics = evaluate_run(
                    trained.weights, val, run_dir, imgsz=args.imgsz, batch=args.batch, device=args.device
                )
                result = {
                    "key": key,
                    "share": arm.share,
                    "seed": seed,
                    "real_images": len(arm.real),
                    "synthetic_images": len(arm.synthetic),
                    "list_length": trained.list_entries,
                    "epochs": schedule.epochs,
                    "iterations": trained.iterations,
                    "images_seen": trained.iterations * trained.batch,
                    "batch": trained.batch,
                    "imgsz": args.imgsz,
                    "model": args.model,
                    "device": args.device or "auto",
                    "train_seconds": round(trained.seconds, 1),
                    "eval_seconds": round(time.perf_counter() - t0, 1),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "weights": str(trained.weights.relative_to(out)),
                    "metrics": metrics,
                }
                atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
            finally:
                lock.release()
            print(
                f"{label}: done in {result['train_seconds']:.0f} s: mAP50-95 {pct(metrics['map'])}, "
                f"mAP50 {pct(metrics['map50'])}",
                flush=True,
            )
            results.append(result)

    # --- reports ----------------------------------------------------------------------------------------------
    results.sort(key=lambda r: (r["share"], r["seed"]))
    write_csv(out / "gain.csv", results)
    write_markdown(out / "gain.md", results, shares, seeds, settings, schedule, missing)
    summary = summarize(results, shares)
    atomic_write_text(
        out / "gain.json",
        json.dumps({"key": key, "settings": settings, "summary": summary, "runs": results}, indent=2) + "\n",
    )
    if results:
        write_plot(out / "gain.png", results, shares)
    print_summary(out, summary, shares, missing)
    return 0


def print_summary(
    out: Path, summary: dict[str, Any], shares: Sequence[float], missing: Sequence[str]
) -> None:
    print(
        "\ngain summary (COCO mAP x 100 on the real val frames; mean ± std over seeds; gain paired by seed):"
    )
    for share in shares:
        e = summary[f"{share:g}"]
        s = None if e["map"] is None else Spread(**e["map"])
        g = None if e.get("map_gain") is None else Spread(**e["map_gain"])
        gain = "baseline" if share == 0 else f"gain {fmt_spread(g, signed=True)}"
        print(f"  {share:>5g} % synthetic: mAP50-95 {fmt_spread(s)}  ({gain}; seeds {e['seeds']})")
    if missing:
        print(f"not finished: {', '.join(missing)} (rerun to complete)")
    print(f"tables: {out / 'gain.md'}; plot: {out / 'gain.png'}; rows: {out / 'gain.csv'}")
    print(
        "a gain counts only if it exceeds the spread over seeds; zero or negative means the synthetic images "
        "added nothing the real frames did not at the same number of iterations"
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
