"""Where is a detector weak? COCO mAP and box counts per class x weather x time of day (x scene) on real val frames,
with bootstrap confidence intervals, and the weakest cells as a generation plan's targets file.

Usage::

    python -m annotation.diagnose --val data/real/data.yaml --detector $YOLO_MODEL --out eval/diagnose \\
        [--imgsz 640] [--batch 16] [--device 0] [--class_map ...] [--classes car pedestrian ...] \\
        [--min_boxes 20] [--resamples 200] [--weakest 3] [--by_scene]
    python -m annotation.diagnose --config config/diagnose.yaml [--check] [key=value ...]

Settings come from a YAML config (config/diagnose.yaml documents every key; :class:`DiagnoseConfig` is its schema),
the flags (each another spelling of a key: ``--min_boxes`` is ``cells.min_boxes``) and ``key=value`` overrides, in
that order; ``--check`` validates them and the inputs (val set, its frames.csv, the detector file) and exits.

The val frames are a ``convert/bdd_to_yolo.py`` export: its ``data.yaml`` (the val split, the 10 BDD100K classes in
stage 4's order) and ``frames.csv`` beside it (each frame's weather, time of day and scene). The detector (a local
YOLO ``.pt``; its classes mapped to BDD100K's as stage 4 maps them: identity for a BDD-trained model, COCO -> BDD
by name, or ``detector.class_map``) predicts once on every val frame (confidences down to 0.001, as any mAP needs).
A *cell* is one value of each condition (``rainy|night``, or ``rainy|night|highway`` with ``--by_scene``); each
cell gets COCO mAP50-95 over the scored classes and, per class, its AP and box count
(:func:`annotation.metrics.detection_map` on the cell's frames). The confidence interval of each figure is a
percentile bootstrap over the cell's frames (``bootstrap.resamples`` draws with replacement, seeded; the
predictions are reused, only the evaluation reruns): it says how much the figure would move on another draw of
frames like these.

Cells with fewer than ``cells.min_boxes`` boxes (of a class, or in all) are flagged ``too few boxes`` and never
ranked: their AP is mostly noise; so are cells of a single frame (no interval: a draw of one frame is that
frame). The others are ranked by the **upper bound** of their interval
(``targets.rank_by: upper``, default) or by the point estimate (``map``): ranking by the upper bound picks cells
where the detector is *surely* weak, so a cell that reads low only because it has few boxes (a wide interval)
does not push out one that is reliably low. The ``targets.weakest`` lowest (class, cell) pairs whose conditions
are BDD100K values (not ``undefined``) become ``targets.yaml``, the input of ``convert/plan_generation.py
--targets``: one target per pair, fixing that weather and time of day (and scene) and requiring the class in every
planned scene.

``targets.yaml`` is yours to edit: its SHA-256 as written is kept in ``targets.yaml.sha256``, and a rerun that finds
the file changed (or written by someone else) leaves it as it is and says so; delete it to get a fresh one.

Writes into ``--out``: ``diagnose.json`` (every figure), ``diagnose.md`` (tables), ``diagnose.png`` (heat map of
mAP over weather x time of day, with box counts), ``targets.yaml`` and ``predictions_scalabel.json`` (the
detector's predictions in the BDD100K toolkit's format: ``python -m bdd100k.eval.run -t det -g det_val.json -r
predictions_scalabel.json`` scores them the toolkit's way); all atomically. Bad input (a val set without
frames.csv, a detector whose classes map to no BDD100K class, val frames without any box of the scored classes,
no cell with enough boxes to rank) is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from annotation import metrics
from annotation.gain import data as gain_data
from annotation.settings import ClassMapValue, check_bdd_class, parse_class_map_arg
from core import report
from core.cli import UserError, run_main, setup_logging
from core.config import Section, add_config_arguments, flag_values, load_config, save_resolved_config
from core.io import atomic_write_text, sha256_bytes
from vocab import bdd

log = logging.getLogger("bdd-sdxl.annotation")

CONDITION_KEYS = ("weather", "timeofday", "scene")
TOO_FEW = "too few boxes"
RANK_WORDS = {"upper": "the upper bound of the bootstrap interval", "map": "mAP"}
ONE_FRAME = (
    "one frame: no interval"  # a draw of one frame is that frame: the spread of another draw is unknown
)
TARGETS_FILE = "targets.yaml"
HASH_SUFFIX = ".sha256"

# ---------------------------------------------------------------------------------------------------------------
# The config: config/diagnose.yaml documents every key
# ---------------------------------------------------------------------------------------------------------------


class DiagnosePaths(Section):
    val: str  # bdd_to_yolo export: data.yaml whose val split is scored, frames.csv beside it
    out: str = "eval/diagnose"


class DiagnoseDetector(Section):
    model: str  # local YOLO weights (.pt): nothing is downloaded
    imgsz: int = Field(640, ge=32)
    batch: int = Field(16, ge=1)
    device: str | int | None = None
    conf: float = Field(metrics.EVAL_CONF, ge=0.0, le=1.0)
    iou: float = Field(0.7, gt=0.0, le=1.0)
    class_map: ClassMapValue = None  # model class -> BDD class, as stage 4's; None: auto
    classes: list[str] | None = None  # BDD classes scored; None: every class the detector maps to

    @field_validator("classes")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            check_bdd_class(name, "detector.classes")
        return value


class CellSettings(Section):
    by_scene: bool = False  # cells are weather x time of day x scene (else weather x time of day)
    min_boxes: int = Field(20, ge=1)  # fewer boxes: flagged "too few boxes", not ranked


class BootstrapSettings(Section):
    resamples: int = Field(200, ge=0)  # 0: no intervals (ranking by upper bound then uses the point estimate)
    confidence: float = Field(0.9, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)


class TargetSettings(Section):
    weakest: int = Field(3, ge=1)  # (class, cell) pairs that become targets
    rank_by: Literal["upper", "map"] = "upper"
    scenes: int = Field(100, ge=1)  # planned scenes per target
    require: int = Field(1, ge=1)  # boxes of the target's class in every planned scene
    seed: int = Field(0, ge=0)  # the plan's seed


class DiagnoseConfig(Section):
    paths: DiagnosePaths
    detector: DiagnoseDetector
    cells: CellSettings = CellSettings()
    bootstrap: BootstrapSettings = BootstrapSettings()
    targets: TargetSettings = TargetSettings()


# ---------------------------------------------------------------------------------------------------------------
# Inputs: val frames, their conditions and boxes
# ---------------------------------------------------------------------------------------------------------------


def read_frame_conditions(
    val: gain_data.DataYaml, items: Sequence[gain_data.Item]
) -> dict[str, dict[str, str]]:
    """key -> {weather, timeofday, scene} of every val image, from frames.csv beside the val yaml."""
    hint = (
        "diagnose needs each val frame's BDD100K attributes: write the val set with `python -m convert.bdd_to_yolo "
        "--split val`, which writes frames.csv beside data.yaml"
    )
    return gain_data.read_frame_attributes(val, items, flag="paths.val (--val)", hint=hint)


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as exc:
        raise UserError(f"cannot read val image {path}: {exc}") from None


def read_truths(items: Sequence[gain_data.Item], keep: set[int]) -> dict[str, metrics.Boxes]:
    """Each val image's YOLO labels of the scored classes, in its pixels."""
    out = {}
    for item in items:
        width, height = image_size(item.image)
        try:
            boxes = metrics.read_yolo_labels(item.label, width, height)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        mask = np.isin(boxes.cls, sorted(keep))  # ignore regions of the scored classes stay crowd truths
        out[item.key] = metrics.Boxes(boxes.xyxy[mask], boxes.cls[mask], None, boxes.is_crowd[mask])
    return out


