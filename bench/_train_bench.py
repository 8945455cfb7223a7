"""What the training benches share (bench_lora_train.py, bench_controlnet_train.py).

A bench builds the model folder of a preset into a temp folder (or reuses one, ``--model``), writes one trainer YAML
per setting, runs the trainer in-process and reads the run's ``metrics.jsonl``. The figures cover the timed steps
only: the trainer logs ``sec_per_step`` and ``data_wait_share`` as averages since the start of the run, so the row at
the end of the warm-up steps is subtracted from the last row. Peak GPU memory is ``torch.cuda.max_memory_allocated``
over the whole run (reset before it), which includes building the caches.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Per preset: default bucket base resolution, bucket step and the size of the generated source images (BDD frames
# are 1280x720, which the SDXL buckets at 1024 put into 1344x768; the tiny model's 128 base gives 160x96).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"resolution": 128, "bucket_step": 16, "image_size": (320, 180)},
    "sdxl-base": {"resolution": 1024, "bucket_step": 64, "image_size": (1280, 720)},
}


def count(minimum: int):
    """argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser, *, batch: int) -> None:
    """The options both training benches take."""
    parser.add_argument("--steps", type=count(1), default=20, help="timed optimizer steps")
    parser.add_argument(
        "--warmup-steps", type=count(0), default=2,
        help="optimizer steps run before timing starts (first-step allocations, kernel autotuning)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch", type=int, default=batch, help="batch size per optimizer step")
    parser.add_argument(
        "--preset", default="tiny", choices=list(PRESETS),
        help="model architecture (sdxl-base: the full SDXL with random weights, for a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--model", type=Path,
        help="reuse this model folder of --preset's architecture instead of building one into the temp folder "
        "(python -m ai.common.build_model --preset sdxl-base --out DIR; building sdxl-base takes minutes)",
    )  # fmt: skip
    parser.add_argument(
        "--resolution", type=int, help="bucket base resolution (default: 128 for tiny, 1024 for sdxl-base)"
    )
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"], help="mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--square", action="store_true", help="one square bucket (resolution^2) instead of aspect buckets"
    )
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (data, caches, runs)")


class TrainBench:
    """One bench invocation: its temp folder (removed on exit unless --keep) and the model folder.

    Use as ``with TrainBench(args, prefix) as bench:``.
    """

    def __init__(self, args: argparse.Namespace, prefix: str):
        from ai.common.build_model import build_model_folder
        from ai.common.data import nearest_bucket, sdxl_buckets
        from ai.common.models import check_model_folder

        self.args = args
        preset = PRESETS[args.preset]
        self.resolution = args.resolution or preset["resolution"]
        self.bucket_step = preset["bucket_step"]
        self.image_size = preset["image_size"]
        if args.square:
            self.bucket = (self.resolution, self.resolution)
        else:
            self.bucket = nearest_bucket(self.image_size, sdxl_buckets(self.resolution, self.bucket_step))
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            if args.model:
                self.model = check_model_folder(args.model)
            else:
                self.model = build_model_folder(args.preset, self.work / "model")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> TrainBench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def config(self, name: str, train_csv: Path, *, caches: bool = True) -> dict[str, Any]:
        """The trainer YAML sections both trainers share; a bench adds its method's section."""
        a = self.args
        return {
            "model": {"pretrained_model": str(self.model)},
            "data": {"train_csv": str(train_csv), "resolution": self.resolution, "bucket_step": self.bucket_step,
                     "num_workers": a.workers, "use_buckets": not a.square},
            "cache": {"latents": caches, "text_embeddings": caches, "dir": str(self.work / "cache"),
                      "dtype": "float32" if a.precision == "no" else "float16"},
            "train": {"max_train_steps": a.warmup_steps + a.steps, "batch_size": a.batch,
                      "mixed_precision": a.precision, "gradient_checkpointing": a.gradient_checkpointing},
            "optim": {"optimizer": a.optimizer, "lr_warmup_steps": 0},
            "checkpoint": {"every_n_steps": 10_000},
            "validation": {"every_n_steps": 0},
            # a timing row at the end of the warm-up and at the last step
            "log": {"report_to": "none", "every_n_steps": a.warmup_steps or a.steps},
            "output": {"runs_dir": str(self.work / "runs"), "name": name},
        }  # fmt: skip

    def train(self, train_main, cfg: dict[str, Any]) -> dict[str, Any]:
        """Run ``train_main`` on ``cfg`` in-process; return s/step, images/s, data wait share, peak GPU memory."""
        import torch
        import yaml

        from core.cli import run_main

        name = cfg["output"]["name"]
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cuda = torch.cuda.is_available()
        if cuda:  # the previous run's models must be gone, or they count in this run's peak
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        code = run_main(train_main, ["--config", str(path)])
        if code:
            raise SystemExit(code)
        run_dir = self.work / "runs" / name
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in rows if "sec_per_step" in r]
        result = window(timed, self.args.warmup_steps)
        result["images_per_s"] = self.args.batch / result["sec_per_step"]
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if cuda:  # memory still held from an earlier run in this process (0 when nothing leaked)
            result["baseline_gib"] = baseline / 2**30
        if not self.args.keep:  # an sdxl-base ControlNet checkpoint (weights + optimizer state) is ~15 GB
            shutil.rmtree(run_dir)
        return result

    def describe(self) -> str:
        """Preset, device, precision, bucket, batch and the rest, for a table's first header cell."""
        a = self.args
        parts = [
            a.preset,
            device_name(),
            "fp32" if a.precision == "no" else a.precision,
            f"{self.bucket[0]}x{self.bucket[1]}",
            f"batch {a.batch}",
            a.optimizer,
            *(["gradient checkpointing"] if a.gradient_checkpointing else []),
            f"{a.steps} steps after {a.warmup_steps} warm-up",
            f"DataLoader workers: {a.workers}",
        ]
        return ", ".join(parts)

    def print_table(self, label: str, results: dict[str, dict[str, Any]], extra: dict[str, Any]) -> None:
        """A Markdown table for bench/RESULTS.md, then one JSON line with every setting and figure."""
        print(f"\n| {label} ({self.describe()}) | s/step | images/s | data wait share | peak GPU memory |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
            print(
                f"| {name} | {r['sec_per_step']:.3f} | {r['images_per_s']:.2f} | "
                f"{100 * r['data_wait_share']:.1f} % | {peak} |"
            )
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()}
        print(
            json.dumps(
                {**settings, **extra, "device": device_name(), "bucket": self.bucket, "results": results}
            )
        )

    def close(self) -> None:
        if self.args.keep:
            print(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def window(timed_rows: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """s/step and data wait share over the steps after ``warmup``, from the trainer's since-start averages."""
    last = timed_rows[-1]
    total = last["sec_per_step"] * last["step"]
    data = last["data_wait_share"] * total
    steps = last["step"]
    if warmup:
        first = next(r for r in timed_rows if r["step"] == warmup)
        before = first["sec_per_step"] * warmup
        total, data, steps = total - before, data - first["data_wait_share"] * before, steps - warmup
    return {"sec_per_step": total / steps, "data_wait_share": data / total}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"
