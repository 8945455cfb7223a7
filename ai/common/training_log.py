"""Training logs shared by the trainers: trackers, start banner, metrics file, loss curve, NaN guard, images.

* Trackers: TensorBoard by default (``runs/<name>/logs``), Weights & Biases when ``report_to: wandb``. The W&B
  key is read by wandb itself from the environment (``WANDB_API_KEY``, e.g. from ``.env``); it is never read,
  logged or stored here.
* ``metrics.jsonl`` in the run folder: one JSON object per logged step (loss, its named terms such as ``diffusion``
  and ``reward``, lr, val_loss, ...), plus
  ``loss_curve.png`` redrawn at each checkpoint and at the end.
* :func:`check_finite` stops the run on a NaN/inf loss with a message that names the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from core import report
from core.cli import UserError

logger = logging.getLogger(__name__)


#: Named parts of a training loss that :meth:`MetricsLog.plot` draws in a panel of their own.
LOSS_TERMS: tuple[str, ...] = ("diffusion", "reward")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def trackers_for(report_to: str) -> list[str]:
    """accelerate ``log_with`` list for ``report_to`` (tensorboard | wandb | none); checks wandb's setup early."""
    if report_to == "none":
        return []
    if report_to == "wandb":
        mode = os.environ.get("WANDB_MODE", "")
        if mode not in ("offline", "disabled") and not os.environ.get("WANDB_API_KEY"):
            raise UserError(
                "log.report_to=wandb needs WANDB_API_KEY in the environment (put it in .env, see .env.example), "
                "or WANDB_MODE=offline; or set log.report_to=tensorboard"
            )
    return [report_to]


def banner(log: logging.Logger, title: str, items: dict[str, Any]) -> None:
    width = max(len(k) for k in items)
    log.info("***** %s *****", title)
    for key, value in items.items():
        log.info("  %s = %s", key.ljust(width), value)


def check_finite(loss: float, step: int, last_checkpoint: Path | None) -> None:
    if math.isfinite(loss):
        return
    keep = (
        f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
    )
    raise TrainingDiverged(
        f"loss is {loss} at step {step}; training stopped ({keep}). Try a lower optim.learning_rate, "
        "train.mixed_precision=bf16 instead of fp16, an fp16-safe VAE (model.vae), or optim.max_grad_norm"
    )


class MetricsLog:
    """Appends metrics to ``metrics.jsonl`` and draws ``loss_curve.png`` (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss_curve.png"
        self.enabled = enabled
        if enabled and resume_step and self.path.is_file():  # drop entries the resumed run will redo
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln)["step"] <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif enabled and not resume_step and self.path.exists():
            self.path.unlink()

    def log(self, step: int, **values: float) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

    def plot(self) -> None:
        if not self.enabled:
            return
        rows = self.read()
        has_gap = any("control_gap" in r for r in rows)  # ControlNet: plot the fidelity gap beside the loss
        has_terms = any(k in r for r in rows for k in LOSS_TERMS)  # a loss of several terms: each on its own
        panels = 1 + has_gap + has_terms
        fig, axes = report.subplots(1, panels, figsize=(5 + 5 * panels, 4), squeeze=False)
        ax = axes[0][0]
        for key, style in (("loss", "-"), ("loss_avg", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=key, alpha=0.4 if key == "loss" else 1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        if has_gap:
            gap_ax = axes[0][1]
            pts = [(r["step"], r["control_gap"]) for r in rows if "control_gap" in r]
            gap_ax.plot(*zip(*pts, strict=True), "o-", color="tab:green", label="blank - real condition")
            gap_ax.axhline(0.0, color="grey", lw=0.8)
            gap_ax.set_xlabel("step")
            gap_ax.set_ylabel("held-out loss gap")
            gap_ax.set_title("control fidelity: > 0 means the condition is followed")
            gap_ax.grid(alpha=0.3)
            gap_ax.legend()
        if has_terms:  # the terms differ in scale (a detector's loss vs an MSE): one axis each
            term_ax = axes[0][panels - 1]
            for i, key in enumerate(k for k in LOSS_TERMS if any(k in r for r in rows)):
                ax_k = term_ax if i == 0 else term_ax.twinx()
                pts = [(r["step"], r[key]) for r in rows if key in r]
                ax_k.plot(*zip(*pts, strict=True), ".-", color=f"C{i + 1}", label=key, alpha=0.7)
                ax_k.set_ylabel(key, color=f"C{i + 1}")
            term_ax.set_xlabel("step")
            term_ax.set_title("loss terms (each on its own axis)")
            term_ax.grid(alpha=0.3)
        report.save_figure(fig, self.png, dpi=100, bbox_inches="tight")


def log_images(accelerator, images: list, prompts: list[str], step: int) -> None:
    """Send validation images to the active trackers.

    TensorBoard: one tag per image (``validation/00``, ``validation/01``, ...) with its own step slider, so images
    of different sizes (mixed buckets) each keep theirs, and one image is compared with itself across steps; the
    prompts go to ``validation/prompts`` as text.
    """
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, image in enumerate(images):
                pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
                tracker.writer.add_image(f"validation/{i:02d}", pixels, step, dataformats="HWC")
            tracker.writer.add_text(
                "validation/prompts", "\n\n".join(f"{i:02d}: {p}" for i, p in enumerate(prompts)), step
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Image(i, caption=p) for i, p in zip(images, prompts, strict=True)]},
                step=step,
            )