def map_predictions(pred: metrics.Boxes, mapping: dict[int, int]) -> metrics.Boxes:
    """Model class ids -> BDD ids; classes outside the map dropped."""
    assert pred.conf is not None
    mask = np.isin(pred.cls, sorted(mapping))
    cls = np.asarray([mapping[int(c)] for c in pred.cls[mask]], np.int64)
    return metrics.Boxes(pred.xyxy[mask], cls, pred.conf[mask])


def predict(
    cfg: DiagnoseConfig, items: Sequence[gain_data.Item], out: Path
) -> tuple[dict, dict[int, int], str, str]:
    """The detector's mapped predictions on every val image (key -> Boxes), the class map, its origin and the
    detector's description."""
    import tempfile

    from annotation import yolo_runtime
    from annotation.settings import resolve_class_map

    d = cfg.detector
    yolo_runtime.prepare_offline(out / ".ultralytics")
    loaded = yolo_runtime.load_model(d.model)
    mapping, origin = resolve_class_map(loaded.names, d.class_map, list(d.classes) if d.classes else None)
    log.info("detector on %d val frames", len(items))
    with tempfile.TemporaryDirectory(prefix="diagnose-") as tmp:
        raw = metrics.predict_boxes(
            loaded, [i.image for i in items], Path(tmp) / "val.txt", imgsz=d.imgsz, batch=d.batch,
            device=d.device, conf=d.conf, iou=d.iou, classes=sorted(mapping),
        )  # fmt: skip
    unread = [str(i.image) for i in items if i.image not in raw]
    if unread:
        raise UserError(f"the detector could not read {len(unread)} val image(s): {', '.join(unread[:5])}")
    preds = {i.key: map_predictions(raw[i.image], mapping) for i in items}
    return preds, mapping, origin, loaded.description


