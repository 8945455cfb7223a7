"""Throughput of annotation/yolo_annotate_folders.py against a plain per-image predict() loop, same folder and model.

Usage::

    python bench/bench_annotation.py [--frames 32] [--size 640x360] [--model yolov8n.yaml] [--imgsz 640]
        [--batch 8] [--device cpu] [--work bench/_data/annotation]

The folder is a mini-BDD100K (convert/make_mini_bdd.py) at --size. The default model is the yolov8n architecture
with random weights (offline; its speed is that of the trained model, it just finds nothing above conf): pass a
real .pt for realistic detection counts. Prints one markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from core.cli import run_main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", default="640x360")
    p.add_argument("--model", default="yolov8n.yaml")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="bench/_data/annotation")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    size = tuple(int(v) for v in args.size.lower().split("x"))

    from annotation import yolo_runtime

    yolo_runtime.prepare_offline(work / ".ultralytics")
    from mini_bdd.make import make_mini_bdd
    from vocab import bdd

    data = work / f"mini_bdd_{args.frames}_{size[0]}x{size[1]}"
    make_mini_bdd(data, frames=args.frames, size=size, seed=0)
    images = bdd.list_images(data / "images" / "100k" / "train")
    folder = work / "input"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(data / "images" / "100k" / "train", folder)

    # plain loop: one predict() call per image
    loaded = yolo_runtime.load_model(args.model)
    kw = dict(imgsz=args.imgsz, conf=0.1, device=args.device, verbose=False)
    loaded.model.predict(str(images[0]), **kw)  # warm-up, not timed
    t0 = time.perf_counter()
    n_boxes = 0
    for image in images:
        n_boxes += len(loaded.model.predict(str(image), **kw)[0].boxes)
    plain = len(images) / (time.perf_counter() - t0)

    # the annotation script: batched, streamed, plus hashing, decode checks, labels, previews, manifests
    from annotation.yolo_annotate_folders import main as annotate

    out = work / "output"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--input_folder", str(folder), "--output_folder", str(out), "--model", args.model]
    argv += ["--imgsz", str(args.imgsz), "--batch", str(args.batch), "--device", str(args.device)]
    t0 = time.perf_counter()
    code = run_main(annotate, argv)
    total = time.perf_counter() - t0
    if code:
        return code
    summary = json.loads((out / "summary.json").read_text())
    t0 = time.perf_counter()
    run_main(annotate, argv)  # rerun: everything skipped
    rerun = time.perf_counter() - t0

    import torch

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")  # fmt: skip
    print(f"folder: {len(images)} images {size[0]}x{size[1]}, model {args.model}, imgsz {args.imgsz}")
    print()
    print("| method | images/s | notes |")
    print("|---|---|---|")
    print(
        f"| plain loop, one predict() per image | {plain:.2f} | predict only, {n_boxes} boxes at conf 0.1 |"
    )
    print(
        f"| yolo_annotate_folders.py, batch {args.batch} | {summary['images_per_second']:.2f} | inference loop incl. "
        f"hashing and decode checks; whole run {len(images) / total:.2f} images/s incl. model load, labels, "
        f"previews, manifests ({total:.1f} s) |"
    )
    print(f"| rerun (all skipped) | - | {rerun:.1f} s for {len(images)} images |")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
