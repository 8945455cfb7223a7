r"""Benchmark: LoRA training step time, with and without the latent/text caches, the share of each step spent waiting
for data (target: < 5 % with caches on), images per second and peak GPU memory.

Usage::

    python bench/bench_lora_train.py [--steps 20] [--images 16] [--workers 2]       # tiny SDXL, CPU
    python bench/bench_lora_train.py --steps 4 --optimizer adamw8bit               # bitsandbytes' 8-bit AdamW
    python -m ai.common.build_model --preset sdxl-base --out bench/_data/models/sdxl-base    # once, minutes
    python bench/bench_lora_train.py --preset sdxl-base --model bench/_data/models/sdxl-base --precision bf16 \
        --gradient-checkpointing --rank 16 --batch 4 --caches on --steps 10 [--square]  # GPU: 1344x768 [1024x1024]

Writes JPEGs of the preset's source size (320x180 for tiny; 1280x720, the BDD frame size, for sdxl-base, which
the buckets at resolution 1024 put into 1344x768) into a temp folder, trains in-process once per cache setting (the
cache is built before timing starts; the first --warmup-steps are not timed) and prints a Markdown table for
bench/RESULTS.md and a JSON line. See bench/_train_bench.py for how the figures are taken.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]  # _train_bench; sdxl_fixtures' image writer

import _train_bench  # noqa: E402

from core.cli import run_main  # noqa: E402

CACHE_SETTINGS = {
    "caches off": False,  # VAE + both text encoders run every step
    "caches on": True,  # latents + text embeddings read from disk
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _train_bench.add_arguments(parser, batch=2)
    parser.add_argument("--images", type=int, default=16, help="training images")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument(
        "--caches", choices=["both", "on", "off"], default="both", help="cache settings to time"
    )
    args = parser.parse_args(argv)

    from sdxl_fixtures import make_image_csv

    from ai.lora.train_lora_sdxl import main as train_main

    with _train_bench.TrainBench(args, prefix="bench-lora-") as bench:
        train_csv = make_image_csv(bench.work / "data", n=args.images, sizes=(bench.image_size,))
        results = {}
        for label, caches in CACHE_SETTINGS.items():
            if args.caches in ("both", "on" if caches else "off"):
                cfg = bench.config(label.replace(" ", "_"), train_csv, caches=caches)
                cfg["lora"] = {"rank": args.rank, "alpha": args.rank}
                results[label] = bench.train(train_main, cfg)
        bench.print_table(f"setting, LoRA rank {args.rank}", results, {"method": "lora"})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