# ---------------------------------------------------------------------------------------------------------------
# Cells, their figures and bootstrap intervals
# ---------------------------------------------------------------------------------------------------------------


def cell_of(cond: dict[str, str], by_scene: bool) -> str:
    keys = CONDITION_KEYS if by_scene else CONDITION_KEYS[:2]
    return "|".join(cond[k] for k in keys)


def group_cells(conditions: dict[str, dict[str, str]], by_scene: bool) -> dict[str, list[str]]:
    """cell name -> its val keys (sorted), cells in BDD100K's vocabulary order."""
    groups: dict[str, list[str]] = {}
    for key in sorted(conditions):
        groups.setdefault(cell_of(conditions[key], by_scene), []).append(key)

    def order(name: str) -> tuple:
        values = name.split("|")
        return tuple(
            bdd.FRAME_ATTRIBUTES[k].index(v) if v in bdd.FRAME_ATTRIBUTES[k] else 99
            for k, v in zip(CONDITION_KEYS, values, strict=False)
        )

    return dict(sorted(groups.items(), key=lambda kv: order(kv[0])))


def figures(table: dict[str, Any], classes: Sequence[str]) -> dict[str, float | None]:
    """The figures a cell is ranked on from one detection_map result: 'all' (mAP50-95) and each class's AP."""
    return {"all": table["map"], **{c: table["per_class"][c]["map"] for c in classes}}


def bootstrap(
    preds: dict[str, metrics.Boxes],
    truths: dict[str, metrics.Boxes],
    keys: list[str],
    classes: Sequence[str],
    settings: BootstrapSettings,
    salt: int,
) -> dict[str, list[float]]:
    """Figure -> its values over ``settings.resamples`` draws of ``keys`` with replacement (an image drawn twice
    counts twice). :func:`annotation.metrics.detection_maps` matches the cell's images once and only re-runs COCO's
    accumulation per draw; a figure undefined on a draw (a class without boxes there) is left out of that draw."""
    rng = np.random.default_rng([settings.seed, salt])
    draws = {i: [keys[j] for j in rng.integers(0, len(keys), len(keys))] for i in range(settings.resamples)}
    tables = metrics.detection_maps(preds, truths, bdd.DET_CLASSES, draws, per_size=False)
    values: dict[str, list[float]] = {name: [] for name in ("all", *classes)}
    for table in tables.values():
        for name, value in figures(table, classes).items():
            if value is not None:
                values[name].append(value)
    return values


