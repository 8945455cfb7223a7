"""Benchmark SDXL generation: seconds per image at N steps, for a model preset built in memory (no downloads).

Runs the same pipeline set-up as ai/lora/infer_lora_sdxl.py (scheduler by name, speed switches, one CPU generator
per image), with random weights of the chosen architecture. Optionally it adds a LoRA of the given rank, either as
separate layers or fused into the weights.

Usage:
    python bench/bench_inference.py                                   # tiny preset, CPU, 128x128, 30 steps
    python bench/bench_inference.py --preset sdxl-base --device cuda --dtype bf16 --width 1024 --height 1024 \
        --steps 30 --images 4 --lora-rank 16                          # the GPU reference figure
    python bench/bench_inference.py --preset sdxl-base --device cuda --dtype bf16 --channels-last --compile
    python bench/bench_inference.py --preset sdxl-base --device cuda --dtype bf16 --controlnet palette   # vs plain

Prints one markdown table row (for bench/RESULTS.md) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "sdxl-base"), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument(
        "--width", type=int, default=None, help="default: the preset's native size (128 tiny, 1024 SDXL)"
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5, help="> 1 runs the UNet on 2x batch (CFG)")
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--images", type=int, default=4, help="images timed (after one warm-up batch)")
    p.add_argument(
        "--lora-rank", type=int, default=0, help="add a random LoRA of this rank to the UNet (0: none)"
    )
    p.add_argument("--fuse-lora", action="store_true", help="fuse the LoRA into the weights")
    p.add_argument(
        "--controlnet", choices=("palette", "one_hot"), default=None,
        help="add a ControlNet (copied from the UNet, random zero-conv weights) taking this mask form",
    )  # fmt: skip
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (warm-up includes compiling)"
    )
    p.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def add_random_lora(pipe, rank: int, fuse: bool) -> None:
    import torch
    from peft import LoraConfig

    pipe.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        adapter_name="bench",
    )
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    if fuse:
        pipe.fuse_lora(components=["unet"])
        pipe.unet.delete_adapters("bench")


def add_random_controlnet(pipe, kind: str):
    """Wrap ``pipe`` into a StableDiffusionXLControlNetPipeline with a ControlNet copied from its UNet."""
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline

    from ai.controlnet import control

    controlnet = control.build_controlnet(pipe.unet, kind).to(pipe.unet.device, pipe.unet.dtype)
    with (
        torch.no_grad()
    ):  # zero convolutions would let nothing through; the cost is the same, the numbers real
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) and param.ndim > 1:
                param.normal_(std=0.01)
    return StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet)


def main(argv=None) -> int:
    import torch

    from ai.common.build_model import build_pipeline
    from ai.common.generation import GenerationConfig, PromptEntry, Speed, build_work_items
    from ai.common.pipelines import (
        apply_speed_switches,
        call_pipeline,
        make_scheduler,
        native_size,
        torch_dtype,
    )

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    with torch.device(device):  # random init directly on the device (minutes faster for sdxl-base)
        pipe = build_pipeline(args.preset)
    pipe.to(device=device, dtype=torch_dtype(args.dtype))
    build_s = time.perf_counter() - t0
    native = native_size(pipe.unet, pipe.vae)
    width, height = args.width or native, args.height or native
    if args.lora_rank:
        add_random_lora(pipe, args.lora_rank, args.fuse_lora)
    extra = {}
    if args.controlnet:
        from ai.controlnet import conditioning

        pipe = add_random_controlnet(pipe, args.controlnet)
        ids = torch.randint(0, 19, (height, width), dtype=torch.uint8).numpy()
        cond = conditioning.ids_to_tensor(ids, args.controlnet)[None]
        extra["image"] = cond.expand(args.batch_size, -1, -1, -1).to(device, torch_dtype(args.dtype))
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler)
    apply_speed_switches(
        pipe,
        Speed(attention=args.attention, channels_last=args.channels_last, torch_compile=args.compile),
        device,
    )
    pipe.set_progress_bar_config(disable=True)
    cfg = GenerationConfig(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        resolution={"width": width, "height": height},
        dtype=args.dtype,
    )
    prompt = PromptEntry("a city street at night, wet road, traffic lights, dashcam photo")
    items = build_work_items([prompt], args.batch_size + args.images, seed=0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    call_pipeline(pipe, items[: args.batch_size], cfg, **extra)  # warm-up (and compile)
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = items[args.batch_size :]
    t0 = time.perf_counter()
    for begin in range(0, len(timed), args.batch_size):
        call_pipeline(pipe, timed[begin : begin + args.batch_size], cfg, **extra)
    sync()
    seconds = time.perf_counter() - t0
    per_image = seconds / len(timed)
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "width": width,
        "height": height,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "batch_size": args.batch_size,
        "lora_rank": args.lora_rank,
        "fuse_lora": args.fuse_lora,
        "controlnet": args.controlnet,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "images": len(timed),
        "s_per_image": round(per_image, 4),
        "images_per_s": round(1 / per_image, 3),
        "ms_per_step": round(1000 * per_image / args.steps, 2),
        "warmup_s": round(warmup_s, 2),
        "build_s": round(build_s, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "load_avg_1min": round(os.getloadavg()[0], 2),  # CPU figures on a shared machine depend on it
    }
    lora = f"r{args.lora_rank}{' fused' if args.fuse_lora else ''}" if args.lora_rank else "none"
    switches = ", ".join(k for k in ("channels_last", "compile") if result[k]) or "-"
    if args.controlnet:
        switches = f"ControlNet ({args.controlnet})" + ("" if switches == "-" else f", {switches}")
    print(
        f"| {result['device']} | {args.preset} | {width}x{height} | {args.steps} | {args.dtype} | {args.batch_size} | "
        f"{lora} | {switches} | {per_image:.3f} | {result['ms_per_step']} | {result['peak_mem_gib'] or '-'} |"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
