"""One training run of the gain evaluation, and what makes a sweep resumable.

A run (one share, one seed) gets its own folder ``runs/share<p>_seed<s>/``: links to its images, its training list
(with repetitions), ultralytics' training with a check that it ran exactly the scheduled iterations, the evaluation
on the real val frames and ``result.json``, written last. The settings key says which finished runs a rerun keeps;
a lock keeps two processes sharing ``--out`` off the same run.

ultralytics is imported inside the functions that train or predict, after
:func:`annotation.yolo_runtime.prepare_offline`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from annotation.gain.data import Item
from annotation.gain.design import Arm, Schedule, epoch_list
from core.cli import UserError
from core.io import atomic_write_text, link_or_copy
from vocab import bdd

SETTINGS_FILE = "gain_settings.json"
RESULT_FILE = "result.json"
#: 2: the --iterations rule (whole passes over the largest arm), optimizer steps, the convergence checkpoint
SETTINGS_VERSION = 2
#: a negative control's blank images: mid-grey
BLANK_GREY = (128, 128, 128)
CHECKPOINT_FILE = "checkpoint.pt"
#: ultralytics validates at the end of every training by design; it gets this many val images (not our figures)
PROBE_VAL_IMAGES = 16
#: ultralytics training arguments --train_args may set (everything else is fixed by this script or by the rule)
TRAIN_ARGS_ALLOWED = frozenset((
    "optimizer", "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
    "box", "cls", "dfl", "nbs", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
    "flipud", "fliplr", "bgr", "mosaic", "mixup", "cutmix", "copy_paste", "copy_paste_mode", "auto_augment",
    "erasing", "close_mosaic", "cos_lr", "amp", "cache", "dropout", "freeze", "multi_scale", "pretrained",
    "save_period", "channels_last",
))  # fmt: skip


def ultralytics_defaults() -> dict[str, Any]:
    """ultralytics' default training arguments (its default.yaml), which ``train.args`` overrides."""
    from annotation.yolo_runtime import import_ultralytics

    import_ultralytics()
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return dict(DEFAULT_CFG_DICT)


# ---------------------------------------------------------------------------------------------------------------
# The run's data: links, labels, the training list, a val probe
# ---------------------------------------------------------------------------------------------------------------


def run_folder(out: Path, arm: Arm) -> Path:
    return out / "runs" / arm.name


def blank_image(src: Path, dest: Path) -> None:
    """A mid-grey PNG of ``src``'s size (a negative control's image: the labels stay, the pixels go)."""
    from PIL import Image

    with Image.open(src) as im:
        size = im.size
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, BLANK_GREY).save(dest)


def link(src: Path, dest: Path) -> None:
    """A symlink to ``src`` (hard link or copy where symlinks are not allowed)."""
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        os.symlink(src, dest)
    except OSError:
        link_or_copy(src, dest)


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
        ("train", arm.extra_real, "r"),
        ("train", arm.synthetic, "s"),
        ("val", tuple(probe), "v"),
    ):
        (data / "images" / split).mkdir(parents=True, exist_ok=True)
        (data / "labels" / split).mkdir(parents=True, exist_ok=True)
        for item in items:
            stem = f"{tag}__{Path(item.key).with_suffix('').as_posix().replace('/', '__')}"
            if tag == "s" and arm.spoil == "blank_images":
                image = data / "images" / split / f"{stem}.png"
                blank_image(item.image, image)
            else:
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
    writer.writerow(["source", "kind", "copies_per_epoch", "label"])
    synthetic_kind = f"synthetic ({arm.spoil})" if arm.spoil else "synthetic"
    for kind, kind_items in (
        ("real", arm.real), ("extra real", arm.extra_real), (synthetic_kind, arm.synthetic)
    ):  # fmt: skip
        for item in kind_items:
            writer.writerow([str(item.image), kind, counts.get(item.key, 0), str(item.label)])
    atomic_write_text(run_dir / "composition.csv", buf.getvalue())
    names_yaml = {"path": str(data.resolve()), "train": "train.txt", "val": "val_probe.txt"}
    names_yaml["names"] = dict(enumerate(bdd.DET_CLASSES))
    data_yaml = data / "data.yaml"
    atomic_write_text(data_yaml, yaml.safe_dump(names_yaml, sort_keys=False))
    return data_yaml, entries


