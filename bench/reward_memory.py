r"""Memory of the consistency reward's parts at SDXL size: the decoder with gradients, and the perception model.

Usage::

    python bench/reward_memory.py [--width 1344 --height 768] [--parts vae vae_ckpt tiny yolov8s segformer_b0]

Each part runs in a fresh subprocess (random weights of the real architecture, fp32 as the reward runs them, CPU):
build the frozen module and its input, note the process's resident memory, then one forward with gradients to the
input and the backward; the part's figure is the rise of the process's resident memory (sampled every 5 ms) over
that base, i.e. what autograd keeps for the backward plus the transient buffers. On a GPU the same tensors are kept,
so this is the activation cost one rewarded image adds (weights not counted; the CPU's convolution workspaces make
it an upper bound). Prints the Markdown table of the ControlNet README's reward section.

* ``vae`` / ``vae_ckpt``: the sdxl-base VAE decoding the one-step latents (``ConsistencyReward.decode``), without /
  with diffusers' gradient checkpointing;
* ``tiny``: diffusers' ``AutoencoderTiny`` with its default (taesd / taesdxl) architecture;
* ``yolov8s`` / ``yolov8m``: ultralytics' detection model of that size (10 classes) on the decoded image, with its
  detection loss against 20 boxes (``ConsistencyReward.detection_loss``);
* ``segformer_b0`` / ``segformer_b2``: transformers' Segformer (19 labels) and its cross-entropy against a mask.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = {
    "vae": "SDXL VAE (`reward.decoder: vae`)",
    "vae_ckpt": "SDXL VAE, `reward.gradient_checkpointing: true`",
    "tiny": "`AutoencoderTiny` (`reward.decoder: tiny`, taesdxl)",
    "yolov8s": "perception: YOLOv8s, detection loss",
    "yolov8m": "perception: YOLOv8m, detection loss",
    "segformer_b0": "perception: Segformer-B0, cross-entropy",
    "segformer_b2": "perception: Segformer-B2, cross-entropy",
}
SEGFORMER = {  # transformers' SegformerConfig sizes (the mit-b0 / mit-b2 encoders)
    "segformer_b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "segformer_b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
}


def peak_rss_during(fn) -> tuple[float, float]:
    """(peak resident GB while ``fn`` runs, sampled every 5 ms in a thread; resident GB before it)."""
    import threading

    import psutil

    process, peak, done = psutil.Process(), [0.0], threading.Event()
    before = process.memory_info().rss / 2**30

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss / 2**30)
            done.wait(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], before), before


def measure(part: str, width: int, height: int) -> dict:
    """One part's forward + backward in this process: base RSS, peak rise, seconds."""
    import time

    import torch

    from ai.controlnet.reward import ConsistencyReward  # the project's decode and losses

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    image_shape = (1, 3, height, width)
    if part in ("vae", "vae_ckpt", "tiny"):
        from diffusers import AutoencoderKL, AutoencoderTiny

        from ai.common.build_model import preset_configs

        vae = AutoencoderKL.from_config(preset_configs("sdxl-base")["vae"]).float().requires_grad_(False)
        decoder = vae if part != "tiny" else AutoencoderTiny().float().requires_grad_(False)
        if part == "vae_ckpt":
            vae.enable_gradient_checkpointing()
        this = SimpleNamespace(vae=vae, decoder=decoder)
        x = torch.randn(1, 4, height // 8, width // 8, requires_grad=True)

        def step():
            ConsistencyReward.decode(this, x).mean().backward()

    elif part.startswith("yolov8"):
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(f"{part}.yaml", nc=10, verbose=False).float().eval().requires_grad_(False)
        model.args = get_cfg(overrides={})
        this = SimpleNamespace(model=model, device=torch.device("cpu"), class_ids=torch.arange(10))
        ids = torch.full((1, height, width), 255, dtype=torch.long)  # 20 boxes of 64 x 48 on a 5 x 4 grid
        for k in range(20):
            y, x0 = (k // 5) * height // 4 + 8, (k % 5) * width // 5 + 8
            ids[0, y : y + 48, x0 : x0 + 64] = k % 10
        x = torch.rand(image_shape, requires_grad=True)

        def step():
            ConsistencyReward.detection_loss(this, x, ids).backward()

    elif part in SEGFORMER:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        config = SegformerConfig(num_labels=19, **SEGFORMER[part])
        model = SegformerForSemanticSegmentation(config).float().eval().requires_grad_(False)
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        this = SimpleNamespace(
            model=model, mean=mean, std=torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        )
        ids = torch.randint(0, 19, (1, height, width))
        x = torch.rand(image_shape, requires_grad=True)

        def step():
            ConsistencyReward.segmentation_loss(this, x, ids).backward()

    else:
        raise SystemExit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    start = time.perf_counter()
    peak, base = peak_rss_during(step)
    seconds = time.perf_counter() - start
    assert x.grad is not None and torch.isfinite(x.grad).all(), "no finite gradient reached the input"
    return {"part": part, "base_gb": base, "rise_gb": peak - base, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this part in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.width, args.height)))
        return 0
    rows = []
    for part in args.parts:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            part,
            "--width",
            str(args.width),
            "--height",
            str(args.height),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{part}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{part}: +{rows[-1]['rise_gb']:.2f} GB in {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    print(
        f"\n{args.width}x{args.height}, fp32, batch 1, CPU (peak resident memory rise over the built model):\n"
    )
    print("| part | forward + backward, memory kept | time on this CPU |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {PARTS[row['part']]} | {row['rise_gb']:.2f} GB | {row['seconds']:.1f} s |")
    return 0 if len(rows) == len(args.parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