def interval(values: list[float], confidence: float) -> tuple[float | None, float | None]:
    """Percentile interval of bootstrap values (None without values)."""
    if not values:
        return None, None
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def diagnose_cells(
    preds: dict[str, metrics.Boxes],
    truths: dict[str, metrics.Boxes],
    cells: dict[str, list[str]],
    classes: Sequence[str],
    cfg: DiagnoseConfig,
) -> list[dict[str, Any]]:
    """One row per (cell, figure): figure 'all' (every scored class) and each class with boxes in the cell."""
    rows = []
    for salt, (cell, keys) in enumerate(cells.items()):
        table = metrics.detection_map(preds, truths, bdd.DET_CLASSES, keys)
        point = figures(table, classes)
        boxes = {"all": table["gt_boxes"], **{c: table["per_class"][c]["gt_boxes"] for c in classes}}
        rankable = [name for name in point if boxes[name] >= cfg.cells.min_boxes and len(keys) > 1]
        samples = (
            bootstrap(preds, truths, keys, classes, cfg.bootstrap, salt)
            if rankable and cfg.bootstrap.resamples
            else {}
        )
        for name in ("all", *classes):
            if boxes[name] == 0:
                continue  # no box of this class here: no AP to speak of
            lo, hi = interval(samples.get(name, []), cfg.bootstrap.confidence)
            rows.append({
                "cell": cell, "class": name, "images": len(keys), "boxes": boxes[name], "map": point[name],
                "map50": table["map50"] if name == "all" else table["per_class"][name]["map50"],
                "ci_low": lo, "ci_high": hi, "resamples": len(samples.get(name, [])),
                "flag": None if name in rankable else TOO_FEW if boxes[name] < cfg.cells.min_boxes else ONE_FRAME,
            })  # fmt: skip
    return rows


def rank(rows: list[dict[str, Any]], rank_by: str) -> list[dict[str, Any]]:
    """The class rows with enough boxes, weakest first (upper bound, else the point estimate when no interval)."""

    def score(row: dict[str, Any]) -> float:
        value = row["ci_high"] if rank_by == "upper" and row["ci_high"] is not None else row["map"]
        return math.inf if value is None else value

    ranked = [r for r in rows if r["flag"] is None and r["class"] != "all"]
    ranked.sort(
        key=lambda r: (score(r), r["map"] if r["map"] is not None else math.inf, r["cell"], r["class"])
    )
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked


# ---------------------------------------------------------------------------------------------------------------
# targets.yaml: the weakest cells as a generation plan's targets (convert/planning/targets.py's schema)
# ---------------------------------------------------------------------------------------------------------------


def targetable(cell: str) -> bool:
    """A plan target can fix only BDD100K's defined values (not 'undefined')."""
    return all(
        v in bdd.FRAME_ATTRIBUTES[k] and v != "undefined"
        for k, v in zip(CONDITION_KEYS, cell.split("|"), strict=False)
    )


def target_name(cell: str, cls: str) -> str:
    return "weak_" + "_".join(part.replace(" ", "-").replace("/", "-") for part in (*cell.split("|"), cls))


def targets_text(
    ranked: list[dict[str, Any]], settings: TargetSettings, source: str
) -> tuple[str, list[dict]]:
    """The targets file's text and the rows it targets."""
    chosen = [r for r in ranked if targetable(r["cell"])][: settings.weakest]
    lines = [
        "# Targets for convert/plan_generation.py --targets, written by annotation/diagnose.py from the weakest",
        f"# (class, cell) pairs of {source} (ranked by {RANK_WORDS[settings.rank_by]}).",
        "# Edit freely: a rerun of diagnose keeps an edited file (delete it for a fresh one). Every key is",
        "# documented in config/plan_targets.yaml.",
        "",
        f"scenes: {settings.scenes * len(chosen)}",
        f"seed: {settings.seed}",
        "targets:",
    ]
    for row in chosen:
        values = dict(zip(CONDITION_KEYS, row["cell"].split("|"), strict=False))
        ci = "" if row["ci_high"] is None else f", interval [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        lines += [
            f"  # {row['class']} in {row['cell']}: AP {row['map']:.3f}{ci}, {row['boxes']} val boxes",
            f"  - name: {target_name(row['cell'], row['class'])}",
            *(f"    {k}: [{json.dumps(v)}]" for k, v in values.items()),
            f"    require: {{{json.dumps(row['class'])}: {settings.require}}}",
            f"    scenes: {settings.scenes}",
        ]
    return "\n".join(lines) + "\n", chosen


