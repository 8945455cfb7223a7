"""Does synthetic data help a detector? Real-only vs real + synthetic, at the same number of training iterations.

Trains the same YOLO model on the real training frames alone (share 0 %) and on real + synthetic mixes (a sweep of
synthetic shares, as a percentage of the real count), over several seeds, evaluates every model on the real
validation frames and reports mAP50-95 and mAP50 as mean ± spread over seeds: overall, per class and per weather ×
time of day (the val frames' BDD attributes).

Usage::

    python annotation/evaluate_gain.py --real data/real/data.yaml --synthetic annotated/plan/data.yaml \\
        --val data/real/data.yaml --out eval/gain [--shares 0,25,50,100] [--seeds 0,1,2] \\
        [--epochs 50 | --iterations 20000] [--max_real 2000] [--model yolov8n.yaml] [--imgsz 640] [--batch 16]
    python annotation/evaluate_gain.py --config config/gain.yaml [--device 0] [design.seeds=[0,1]] [--check]

Every setting is a key of the YAML config (config/gain.yaml documents each); a flag is another spelling of its key
(``--epochs`` sets ``design.epochs``) and ``key=value`` overrides come last: YAML < flags < overrides. ``--check``
validates the config and the inputs (data yamls, model, the design, an existing ``--out``'s settings) and exits
without training.

The equal-iteration rule (why: many published gains vanish once the real-only baseline trains as long as the mix;
Dream4Drive). Every arm trains ``E`` epochs over a training list of the same length ``M = nb * batch`` entries,
written as an ultralytics image-list .txt file, so every arm runs exactly ``E * nb`` iterations and sees
``E * M`` images. ``nb = ceil(largest arm / batch)``: the largest arm sees each of its images once per epoch,
smaller arms repeat theirs (each image ``floor(M / n)`` or one more time; the extra copies are a seeded draw), the
real-only arm most of all. The real images are the same in every arm of a seed (``--max_real N``: a seeded draw of
N frames, the same for every share); a share's synthetic images are a seeded draw that contains every smaller
share's. The script counts the iterations ultralytics runs and refuses a run that differs.

How ``--iterations N`` maps to ultralytics' epochs: ``E = max(1, N // nb)`` epochs of ``N // E`` batches, i.e. as
many whole passes over the largest arm as fit (each a little longer when N is no multiple of nb); the iterations
run are ``E * (N // E)``, N or up to E - 1 fewer, printed. So N = 12 and N = 13 at nb = 4 are both 3 epochs of 4
batches. What ultralytics then does with the epochs is printed before training and kept in the report
(:mod:`annotation.gain.recipe`, the rule of its trainer): **optimizer steps** (gradients accumulate over
``round(nbs / batch)`` batches, ``nbs`` = 64 by default, capped at the run's batches; warmup steps more often),
**warmup** (``min(warmup_epochs, E - 1)`` epochs: none in a one-epoch run) and **mosaic** (off in the last
``close_mosaic`` = 10 epochs: none when E <= 10). A budget that leaves warmup or mosaic out, or that makes fewer
than ``design.min_optimizer_steps`` steps, is warned about (every arm shares the schedule, so the warning is about
all of them).

Controls and the exchange rate (:mod:`annotation.gain.controls`, :mod:`annotation.gain.curve`), beside the largest
share, per seed: a **positive control** (``--positive_control``: as many more *real* frames as that share has
synthetic ones, from outside the real draw; needs ``--max_real``), a **negative control** (``--negative_control
shuffled_labels | blank_images``), and a **real-data curve** (``--real_curve 250,500,1000``: real-only arms at
those budgets). Each synthetic arm's mAP is read off its seed's curve: "S synthetic frames are worth about M real
frames". Each run also scores its weights at the start of the last fifth of its iterations and the report says
whether the arm **converged** (mAP flat there); a zero baseline is reported as **no signal**, not as a gain of 0.

Before anything trains, the val frames are kept out of training (:mod:`annotation.gain.leaks`): real-train or
synthetic images that are val images (same inode, or same bytes), and synthetic images generated from a val frame
(their ``source_frame`` in stage 4's manifest or the generation's metadata.jsonl), are refused with a count.

``--devices 0,1,2,3`` trains one run per device at once, each in its own process (``--devices cpu,cpu``: two CPU
trainings); the same seeds give the same figures as one at a time. Several hosts may share one ``--out``.

Outputs in ``--out``: ``gain.csv`` (one row per arm and seed: ``arm`` is real, synthetic, positive_control,
negative_control or real_curve, with ``share`` and ``real_budget``), ``gain.md`` (tables), ``gain.png`` (mAP vs
share with the controls; mAP vs real frames), ``gain.json`` (the same, machine-readable, with the verdicts),
``gain_settings.json`` (what every row depends on) and ``runs/<run>/`` (training list, composition, ultralytics
run, ``result.json``). A rerun keeps every finished run (``result.json`` under the same settings key) and retrains
an unfinished one from scratch; other settings in the same ``--out`` are refused, never mixed. Adding controls or
curve budgets that keep the largest arm keeps every finished run. The code: :mod:`annotation.gain`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from annotation.gain import controls, design, leaks, parallel, recipe, report, runner
from annotation.gain import data as gain_data
from annotation.gain.stats import pct
from core.cli import UserError, run_main, setup_logging
from core.config import Section, add_config_arguments, flag_values, load_config

# ---------------------------------------------------------------------------------------------------------------
# The config: config/gain.yaml documents every key
# ---------------------------------------------------------------------------------------------------------------


def number_list(value: Any, flag: str, kind: type) -> list:
    """A flag's comma list ('0,25,50') or a YAML list as numbers of ``kind``; empty lists and repeats refused
    (the error line quotes the value)."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    values = []
    for part in parts:
        if isinstance(part, str) and not part.strip():
            continue
        try:
            if isinstance(part, bool) or not isinstance(part, str | int | float):
                raise ValueError
            number = kind(part)
        except ValueError:
            raise ValueError(f"{flag}: expected comma-separated numbers") from None
        if number != float(part):  # 1.5 as a seed
            raise ValueError(f"{flag}: expected comma-separated numbers")
        values.append(number)
    if not values:
        raise ValueError(f"{flag}: empty list")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}: repeated value")
    return values


