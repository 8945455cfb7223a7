"""Benchmark: ControlNet training step time on mini-BDD100K masks, for both conditioning forms.

    python bench/bench_controlnet_train.py [--steps 20] [--frames 24] [--workers 2]
    python bench/bench_controlnet_train.py --preset sdxl-base --resolution 1024 --precision bf16 --steps 20   # GPU

Writes a mini-BDD100K (its 10K images have masks) and the model (tiny by default; ``sdxl-base`` is the full SDXL
architecture with random weights, for a GPU) into a temp folder, trains in-process with latent and text caches
(built before timing starts), once per conditioning form, and prints a Markdown table for bench/RESULTS.md:
seconds per optimizer step, images per second, data wait share and peak GPU memory (on CUDA).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_csv(bdd_root: Path, out: Path) -> Path:
    from convert import bdd

    images = {p.stem: p for p in bdd.list_images(bdd_root / "images" / "10k" / "train")}
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "conditioning_image", "text"])
        for mask in sorted((bdd_root / "labels" / "sem_seg" / "masks" / "train").glob("*.png")):
            writer.writerow([str(images[mask.stem]), str(mask), "a dashcam photo of a city street"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=24, help="mini-BDD frames (about 40 %% get masks)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sdxl-base"])
    parser.add_argument(
        "--resolution", type=int, default=128, help="bucket base resolution (1024 for sdxl-base)"
    )
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--square", action="store_true", help="one square bucket (resolution^2) instead of buckets"
    )
    parser.add_argument("--kinds", nargs="+", default=["palette", "one_hot"])
    args = parser.parse_args(argv)

    import torch
    import yaml

    from ai.common.models import build_model_folder
    from ai.controlnet.train_controlnet_sdxl import main as train_main
    from convert.make_mini_bdd import make_mini_bdd

    tmp = Path(tempfile.mkdtemp(prefix="bench-controlnet-"))
    model = build_model_folder(args.preset, tmp / "model")
    size = (1280, 720) if args.preset == "sdxl-base" else (320, 180)
    make_mini_bdd(tmp / "bdd100k", frames=args.frames, size=size, seed=0)
    train_csv = write_csv(tmp / "bdd100k", tmp / "train.csv")
    results = {}
    for kind in args.kinds:
        cfg = {
            "model": {"pretrained_model": str(model)},
            "data": {"train_csv": str(train_csv), "resolution": args.resolution,
                     "bucket_step": 16 if args.preset == "tiny" else 64, "num_workers": args.workers,
                     "use_buckets": not args.square},
            "cache": {"dir": str(tmp / "cache"), "dtype": "float32" if args.precision == "no" else "float16"},
            "controlnet": {"conditioning": kind, "save_dtype": "float32"},
            "train": {"max_train_steps": args.steps, "batch_size": args.batch, "mixed_precision": args.precision,
                      "gradient_checkpointing": args.gradient_checkpointing},
            "optim": {"lr_warmup_steps": 0},
            "checkpoint": {"every_n_steps": 10_000},
            "validation": {"every_n_steps": 0},
            "log": {"report_to": "none", "every_n_steps": args.steps},
            "output": {"runs_dir": str(tmp / "runs"), "name": kind},
        }  # fmt: skip
        path = tmp / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        train_main(["--config", str(path)])
        rows = [json.loads(x) for x in (tmp / "runs" / kind / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "sec_per_step" in r][-1]
        last["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        results[kind] = last
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\n| conditioning ({args.preset}, {device}, {args.precision}, base {args.resolution}px, batch {args.batch}, "
        f"{args.steps} steps) | s/step | images/s | data wait share | peak GPU memory |"
    )
    print("|---|---|---|---|---|")
    for kind, r in results.items():
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        print(
            f"| {kind} | {r['sec_per_step']:.3f} | {args.batch / r['sec_per_step']:.2f} | "
            f"{100 * r['data_wait_share']:.1f} % | {peak} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
