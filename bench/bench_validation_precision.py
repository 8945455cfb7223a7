r"""GPU check: LoRA validation under fp16 / bf16 mixed precision gives finite losses and images that are not black.

The stock SDXL VAE overflows in fp16 (hence its ``force_upcast``): run inside fp16 autocast it decodes to NaN, which
PIL turns into black images, and the held-out loss becomes NaN. The trainers keep every VAE call outside autocast in
the VAE's own dtype (fp32). This check trains one step on the real architecture at one precision, validating at
steps 0 and 1, and reports the validation loss, the images' statistics and how many VAE calls ran under autocast.

Usage (one precision per process: accelerate fixes the mixed precision of a process at its first run)::

    python bench/bench_validation_precision.py --preset sdxl-base --model bench/_data/models/sdxl-base --precision fp16
    python bench/bench_validation_precision.py --precision bf16       # tiny model, CPU (fp16 needs a GPU)

Random weights cannot overflow the way trained ones do, so on them this shows the code path (no VAE call under
autocast, finite numbers), not the overflow itself; the unit test tests/test_train_numerics.py checks the same logic
on CPU. Prints one Markdown table row and a JSON line; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]  # _train_bench; sdxl_fixtures' image writer

import _train_bench  # noqa: E402

from core.cli import run_main  # noqa: E402


def count_vae_calls_under_autocast() -> dict[str, int]:
    """Wrap AutoencoderKL.encode/decode to count calls, and those made with autocast on (class-level, this process)."""
    import functools

    import torch
    from diffusers import AutoencoderKL

    counts = {"calls": 0, "under_autocast": 0}
    for name in ("encode", "decode"):
        original = getattr(AutoencoderKL, name)

        @functools.wraps(original)
        def wrapped(self, *args, _original=original, **kwargs):
            counts["calls"] += 1
            device = next(self.parameters()).device.type
            counts["under_autocast"] += int(torch.is_autocast_enabled(device))
            return _original(self, *args, **kwargs)

        setattr(AutoencoderKL, name, wrapped)
    return counts


def main(argv=None) -> int:
    import numpy as np
    from PIL import Image

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _train_bench.add_arguments(parser, batch=1)
    parser.add_argument("--images", type=int, default=4, help="training images")
    parser.add_argument(
        "--inference-steps", type=int, default=10, help="denoising steps of the validation image"
    )
    parser.set_defaults(steps=1, warmup_steps=0, workers=0)
    args = parser.parse_args(argv)

    from sdxl_fixtures import make_image_csv

    from ai.lora.train_lora_sdxl import main as train_main

    counts = count_vae_calls_under_autocast()
    with _train_bench.TrainBench(args, prefix="bench-valprec-") as bench:
        train_csv = make_image_csv(bench.work / "data", n=args.images, sizes=(bench.image_size,))
        cfg = bench.config("valprec", train_csv)
        width, height = bench.bucket
        cfg["validation"] = {
            "every_n_steps": args.steps, "prompts": ["a city street at night, wet road, dashcam photo"],
            "seeds": [0], "num_inference_steps": args.inference_steps, "width": width, "height": height,
            "loss_rows": 1,
        }  # fmt: skip
        cfg["log"]["every_n_steps"] = 1
        args.keep = True  # the run folder holds the images; TrainBench.close still removes the temp folder
        bench.train(train_main, cfg)
        run = bench.work / "runs" / "valprec"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
        images = sorted((run / "validation").rglob("*.png"))
        stats = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in images]
        means, stds = [float(a.mean()) for a in stats], [float(a.std()) for a in stats]
        checks = {
            "finite validation losses": bool(val_losses) and all(math.isfinite(v) for v in val_losses),
            "images not black": bool(stats) and min(means) > 1.0,
            "images not constant": bool(stats) and min(stds) > 1.0,
            "no VAE call under autocast": counts["calls"] > 0 and counts["under_autocast"] == 0,
        }
        print(
            f"| {bench.describe()} | {', '.join(f'{v:.4f}' for v in val_losses)} | "
            f"{min(means, default=0):.1f} / {min(stds, default=0):.1f} | "
            f"{counts['under_autocast']} of {counts['calls']} | "
            f"{'ok' if all(checks.values()) else 'FAILED: ' + ', '.join(k for k, v in checks.items() if not v)} |"
        )
        print(json.dumps({
            "precision": args.precision, "preset": args.preset, "device": _train_bench.device_name(),
            "val_losses": val_losses, "image_mean_min": min(means, default=None),
            "image_std_min": min(stds, default=None), "vae_calls": counts, "checks": checks,
        }))  # fmt: skip
        args.keep = False
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
