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
same ``--out`` are refused, never mixed. The code: :mod:`annotation.gain`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from annotation.gain import data as gain_data
from annotation.gain import design, report, runner
from annotation.gain.stats import pct
from core.cli import UserError, run_main, setup_logging

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
        if not sep or key not in runner.TRAIN_ARGS_ALLOWED:
            raise UserError(
                f"--train_args: {part.strip()!r} is not KEY=VALUE with one of the training hyperparameters this "
                f"script leaves open ({', '.join(sorted(runner.TRAIN_ARGS_ALLOWED))}); epochs, batch, imgsz, seed, data "
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
    splits = [s.strip() for s in args.synthetic_splits.split(",") if s.strip()]
    inputs = gain_data.load_inputs(
        args.real, args.synthetic, args.val, splits, skip_conditions=args.skip_conditions
    )

    # --- the design: arms per seed, one schedule for all ------------------------------------------------------
    arms = [
        arm
        for seed in seeds
        for arm in design.design_arms(inputs.real, inputs.synthetic, shares, seed, args.max_real)
    ]
    schedule = design.equal_iteration_schedule(
        max(len(a.images) for a in arms),
        args.batch,
        args.epochs or (None if args.iterations else design.DEFAULT_EPOCHS),
        args.iterations,
    )
    settings = {
        "version": runner.SETTINGS_VERSION,
        "model": args.model,
        "model_fingerprint": model_fingerprint,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "epochs": schedule.epochs,
        "batches_per_epoch": schedule.batches_per_epoch,
        "max_real": args.max_real,
        "synthetic_splits": args.synthetic_splits,
        "train_args": train_args,
        "real": gain_data.fingerprint(inputs.real),
        "synthetic": gain_data.fingerprint(inputs.synthetic),
        "val": gain_data.fingerprint(inputs.val),
        "conditions": None if args.skip_conditions else gain_data.conditions_fingerprint(args.val),
        "ultralytics": importlib.metadata.version("ultralytics"),
        "torchmetrics": importlib.metadata.version("torchmetrics"),
    }
    key = runner.check_settings(out, settings)
    print(
        f"gain: {len(inputs.real)} real train images{f' (using {args.max_real} per seed)' if args.max_real else ''}, "
        f"{len(inputs.synthetic)} synthetic, {len(inputs.val)} real val images"
        + (
            f" in {len(set(inputs.conditions.values()))} weather x time-of-day cells"
            if inputs.conditions
            else ""
        )
    )
    print(
        f"gain: shares {', '.join(f'{s:g} %' for s in shares)} x seeds {', '.join(map(str, seeds))}; every arm "
        f"{schedule.epochs} epochs x {schedule.batches_per_epoch} batches of {schedule.batch} = "
        f"{schedule.iterations} iterations ({schedule.images_seen} images seen); settings key {key}",
        flush=True,
    )

    # --- the runs: keep finished ones, skip ones another process holds, train the rest ------------------------
    groups = gain_data.condition_groups(inputs.conditions) if inputs.conditions else None
    val = runner.ValSet(inputs.val, {}, groups)
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    for n, arm in enumerate(arms, 1):
        label = f"[{n}/{len(arms)}] {arm.share:g} % synthetic, seed {arm.seed}"
        done = runner.finished_result(runner.run_folder(out, arm), key)
        if done is not None:
            print(f"{label}: kept (finished {done['finished_at']}): mAP50-95 {pct(done['metrics']['map'])}")
            results.append(done)
            continue
        lock = runner.RunLock.of(out, arm)
        if not lock.acquire():
            print(f"{label}: skipped, another process is training it (rerun later to collect it)")
            missing.append(arm.name)
            continue
        try:
            print(
                f"{label}: training on {len(arm.real)} real + {len(arm.synthetic)} synthetic images "
                f"({schedule.list_length} list entries per epoch)",
                flush=True,
            )
            result = runner.train_and_evaluate(
                out, arm, schedule, val, key=key, model=args.model, imgsz=args.imgsz, batch=args.batch,
                device=args.device, workers=args.workers, train_args=train_args,
            )  # fmt: skip
        finally:
            lock.release()
        metrics = result["metrics"]
        print(
            f"{label}: done in {result['train_seconds']:.0f} s: mAP50-95 {pct(metrics['map'])}, "
            f"mAP50 {pct(metrics['map50'])}",
            flush=True,
        )
        results.append(result)

    # --- reports ----------------------------------------------------------------------------------------------
    summary = report.write_reports(out, key, settings, results, shares, seeds, schedule, missing)
    report.print_summary(out, summary, shares, missing)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
