"""The image's self-check: what the container sees, whether the GPU kernels load, one real training step.

    docker run --gpus all --rm bdd-sdxl bash docker/check.sh

Prints Python, torch and the CUDA line it was built for, the host driver, the GPU, whether xformers' and
bitsandbytes' CUDA kernels load (each is run on the GPU, not only imported), then trains one LoRA step of the tiny
SDXL through the project's own trainer (ai.lora.train_lora_sdxl) on the GPU in bf16, with xformers attention and
8-bit AdamW where those load.

Exit status: 0 all checks passed on a GPU; 1 a check failed (the lines above say which); 3 no GPU visible to torch
(a CPU-only host, or a container started without `--gpus all`): the versions are printed, nothing runs on a GPU.
``--train-on-cpu`` runs the training step on the CPU instead (full precision, SDPA, plain AdamW): the tests use
it to keep the step's code honest on machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OK, FAILED, NO_GPU = 0, 1, 3
#: The oldest Linux driver each CUDA line runs on (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER = {"12.6": "560.28", "12.8": "570.26", "13.0": "580.65"}


def show(name: str, value: object) -> None:
    print(f"  {name:<13} {value}", flush=True)


def driver_version() -> str:
    """The host driver as NVML (nvidia-ml-py, a torch dependency) or nvidia-smi reports it; both come from the
    driver that the NVIDIA container toolkit mounts into the container."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:  # no NVML library: no driver mounted
        nvml_error = f"{type(exc).__name__}: {exc}"
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return f"not found (NVML: {nvml_error}; nvidia-smi: {'failed' if smi else 'absent'})"