# ---------------------------------------------------------------------------------------------------------------
# Training, counted
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    weights: Path
    iterations: int
    list_entries: int
    batch: int
    seconds: float
    optimizer_steps: int = 0
    checkpoint: Path | None = None  # the weights at ``checkpoint_at`` iterations (convergence check)


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
    checkpoint_at: int | None = None,
) -> TrainResult:
    """Train ``model_spec`` on the run's list with ultralytics' trainer: seeded, deterministic, no early stop.

    Counts the iterations and optimizer steps ultralytics runs and checks that it kept every list entry (it drops
    unreadable images and broken labels, which would break the equal-iteration rule). ``checkpoint_at``: also save
    the (EMA) weights after that many iterations, as ``checkpoint.pt`` in the run folder.
    """
    from tqdm import tqdm

    from annotation.yolo_runtime import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    spec = Path(model_spec).expanduser()
    model = YOLO(str(spec.resolve()) if spec.is_file() else model_spec)
    seen = {"batches": 0, "entries": None, "batch": None, "steps": 0}
    checkpoint = run_dir / CHECKPOINT_FILE

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
        step = trainer.optimizer_step

        def counted_step() -> None:  # the trainer's own step, counted
            seen["steps"] += 1
            step()

        trainer.optimizer_step = counted_step

    bar = tqdm(total=schedule.epochs, desc="  training", unit="epoch", disable=not progress, leave=False)

    def count_batch(trainer) -> None:
        seen["batches"] += 1
        seen["batch"] = trainer.batch_size
        if seen["batches"] == checkpoint_at:
            trainer.save_model()  # ultralytics' own checkpoint (EMA weights), overwritten by the final one
            shutil.copyfile(trainer.last, checkpoint)

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
    return TrainResult(
        weights, seen["batches"], int(seen["entries"] or 0), int(seen["batch"]), seconds, seen["steps"],
        checkpoint if checkpoint_at and checkpoint.is_file() else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on the real val frames
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ValSet:
    items: list[Item]
    truths: dict[str, Any]  # key -> metrics.Boxes (loaded when the first run needs them)
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
    from annotation.metrics import detection_maps, predict_boxes

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
    every = "\0all"  # no condition is named so
    subsets = {every: [i.key for i in val.items], **(val.groups or {})}
    scored = detection_maps(
        predictions, val.truths, bdd.DET_CLASSES, subsets
    )  # one COCOeval matching for all
    metrics = scored.pop(every)
    metrics["per_condition"] = {
        group: {k: m[k] for k in ("images", "gt_boxes", "map", "map50")} for group, m in scored.items()
    }
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# One run from scratch: data, training, evaluation, result.json
# ---------------------------------------------------------------------------------------------------------------


def convergence_checkpoint(iterations: int) -> int | None:
    """The iteration the last fifth starts at (None for runs too short to have one)."""
    fifth = round(iterations / 5)
    return iterations - fifth if fifth >= 1 and iterations - fifth >= 1 else None


def train_and_evaluate(
    out: Path,
    arm: Arm,
    schedule: Schedule,
    val: ValSet,
    *,
    key: str,
    model: str,
    imgsz: int,
    batch: int,
    device: str,
    workers: int,
    train_args: dict[str, Any],
    convergence_check: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and score ``arm`` in a clean run folder; its result (also written, last, as result.json).

    ``convergence_check``: also score the weights at the start of the last fifth of the iterations on the same
    val frames (one more evaluation), so the report can say whether the arm's mAP was still rising.
    """
    run_dir = run_folder(out, arm)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run restarts clean (see README: why not resume)
    run_dir.mkdir(parents=True)
    data_yaml, _ = write_run_data(run_dir, arm, schedule.list_length, val.items[:PROBE_VAL_IMAGES])
    checkpoint_at = convergence_checkpoint(schedule.iterations) if convergence_check else None
    trained = train_run(
        run_dir, data_yaml, model, schedule, arm.seed, imgsz=imgsz, device=device, workers=workers,
        train_args=train_args, progress=progress, checkpoint_at=checkpoint_at,
    )  # fmt: skip
    if not val.truths:
        val.truths = load_val_truths(val.items)
    t0 = time.perf_counter()
    metrics = evaluate_run(trained.weights, val, run_dir, imgsz=imgsz, batch=batch, device=device)
    convergence = None
    if trained.checkpoint is not None:
        at = evaluate_run(trained.checkpoint, val, run_dir, imgsz=imgsz, batch=batch, device=device)
        convergence = {"iteration": checkpoint_at, "map": at["map"], "map50": at["map50"]}
        trained.checkpoint.unlink()  # 6 MB to 100 MB per run; its figures are kept
    result = {
        "key": key,
        "arm": arm.arm,
        "share": arm.share,
        "seed": arm.seed,
        "real_budget": arm.real_budget,
        "negative_control": arm.spoil,
        "real_images": arm.real_budget,
        "synthetic_images": len(arm.synthetic),
        "list_length": trained.list_entries,
        "epochs": schedule.epochs,
        "iterations": trained.iterations,
        "optimizer_steps": trained.optimizer_steps,
        "images_seen": trained.iterations * trained.batch,
        "batch": trained.batch,
        "imgsz": imgsz,
        "model": model,
        "device": device or "auto",
        "train_seconds": round(trained.seconds, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "weights": str(trained.weights.relative_to(out)),
        "convergence": convergence,
        "metrics": metrics,
    }
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Settings key, resume, run lock
# ---------------------------------------------------------------------------------------------------------------


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(out: Path, settings: dict[str, Any], *, record: bool = True) -> str:
    """The key of ``settings``; refuses an ``--out`` that holds rows made under other settings. ``record``: write
    the settings into a new ``--out`` (``--check`` writes nothing)."""
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
    elif record:
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

    @classmethod
    def of(cls, out: Path, arm: Arm) -> RunLock:
        return cls(out / "runs" / f".{arm.name}.lock")

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