def name_list(value: Any, flag: str) -> list[str]:
    """A flag's comma list ('train,val') or a YAML list of names."""
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{flag}: expected names such as train,val, got {value!r}")
    names = [p.strip() for p in parts if p.strip()]
    if not names:
        raise ValueError(f"{flag}: empty list; name the splits to draw from, e.g. train,val")
    return names


def train_args_mapping(value: Any) -> dict[str, Any]:
    """``--train_args 'lr0=0.01,mosaic=0'`` (values read as YAML) or a YAML mapping, limited to the ultralytics
    hyperparameters the rule leaves open."""
    if value is None:
        return {}
    if isinstance(value, str):
        parsed = {}
        for part in filter(str.strip, value.split(",")):
            key, sep, text = part.partition("=")
            key = key.strip()
            if not sep or key not in runner.TRAIN_ARGS_ALLOWED:
                raise ValueError(
                    not_a_train_arg(f"{part.strip()!r} is not KEY=VALUE with", key if sep else "")
                )
            parsed[key] = yaml.safe_load(text)
        return parsed
    if not isinstance(value, dict):
        raise ValueError("--train_args: expected 'KEY=VALUE,...' or a mapping")
    for key in value:
        if key not in runner.TRAIN_ARGS_ALLOWED:
            raise ValueError(not_a_train_arg(f"{key!r} is not", str(key)))
    return value


def not_a_train_arg(what: str, key: str) -> str:
    close = difflib.get_close_matches(key, runner.TRAIN_ARGS_ALLOWED, n=3, cutoff=0.6) if key else []
    return (
        f"--train_args: {what} one of the training hyperparameters this script leaves open "
        f"({', '.join(sorted(runner.TRAIN_ARGS_ALLOWED))}); epochs, batch, imgsz, seed, data and the like are set "
        "by the equal-iteration rule or their own flags"
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
    )


class DataSection(Section):
    """The three data sets: YOLO data yamls with the 10 BDD100K classes in stage 4's order."""

    real: Path
    synthetic: Path
    val: Path
    synthetic_splits: list[str] = ["train", "val"]
    skip_conditions: bool = False

    @field_validator("synthetic_splits", mode="before")
    @classmethod
    def _splits(cls, value: Any) -> list[str]:
        return name_list(value, "--synthetic_splits")


