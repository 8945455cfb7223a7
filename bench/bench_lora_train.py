"""Benchmark: LoRA training step time on the tiny SDXL (CPU), with and without the latent/text caches, and the
share of each step spent waiting for data (target: < 5 % with caches on).

    python bench/bench_lora_train.py [--steps 20] [--images 16] [--workers 2]

Builds the tiny model and a set of 320x180 JPEGs (BDD-like 16:9) in a temp folder, trains twice in-process
(caches off, then on; the cache is built before timing starts) and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    import yaml
    from sdxl_fixtures import make_image_csv

    from ai.common.models import build_model_folder
    from ai.lora.train_lora_sdxl import main as train_main

    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    model = build_model_folder("tiny", tmp / "tiny-sdxl")
    csv = make_image_csv(tmp / "data", n=args.images, sizes=((320, 180),))
    results = {}
    for label, cache in (("caches off", False), ("caches on", True)):
        cfg = {
            "model": {"pretrained_model": str(model)},
            "data": {
                "train_csv": str(csv),
                "resolution": 128,
                "bucket_step": 16,
                "num_workers": args.workers,
            },
            "cache": {"latents": cache, "text_embeddings": cache, "dir": str(tmp / "cache")},
            "lora": {"rank": 4, "alpha": 4},
            "train": {"max_train_steps": args.steps, "batch_size": args.batch, "mixed_precision": "no"},
            "optim": {"lr_warmup_steps": 0},
            "checkpoint": {"every_n_steps": 10_000},
            "validation": {"every_n_steps": 0},
            "log": {"report_to": "none", "every_n_steps": args.steps},
            "output": {"runs_dir": str(tmp / "runs"), "name": label.replace(" ", "_")},
        }
        path = tmp / f"{label}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        train_main(["--config", str(path)])
        rows = [
            json.loads(x)
            for x in (tmp / "runs" / cfg["output"]["name"] / "metrics.jsonl").read_text().splitlines()
        ]
        last = [r for r in rows if "sec_per_step" in r][-1]
        results[label] = last
    print(
        f"\n| setting (tiny SDXL, CPU, batch {args.batch}, {args.steps} steps, {args.workers} workers) "
        "| s/step | data wait share |"
    )
    print("|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['sec_per_step']:.3f} | {100 * r['data_wait_share']:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
