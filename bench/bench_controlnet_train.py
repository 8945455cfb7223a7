r"""Benchmark: ControlNet training step time on mini-BDD100K masks, for both conditioning forms.

Usage::

    python bench/bench_controlnet_train.py [--steps 20] [--frames 24] [--workers 2]          # tiny SDXL, CPU
    python -m ai.common.build_model --preset sdxl-base --out bench/_data/models/sdxl-base    # once, minutes
    python bench/bench_controlnet_train.py --preset sdxl-base --model bench/_data/models/sdxl-base \
        --precision bf16 --gradient-checkpointing --batch 1 --steps 10 [--square]   # GPU: 1344x768 [1024x1024]

Writes a mini-BDD100K (its 10K images have masks; 1280x720 frames for sdxl-base) into a temp folder, builds the
model there unless --model names one, trains in-process with latent and text caches (built before timing starts;
the first --warmup-steps are not timed), once per conditioning form, and prints a Markdown table for
bench/RESULTS.md and a JSON line: seconds per optimizer step, images per second, data wait share and peak GPU memory
(on CUDA). See bench/_train_bench.py for how the figures are taken.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _train_bench  # noqa: E402

from core.cli import run_main  # noqa: E402


def write_csv(bdd_root: Path, out: Path) -> Path:
    """The ControlNet CSV (image, conditioning_image, text) of every 10K frame that has a mask."""
    from vocab import bdd

    images = {p.stem: p for p in bdd.list_images(bdd_root / "images" / "10k" / "train")}
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "conditioning_image", "text"])
        for mask in sorted((bdd_root / "labels" / "sem_seg" / "masks" / "train").glob("*.png")):
            writer.writerow([str(images[mask.stem]), str(mask), "a dashcam photo of a city street"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _train_bench.add_arguments(parser, batch=2)
    parser.add_argument("--frames", type=int, default=24, help="mini-BDD frames (about 40 %% get masks)")
    parser.add_argument("--kinds", nargs="+", default=["palette", "one_hot"], choices=["palette", "one_hot"])
    args = parser.parse_args(argv)

    from ai.controlnet.train_controlnet_sdxl import main as train_main
    from mini_bdd.make import make_mini_bdd

    with _train_bench.TrainBench(args, prefix="bench-controlnet-") as bench:
        make_mini_bdd(bench.work / "bdd100k", frames=args.frames, size=bench.image_size, seed=0)
        train_csv = write_csv(bench.work / "bdd100k", bench.work / "train.csv")
        results = {}
        for kind in args.kinds:
            cfg = bench.config(kind, train_csv)
            cfg["controlnet"] = {"conditioning": kind, "save_dtype": "float32"}
            results[kind] = bench.train(train_main, cfg)
        bench.print_table("conditioning", results, {"method": "controlnet"})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