class DesignSection(Section):
    """The arms (shares x seeds, the real draw) and the budget every arm shares."""

    shares: list[float] = [0, 25, 50, 100]
    seeds: list[int] = [0, 1, 2]
    epochs: int | None = Field(None, ge=1)
    iterations: int | None = Field(None, ge=1)
    max_real: int | None = Field(None, ge=1)
    positive_control: bool = False
    negative_control: Literal["shuffled_labels", "blank_images"] | None = None
    real_curve: list[int] = []
    min_optimizer_steps: int = Field(100, ge=0)
    convergence_check: bool = True
    convergence_tolerance: float = Field(0.05, ge=0)

    @field_validator("real_curve", mode="before")
    @classmethod
    def _real_curve(cls, value: Any) -> list[int]:
        if value is None or value == [] or value == "":
            return []
        budgets = number_list(value, "--real_curve", int)
        if any(b < 1 for b in budgets):
            raise ValueError("--real_curve: budgets are numbers of real frames >= 1")
        return sorted(budgets)

    @field_validator("shares", mode="before")
    @classmethod
    def _shares(cls, value: Any) -> list[float]:
        shares = number_list(value, "--shares", float)
        if any(s < 0 or not math.isfinite(s) for s in shares):
            raise ValueError(
                "--shares must be percentages >= 0 (0 = real only, 100 = as many synthetic as real)"
            )
        if 0 not in shares:
            raise ValueError("--shares must include 0, the real-only baseline every gain is measured against")
        return sorted(shares)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> list[int]:
        return number_list(value, "--seeds", int)

    @model_validator(mode="after")
    def _one_budget(self) -> DesignSection:
        if self.epochs is not None and self.iterations is not None:
            raise ValueError(
                "set design.epochs (--epochs) or design.iterations (--iterations), not both; leave the other null"
            )
        return self

    @property
    def budget_epochs(self) -> int | None:
        """The epochs of every arm: ``epochs``; with neither budget set, the default."""
        return self.epochs or (None if self.iterations else design.DEFAULT_EPOCHS)


class TrainSection(Section):
    """The detector and ultralytics' training and evaluation settings, the same for every arm."""

    model: str = "yolov8n.yaml"
    imgsz: int = Field(640, ge=1)
    batch: int = Field(16, ge=1)
    device: str = ""
    devices: list[str] = []
    workers: int = Field(8, ge=0)
    args: dict[str, Any] = {}

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty model; pass an architecture such as yolov8n.yaml or a local .pt")
        return value

    @field_validator("imgsz")
    @classmethod
    def _imgsz(cls, value: int) -> int:
        if value % 32:
            raise ValueError("--imgsz must be a multiple of 32 (YOLO's largest stride)")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        value = (
            "" if value is None else str(value) if type(value) is int else value
        )  # override train.device=0
        if isinstance(value, str) and "," in value:
            raise ValueError(
                "--device takes one device: ultralytics' multi-GPU mode runs the training in "
                "child processes where this script cannot count iterations; --devices 0,1 runs one training "
                "per GPU at once instead"
            )
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> list[str]:
        if value is None or value == "":
            return []
        parts = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        devices = [str(p).strip() for p in parts if str(p).strip()]
        if not all(d == "cpu" or d.isdigit() for d in devices):
            raise ValueError(f"--devices: expected GPU ids or cpu such as 0,1,2,3 or cpu,cpu, got {value!r}")
        return devices

    @model_validator(mode="after")
    def _one_device_setting(self) -> TrainSection:
        if self.devices and self.device:
            raise ValueError(
                "set train.device (--device, one training at a time) or train.devices (--devices, one training "
                "per device at once), not both; leave the other empty"
            )
        return self

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, value: Any) -> dict[str, Any]:
        return train_args_mapping(value)


class GainConfig(Section):
    """The whole gain config (config/gain.yaml)."""

    out: Path
    data: DataSection = Field(default_factory=dict)  # validated: a missing input is named data.real, not data
    design: DesignSection = DesignSection()
    train: TrainSection = TrainSection()