def check_xformers(gpu: bool) -> tuple[bool | None, str]:
    """(True/False, detail) on a GPU; (None, detail) without one (installed or not, kernels not run)."""
    try:
        import xformers
        import xformers.ops as xops
    except ImportError as exc:
        return (False if gpu else None), f"not installed ({exc})"
    if not gpu:
        return None, f"{xformers.__version__} installed; kernels not run (no GPU)"
    import torch

    q, k, v = (torch.randn(1, 64, 2, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    try:
        out = xops.memory_efficient_attention(q, k, v)
    except Exception as exc:  # NotImplementedError when the C++/CUDA extension did not load
        return False, f"{xformers.__version__}: kernels do not load ({type(exc).__name__}: {str(exc)[:300]})"
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(
        1, 2
    )
    err = (out.float() - ref.float()).abs().max().item()
    if err > 1e-2:
        return False, f"{xformers.__version__}: kernels run but disagree with SDPA (max diff {err:.3g})"
    return True, f"{xformers.__version__}: CUDA kernels load (attention matches SDPA, max diff {err:.1e})"


def check_bitsandbytes(gpu: bool) -> tuple[bool | None, str]:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return (False if gpu else None), f"not installed ({exc})"
    if not gpu:
        return None, f"{bnb.__version__} installed; kernels not run (no GPU)"
    import torch

    param = torch.nn.Parameter(torch.randn(8192, device="cuda"))  # >= 4096 values: 8-bit moments
    try:
        opt = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.randn_like(param)
        before = param.detach().clone()
        opt.step()
        torch.cuda.synchronize()
    except Exception as exc:  # the CUDA library for this torch build did not load
        return False, f"{bnb.__version__}: kernels do not load ({type(exc).__name__}: {str(exc)[:300]})"
    state = opt.state[param].get("state1")
    if state is None or state.dtype != torch.uint8 or torch.equal(before, param.detach()):
        return False, f"{bnb.__version__}: AdamW8bit ran without 8-bit state or without updating"
    return True, f"{bnb.__version__}: CUDA kernels load (AdamW8bit step with 8-bit moments)"


def write_tiny_dataset(root: Path, rows: int = 4) -> Path:
    """A few random 160x96 frames with captions, as the LoRA CSV stage 1 writes (image,text)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    lines = ["image,text"]
    for i in range(rows):
        pixels = rng.integers(0, 256, size=(96, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"frame{i}.png")
        lines.append(f"images/frame{i}.png,a city street {i} dashcam photo")
    csv = root / "train.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv


def training_step(work: Path, on_gpu: bool, xformers_ok: bool, bnb_ok: bool) -> tuple[bool, str]:
    """One optimizer step of the project's LoRA trainer on the tiny SDXL; True when it exits 0 and exports."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    if not on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU step must not find a GPU either
    model = work / "tiny-sdxl"
    build = [sys.executable, "-m", "ai.common.build_model", "--preset", "tiny", "--out", str(model)]
    built = subprocess.run(build, cwd=REPO, env=env, capture_output=True, text=True)
    if built.returncode != 0:
        return (
            False,
            f"building the tiny SDXL failed (exit {built.returncode}):\n{built.stderr.strip()[-1500:]}",
        )
    csv = write_tiny_dataset(work / "data")
    settings = (
        ["train.mixed_precision=bf16", f"train.attention={'xformers' if xformers_ok else 'sdpa'}"]
        + [f"optim.optimizer={'adamw8bit' if bnb_ok else 'adamw'}"]
        if on_gpu
        else ["train.mixed_precision=no", "train.attention=sdpa", "optim.optimizer=adamw"]
    )
    cmd = [
        sys.executable, "-m", "ai.lora.train_lora_sdxl", "--config", str(REPO / "config/demo/lora_train.yaml"),
        f"model.pretrained_model={model}", f"data.train_csv={csv}", f"cache.dir={work / 'cache'}",
        f"output.runs_dir={work / 'runs'}", "output.name=check", "output.kohya_copy=false",
        "train.max_train_steps=1", "train.batch_size=2", "checkpoint.resume_from=null",
        "checkpoint.every_n_steps=1000", "validation.every_n_steps=0", "validation.loss_rows=0",
        "log.report_to=none", *settings,
    ]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    exported = work / "runs" / "check" / "pytorch_lora_weights.safetensors"
    where = "GPU, " + ", ".join(settings) if on_gpu else "CPU, " + ", ".join(settings)
    if run.returncode != 0 or not exported.is_file():
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
        return False, f"failed ({where}; exit {run.returncode}):\n{tail}"
    return True, f"1 LoRA step of the tiny SDXL trained and exported in {seconds:.0f} s ({where})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash docker/check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-on-cpu", action="store_true", help="run the training step on the CPU")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    args = parser.parse_args(argv)

    import torch

    print("bdd-sdxl self-check", flush=True)
    show("python", f"{platform.python_version()} ({sys.executable})")
    line = torch.version.cuda
    needs = f", host driver >= {MIN_DRIVER[line]}" if line in MIN_DRIVER else ""
    show("torch", f"{torch.__version__} (built for CUDA {line or 'none: a CPU build'}{needs})")
    show("cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none")
    show("driver", driver_version())
    gpu = torch.cuda.is_available()
    if gpu:
        props = torch.cuda.get_device_properties(0)
        show(
            "GPU",
            f"{torch.cuda.device_count()} x {props.name} (compute {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB)",
        )
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        show(
            "GPU",
            f"no GPU ({why}; in Docker: run with --gpus all on a host with the NVIDIA container toolkit)",
        )
    xformers_ok, xformers_detail = check_xformers(gpu)
    show("xformers", xformers_detail)
    bnb_ok, bnb_detail = check_bitsandbytes(gpu)
    show("bitsandbytes", bnb_detail)

    step_ok = None
    if gpu or args.train_on_cpu:
        work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bdd-sdxl-check-"))
        try:
            step_ok, step_detail = training_step(
                work, gpu and not args.train_on_cpu, bool(xformers_ok), bool(bnb_ok)
            )
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        show("train step", step_detail)
    if not gpu:
        print(f"no GPU: nothing ran on a GPU (exit status {NO_GPU})", flush=True)
        return FAILED if step_ok is False else NO_GPU
    checks = {"xformers": xformers_ok, "bitsandbytes": bnb_ok, "train step": step_ok}
    failed = [name for name, ok in checks.items() if not ok]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed", flush=True)
    return FAILED if failed else OK


if __name__ == "__main__":
    sys.exit(main())