def write_targets(path: Path, text: str) -> str:
    """Write ``text`` unless the file there was edited (or not written by us); returns what happened."""
    record = path.with_name(path.name + HASH_SUFFIX)
    if path.exists():
        written = record.read_text(encoding="utf-8").strip() if record.is_file() else None
        current = sha256_bytes(path.read_bytes())
        if written != current:
            return (
                "kept (edited since diagnose wrote it, or not written by diagnose; delete it for a fresh one)"
            )
        if path.read_text(encoding="utf-8") == text:
            return "unchanged"
    atomic_write_text(path, text)
    atomic_write_text(record, sha256_bytes(text.encode("utf-8")) + "\n")
    return "written"


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}"


def _cell(name: str) -> str:
    """A cell's name in a Markdown table ('|' would split the cell)."""
    return name.replace("|", " / ")


def _ci(row: dict[str, Any]) -> str:
    return "–" if row["ci_low"] is None else f"[{_f(row['ci_low'])}, {_f(row['ci_high'])}]"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Diagnose: where the detector is weak",
        "",
        f"Detector `{result['detector']}` on {result['val_images']} val frames of `{result['val']}` "
        f"({', '.join(result['classes'])}). mAP is {metrics.DEFINITION}; × 100 here. The interval is a "
        f"{s['confidence'] * 100:g} % percentile bootstrap over each cell's frames ({s['resamples']} resamples, seed "
        f"{s['seed']}). Cells with fewer than {s['min_boxes']} boxes are flagged *{TOO_FEW}* and not ranked (nor "
        "are cells of one frame); the "
        f"others are ranked by {'the upper bound of their interval' if s['rank_by'] == 'upper' else 'mAP'}.",
        "",
        "## Weakest (class, cell) pairs",
        "",
    ]
    ranked = result["ranked"]
    lines += report.markdown_table(
        ["rank", "cell", "class", "boxes", "AP", "interval", "target"],
        [
            [
                r["rank"],
                _cell(r["cell"]),
                r["class"],
                r["boxes"],
                _f(r["map"]),
                _ci(r),
                "yes"
                if any(t["cell"] == r["cell"] and t["class"] == r["class"] for t in result["targets"]["rows"])
                else "",
            ]
            for r in ranked[:20]
        ],  # fmt: skip
        "rllrrrl",
    )
    if not ranked:
        lines.append("(none: no cell has enough boxes)")
    lines += [
        "",
        f"Targets: `{result['targets']['path']}` ({result['targets']['status']}).",
        "",
        "## Every cell",
        "",
    ]
    lines += report.markdown_table(
        ["cell", "class", "images", "boxes", "mAP", "mAP50", "interval", "note"],
        [
            [
                _cell(r["cell"]),
                r["class"],
                r["images"],
                r["boxes"],
                _f(r["map"]),
                _f(r["map50"]),
                _ci(r),
                r["flag"] or "",
            ]
            for r in result["cells"]
        ],  # fmt: skip
        "llrrrrrl",
    )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Heat map of mAP (all scored classes) over weather x time of day, each square with its box count."""
    rows = [r for r in result["cells"] if r["class"] == "all"]
    by_wt: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        weather, tod = r["cell"].split("|")[:2]
        by_wt.setdefault((weather, tod), []).append(r)
    weathers = [w for w in (*bdd.FRAME_ATTRIBUTES["weather"], "undefined") if any(k[0] == w for k in by_wt)]
    tods = [t for t in (*bdd.FRAME_ATTRIBUTES["timeofday"], "undefined") if any(k[1] == t for k in by_wt)]
    grid = np.full((len(weathers), len(tods)), np.nan)
    fig, ax = report.subplots(figsize=(1.6 + 1.5 * len(tods), 1.2 + 0.6 * len(weathers)))
    for (weather, tod), group in by_wt.items():
        boxes = sum(g["boxes"] for g in group)
        # with scenes, a weather x time cell's figure is the box-weighted mean of its scene cells' mAPs
        valued = [(g["map"], g["boxes"]) for g in group if g["map"] is not None]
        value = sum(m * b for m, b in valued) / sum(b for _, b in valued) if valued else None
        i, j = weathers.index(weather), tods.index(tod)
        if value is not None:
            grid[i, j] = value
        few = all(g["flag"] == TOO_FEW for g in group)
        ax.text(j, i, f"{_f(value)}\n{boxes} boxes" + ("\n(too few)" if few else ""), ha="center", va="center",
                fontsize=8, color="black")  # fmt: skip
    image = ax.imshow(
        grid,
        cmap="RdYlGn",
        vmin=0.0,
        vmax=max(0.05, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0),
    )
    ax.set_xticks(range(len(tods)), tods)
    ax.set_yticks(range(len(weathers)), weathers)
    ax.set_title(
        "mAP50-95 (x100) per weather x time of day; blank: no box"
        + (" (box-weighted over scenes)" if result["settings"]["by_scene"] else ""),
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="mAP50-95")
    fig.tight_layout()
    report.save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m annotation.diagnose",
        description="Where is a detector weak: mAP per class x weather x time of day on real val frames, with "
        "bootstrap intervals; the weakest cells as a generation plan's targets file.",
        epilog="Every key is documented in config/diagnose.yaml; flags and key=value overrides replace its values.",
    )
    add_config_arguments(
        p, None, "validate the config and the inputs (val set, frames.csv, detector), then exit"
    )
    p.add_argument(
        "--val",
        dest="paths.val",
        help="bdd_to_yolo data.yaml whose val split is scored (frames.csv beside it)",
    )
    p.add_argument("--detector", dest="detector.model", help="local YOLO weights (.pt)")
    p.add_argument("--out", dest="paths.out", help="report folder (diagnose.json, .md, .png, targets.yaml)")
    p.add_argument("--imgsz", dest="detector.imgsz", type=int, help="detector input size (640)")
    p.add_argument("--batch", dest="detector.batch", type=int, help="images per batch (16)")
    p.add_argument(
        "--device", dest="detector.device", help="cpu, 0, cuda:0 ... (default: the first GPU, else cpu)"
    )
    p.add_argument(
        "--class_map", dest="detector.class_map", help="model class -> BDD class (as stage 4's; auto)"
    )
    p.add_argument(
        "--classes", dest="detector.classes", nargs="+", help="BDD classes scored (default: all mapped)"
    )
    p.add_argument(
        "--by_scene", dest="cells.by_scene", action="store_true", default=None, help="cells by scene too"
    )
    p.add_argument(
        "--min_boxes", dest="cells.min_boxes", type=int, help="fewer boxes: flagged, not ranked (20)"
    )
    p.add_argument(
        "--resamples", dest="bootstrap.resamples", type=int, help="bootstrap resamples (200; 0: none)"
    )
    p.add_argument(
        "--weakest", dest="targets.weakest", type=int, help="(class, cell) pairs that become targets (3)"
    )
    p.add_argument("--log_level", default=None)
    return p


def load_inputs(
    cfg: DiagnoseConfig,
) -> tuple[gain_data.DataYaml, list[gain_data.Item], dict[str, dict[str, str]]]:
    val = gain_data.load_data_yaml(Path(cfg.paths.val), "paths.val (--val)")
    items = gain_data.split_items(val, "val")
    if not items:
        raise UserError(f"paths.val (--val): {val.path}'s val split lists no images")
    return val, items, read_frame_conditions(val, items)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    flags = flag_values(args, exclude=("log_level",))
    if flags["detector.class_map"] is not None:
        flags["detector.class_map"] = parse_class_map_arg(flags["detector.class_map"])
    cfg = load_config(DiagnoseConfig, args.config, args.overrides, flags=flags)
    from annotation import yolo_runtime

    yolo_runtime.check_model_spec(cfg.detector.model)
    out = Path(cfg.paths.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"paths.out (--out) {out} is a file, not a folder")
    val, items, conditions = load_inputs(cfg)
    if args.check:
        print(
            f"{args.config or 'flags'}: ok ({len(items)} val frames in {val.path}, detector {cfg.detector.model})"
        )
        return 0

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    preds, mapping, origin, description = predict(cfg, items, out)
    class_ids = sorted(set(mapping.values()))
    classes = [bdd.DET_CLASSES[c] for c in class_ids]
    truths = read_truths(items, set(class_ids))
    if not sum(int((~t.is_crowd).sum()) for t in truths.values()):  # ignore regions are not boxes to find
        raise UserError(
            f"paths.val (--val): the {len(items)} val frames of {val.path} hold no box of the scored classes "
            f"({', '.join(classes)}): no cell has anything to measure; score other classes (detector.classes) or "
            "export the val frames with their boxes"
        )
    cells = group_cells(conditions, cfg.cells.by_scene)
    rows = diagnose_cells(preds, truths, cells, classes, cfg)
    ranked = rank(rows, cfg.targets.rank_by)
    if not ranked:
        most = max((r["boxes"] for r in rows if r["class"] != "all" and r["images"] > 1), default=0)
        raise UserError(
            f"no (class, cell) pair has cells.min_boxes={cfg.cells.min_boxes} boxes in two frames or more (the most "
            f"in a cell of several frames: {most}): nothing can be ranked; lower cells.min_boxes (--min_boxes) or "
            "score more val frames"
        )
    text, chosen = targets_text(ranked, cfg.targets, str(val.path))
    if not chosen:
        raise UserError("every ranked cell has an 'undefined' attribute: a plan target cannot fix it")
    targets_path = out / TARGETS_FILE
    status = write_targets(targets_path, text)
    result = {
        "val": str(val.path),
        "val_images": len(items),
        "detector": description,
        "class_map": origin,
        "classes": classes,
        "settings": {
            **cfg.cells.model_dump(),
            **cfg.bootstrap.model_dump(),
            "rank_by": cfg.targets.rank_by,
            "imgsz": cfg.detector.imgsz,
            "conf": cfg.detector.conf,
            "iou": cfg.detector.iou,
        },  # fmt: skip
        "overall": metrics.detection_map(preds, truths, bdd.DET_CLASSES),
        "cells": rows,
        "ranked": ranked,
        "targets": {"path": str(targets_path), "status": status, "rows": chosen},
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "diagnose.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "diagnose.md", markdown(result))
    metrics.write_scalabel_predictions(
        {i.image.name: preds[i.key] for i in items}, bdd.DET_CLASSES, out / "predictions_scalabel.json"
    )  # the same predictions for the BDD100K toolkit
    plot(result, out / "diagnose.png")
    save_resolved_config(cfg, out / "config.resolved.yaml")
    print(f"diagnose: {len(items)} val frames, {len(cells)} cells, mAP50-95 {_f(result['overall']['map'])} overall "
          f"({result['seconds']} s)")  # fmt: skip
    for r in chosen:
        print(f"  weak: {r['class']} in {r['cell']}: AP {_f(r['map'])} {_ci(r)}, {r['boxes']} boxes")
    print(
        f"  targets: {targets_path} ({status})\n  table: {out / 'diagnose.md'}\n  plot: {out / 'diagnose.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