def run_settings(
    cfg: GainConfig, model_fingerprint: str, schedule: design.Schedule, inputs: gain_data.Inputs
) -> dict[str, Any]:
    """What every row depends on (not the device, workers or paths): its key names the runs a rerun keeps. Keep
    these keys and values as they are: a change makes every existing ``--out`` refuse to resume."""
    return {
        "version": runner.SETTINGS_VERSION,
        "model": cfg.train.model,
        "model_fingerprint": model_fingerprint,
        "imgsz": cfg.train.imgsz,
        "batch": cfg.train.batch,
        "epochs": schedule.epochs,
        "batches_per_epoch": schedule.batches_per_epoch,
        "max_real": cfg.design.max_real,
        "synthetic_splits": ",".join(cfg.data.synthetic_splits),  # the flag's spelling
        "train_args": dict(cfg.train.args),
        "real": gain_data.fingerprint(inputs.real),
        "synthetic": gain_data.fingerprint(inputs.synthetic),
        "val": gain_data.fingerprint(inputs.val),
        "conditions": None if cfg.data.skip_conditions else gain_data.conditions_fingerprint(cfg.data.val),
        "convergence_check": cfg.design.convergence_check,
        "ultralytics": importlib.metadata.version("ultralytics"),
        "pycocotools": importlib.metadata.version("pycocotools"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line: every flag sets its config key
# ---------------------------------------------------------------------------------------------------------------

EXAMPLE = """example (GPU host, real BDD100K, 3 seeds, 4 arms; about 12 trainings):
  python convert/bdd_to_yolo.py --bdd_data_dir $BDD_DATA_DIR --split train --out data/real
  python convert/bdd_to_yolo.py --bdd_data_dir $BDD_DATA_DIR --split val --out data/real
  python annotation/evaluate_gain.py --real data/real/data.yaml --val data/real/data.yaml \\
      --synthetic annotated/plan/data.yaml --out eval/gain --shares 0,25,50,100 --seeds 0,1,2 \\
      --epochs 50 --max_real 5000 --model yolov8n.yaml --imgsz 640 --batch 32 --device 0
  -> eval/gain/gain.md (tables), gain.png (plot), gain.csv (one row per share and seed)
the same from the config (every key documented there), with overrides:
  python annotation/evaluate_gain.py --config config/gain.yaml design.max_real=5000 train.batch=32 --device 0
"""


#: flag -> (the config key it sets, help); --epochs and --iterations exclude each other, --skip_conditions is a switch
FLAGS: dict[str, tuple[str, str]] = {
    "--real": ("data.real", "YOLO data yaml of the real frames (its train split)"),
    "--synthetic": ("data.synthetic", "YOLO data yaml of the synthetic set (stage 4's data.yaml)"),
    "--val": ("data.val", "YOLO data yaml of the real val frames (its val split; frames.csv beside it)"),
    "--out": ("out", "output folder (tables, plot, runs)"),
    "--shares": ("design.shares", "synthetic shares in %% of the real count; must include 0 (0,25,50,100)"),
    "--seeds": ("design.seeds", "seeds (data draws, model init, ultralytics seed; 0,1,2)"),
    "--epochs": ("design.epochs", "epochs of every arm (50 when neither --epochs nor --iterations)"),
    "--iterations": ("design.iterations", "exact iterations of every arm instead"),
    "--max_real": ("design.max_real", "use a seeded draw of N real frames (low-data regime)"),
    "--positive_control": ("design.positive_control", "add the positive control: S more real frames instead"),
    "--negative_control": (
        "design.negative_control",
        "add a negative control: shuffled_labels or blank_images",
    ),
    "--real_curve": ("design.real_curve", "real-only arms at these real budgets (250,500,1000): the curve"),
    "--model": ("train.model", "architecture yaml (random init, no download) or a local .pt (yolov8n.yaml)"),
    "--imgsz": ("train.imgsz", "training and evaluation size (multiple of 32; 640)"),
    "--batch": ("train.batch", "images per iteration, the same for every arm (16)"),
    "--device": ("train.device", "'' (auto, the default), cpu, or one GPU id such as 0"),
    "--devices": ("train.devices", "one training per device at once: 0,1,2,3 (cpu,cpu: two on CPU)"),
    "--workers": ("train.workers", "dataloader workers (ultralytics uses 0 on CPU; 8)"),
    "--synthetic_splits": ("data.synthetic_splits", "splits of --synthetic to draw from (train,val)"),
    "--train_args": ("train.args", "more ultralytics training arguments: 'lr0=0.01,mosaic=0'"),
    "--skip_conditions": ("data.skip_conditions", "val set without frames.csv: no per-condition table"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the same YOLO model on real-only and real + synthetic mixes at the same number of "
        "iterations, over several seeds; report mAP on the real val frames as mean ± spread (overall, per class, "
        "per weather x time of day). Offline; reruns keep finished runs. Each flag sets the config key in "
        "brackets (config/gain.yaml documents them); key=value overrides come last.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    add_config_arguments(
        p,
        check_help="validate the config and the inputs (data, model, design, --out's settings); train nothing",
    )
    budget = p.add_mutually_exclusive_group()
    for flag, (key, text) in FLAGS.items():
        group = budget if flag in ("--epochs", "--iterations") else p
        switch = {"action": "store_true"} if flag in ("--skip_conditions", "--positive_control") else {}
        metavar = {} if switch else {"metavar": flag[2:].upper()}
        group.add_argument(flag, dest=key, default=None, help=f"{text} [{key}]", **switch, **metavar)
    p.add_argument("--log_level", default=None, help="DEBUG, INFO, WARNING")
    return p


def parse_config(argv: Sequence[str] | None) -> tuple[argparse.Namespace, GainConfig]:
    """The command line and the config it names: YAML (``--config``) < flags < ``key=value`` overrides."""
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before, between or after flags
    flags = flag_values(args, exclude=("log_level",))
    return args, load_config(GainConfig, args.config, args.overrides, flags=flags)


def ultralytics_config_dir(out: Path, check: bool) -> Path:
    """ultralytics' settings folder: inside ``--out`` for a run; a check leaves ``--out`` alone."""
    return (
        Path(tempfile.gettempdir()) / f"bdd-sdxl-gain-check-{os.getuid()}" if check else out / ".ultralytics"
    )


# ---------------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_config(argv)
    setup_logging(args.log_level)
    out, shares, seeds = cfg.out, cfg.design.shares, cfg.design.seeds

    # --- offline ultralytics, the model (a missing .pt: a clear error before any data is read) -----------------
    from annotation import yolo_runtime

    yolo_runtime.prepare_offline(ultralytics_config_dir(out, args.check))
    yolo_runtime.check_model_spec(cfg.train.model)
    model_fingerprint = yolo_runtime.load_model(cfg.train.model).fingerprint

    # --- data: real train, synthetic, real val (+ attributes) -------------------------------------------------
    inputs = gain_data.load_inputs(
        cfg.data.real, cfg.data.synthetic, cfg.data.val, cfg.data.synthetic_splits,
        skip_conditions=cfg.data.skip_conditions,
    )  # fmt: skip

    # --- leaks: no val frame (by file, content or source frame) in any training arm ---------------------------
    leak_check = leaks.check_no_val_leaks(inputs.real, inputs.synthetic, inputs.val, inputs.synthetic_yaml)

    # --- the design: arms per seed (shares, controls, curve), one schedule for all ---------------------------
    d = cfg.design
    arms = []
    for seed in seeds:
        seed_arms = design.design_arms(inputs.real, inputs.synthetic, shares, seed, d.max_real)
        arms += seed_arms + controls.control_arms(
            inputs.real,
            seed_arms,
            positive=d.positive_control,
            negative=d.negative_control,
            curve=d.real_curve,
        )
    schedule = design.equal_iteration_schedule(
        max(len(a.images) for a in arms), cfg.train.batch, d.budget_epochs, d.iterations
    )
    ultralytics_args = runner.ultralytics_defaults() | dict(cfg.train.args)
    train_recipe = recipe.recipe(schedule, ultralytics_args)
    warnings = recipe.recipe_warnings(train_recipe, ultralytics_args, d.min_optimizer_steps)
    settings = run_settings(cfg, model_fingerprint, schedule, inputs)
    key = runner.check_settings(out, settings, record=not args.check)
    max_real = d.max_real
    cells = len(set(inputs.conditions.values())) if inputs.conditions else 0
    print(
        f"gain: {len(inputs.real)} real train images{f' (using {max_real} per seed)' if max_real else ''}, "
        f"{len(inputs.synthetic)} synthetic, {len(inputs.val)} real val images"
        + (f" in {cells} weather x time-of-day cells" if cells else "")
    )
    print(
        f"gain: no val leaks ({leak_check.images} images checked by file and content, {leak_check.hashed} hashed "
        f"for equal sizes, {leak_check.seconds:.1f} s; source frames known for {leak_check.with_source} of "
        f"{len(inputs.synthetic)} synthetic images"
        + (f", unknown for e.g. {leak_check.without_source[0]}" if leak_check.without_source else "")
        + ")"
    )
    kinds = sorted({a.arm for a in arms}, key=design.ARM_KINDS.index)
    short = (
        ""
        if schedule.iterations == d.iterations or d.iterations is None
        else (f" (--iterations {d.iterations} rounded down to whole epochs)")
    )
    print(
        f"gain: {len(arms)} runs ({', '.join(kinds)}) over shares {', '.join(f'{s:g} %' for s in shares)} x seeds "
        f"{', '.join(map(str, seeds))}; every arm {schedule.epochs} epochs x {schedule.batches_per_epoch} batches "
        f"of {schedule.batch} = {schedule.iterations} iterations{short} ({schedule.images_seen} images seen), "
        f"{train_recipe.optimizer_steps} optimizer steps (accumulate {train_recipe.accumulate}, warmup "
        f"{train_recipe.warmup_iterations} iterations, mosaic in {train_recipe.mosaic_epochs} of {schedule.epochs} "
        f"epochs); settings key {key}",
        flush=True,
    )
    for line in warnings:
        print(f"gain: WARNING: {line}", flush=True)
    if args.check:
        finished = sum(runner.finished_result(runner.run_folder(out, a), key) is not None for a in arms)
        print(
            f"check OK: {len(arms) - finished} of {len(arms)} runs to train in {out}; nothing trained (--check)"
        )
        return 0

    # --- the runs: keep finished ones, skip ones another process holds, train the rest ------------------------
    groups = gain_data.condition_groups(inputs.conditions) if inputs.conditions else None
    val = runner.ValSet(inputs.val, {}, groups)
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    failed: list[str] = []
    labels = {a.name: f"[{n}/{len(arms)}] {arm_label(a)}" for n, a in enumerate(arms, 1)}
    to_train = []
    for arm in arms:
        done = runner.finished_result(runner.run_folder(out, arm), key)
        if done is not None:
            print(
                f"{labels[arm.name]}: kept (finished {done['finished_at']}): mAP50-95 {pct(done['metrics']['map'])}"
            )
            results.append(done)
        else:
            to_train.append(arm)
    train = parallel.TrainSettings(
        key, cfg.train.model, cfg.train.imgsz, cfg.train.batch, cfg.train.workers, dict(cfg.train.args),
        d.convergence_check,
    )  # fmt: skip
    if len(cfg.train.devices) > 1:  # one process per run, as many at once as devices listed
        trained, held, failed = parallel.train_concurrently(
            out, to_train, schedule, val, train, cfg.train.devices, lambda a: labels[a.name]
        )
    else:  # one after another, in this process
        device = cfg.train.devices[0] if cfg.train.devices else cfg.train.device
        trained, held = parallel.train_in_turn(
            out, to_train, schedule, val, train, device, lambda a: labels[a.name]
        )
    results += trained
    missing += held + [f.split(" ", 1)[0] for f in failed]

    # --- reports ----------------------------------------------------------------------------------------------
    summary = report.write_reports(
        out, key, settings, results, shares, seeds, schedule, missing,
        recipe=train_recipe, warnings=warnings, tolerance=d.convergence_tolerance,
    )  # fmt: skip
    report.print_summary(out, summary, shares, missing)
    if failed:
        raise UserError(
            f"{len(failed)} run(s) failed (the others are in the report):\n  " + "\n  ".join(failed)
        )
    return 0


def arm_label(arm: design.Arm) -> str:
    """How the progress lines name a run."""
    if arm.arm == design.POSITIVE:
        return f"positive control ({len(arm.extra_real)} more real frames, {arm.share:g} %), seed {arm.seed}"
    if arm.arm == design.NEGATIVE:
        return f"negative control ({arm.spoil}, {arm.share:g} %), seed {arm.seed}"
    if arm.arm == design.CURVE:
        return f"real curve, {arm.real_budget} real frames, seed {arm.seed}"
    return f"{arm.share:g} % synthetic, seed {arm.seed}"


if __name__ == "__main__":
    sys.exit(run_main(main))
