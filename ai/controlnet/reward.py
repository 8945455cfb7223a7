"""Perception-consistency reward for the layout ControlNets (ControlNet++, ECCV 2024).

A frozen perception model reads the image the ControlNet would produce and is penalised when it does not recover the
layout that conditioned it. To keep it affordable the image is decoded from the *one-step* clean-latent estimate of
the training forward pass (``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``, or ``sqrt(a) x_t - sqrt(1 - a) v``), not from
a sampling chain, and only for samples whose timestep is at most ``reward.max_timestep`` (at high noise the one-step
estimate is a blur that no detector reads; those samples contribute zero).

* box layouts (``controlnet.layout: boxes``): a YOLO detector (ultralytics weights, e.g. stage 4's) and its own
  detection loss (``DetectionModel.loss``: box, class and DFL terms) against the layout's boxes. The boxes are read
  back from the layout itself: each connected region of a class id, with the outline pixels that touch it (a box
  cut in two by a smaller box on top of it reads as two boxes: a small approximation, the layout is what the
  ControlNet sees).
* segmentation layouts (``controlnet.layout: seg``): a transformers semantic-segmentation model (a local folder,
  e.g. Segformer) with the 19 Cityscapes trainIds; the reward is the cross-entropy of its logits, upsampled to the
  mask, against the mask (255 ignored).

The decoder is the full SDXL VAE or diffusers' ``AutoencoderTiny`` (``reward.decoder: tiny``, far less memory);
both and the perception model are frozen (``requires_grad`` off, outside the optimizer and the checkpoints), so the
gradient of the reward reaches only the ControlNet, through the UNet's prediction.

The config checks (:func:`check_reward`) read only files, plus the YOLO weights' class names (ultralytics loads
them); :class:`ConsistencyReward` is built by the trainer and called on each forward pass.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from core.cli import UserError
from core.config import Section
from vocab import bdd, box_layout, layouts

logger = logging.getLogger(__name__)

#: Cityscapes trainIds of BDD100K's sem_seg masks: what a segmentation model for the reward must predict.
SEG_LABELS = len(bdd.SEG_CLASSES)
#: ImageNet statistics: the normalisation of most segmentation backbones when the folder has no preprocessor file.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: The detector's input sides must be multiples of its largest stride.
YOLO_STRIDE = 32


class RewardConfig(Section):
    model: str | None = None  # None: no reward; a YOLO .pt (box layouts) or a transformers folder (masks)
    weight: float = Field(0.5, ge=0)  # loss = diffusion + weight * reward
    max_timestep: int = Field(200, ge=0)  # only samples with timestep <= this get the reward
    every_n_steps: int = Field(1, ge=1)  # the reward on every n-th optimizer step (from start_step on)
    start_step: int = Field(0, ge=0)  # first optimizer step with the reward
    decoder: Literal["vae", "tiny"] = "vae"  # the model's VAE, or an AutoencoderTiny (tiny_decoder)
    tiny_decoder: str | None = None  # a local diffusers AutoencoderTiny folder (e.g. taesdxl)
    gradient_checkpointing: bool = False  # recompute the decoder's activations in backward

    @property
    def enabled(self) -> bool:
        return self.model is not None

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based, the one being computed) gets the reward."""
        return self.enabled and step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0


# ---------------------------------------------------------------------------------------------------------------
# Checks (before accelerate starts)
# ---------------------------------------------------------------------------------------------------------------


def perception_kind(layout: str) -> str:
    """``detector`` for box layouts, ``segmenter`` for layouts of Cityscapes trainIds."""
    if layout == "boxes":
        return "detector"
    if layouts.get(layout).cityscapes_ids:
        return "segmenter"
    raise UserError(
        f"reward.model: no perception reward for controlnet.layout={layout}; set reward.model=null"
    )


def class_map(names: dict[int, str], source: str) -> list[int]:
    """For each box-layout class (vocab/box_layout.py's order) the detector's class id of the same name (det_20
    names; the legacy person/bike/motor read as theirs). Every layout class must be there."""
    found: dict[str, int] = {}
    for i, name in sorted(names.items()):
        key = str(name).strip().lower()
        key = key if key in box_layout.BOX_CLASS_ID else bdd.LEGACY_NAME_MAP.get(key, key)
        if key in box_layout.BOX_CLASS_ID:
            found.setdefault(key, int(i))
    missing = [c for c in box_layout.BOX_CLASSES if c not in found]
    if missing:
        raise UserError(
            f"reward.model {source}: its classes {sorted(names.values())} lack {len(missing)} of the box layout's "
            f"classes ({', '.join(missing)}); the reward needs a detector of the 10 BDD100K classes "
            f"({', '.join(box_layout.BOX_CLASSES)}), e.g. stage 4's weights or annotation.train_demo_detector's"
        )
    return [found[c] for c in box_layout.BOX_CLASSES]


def _read_json(path: Path, key: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot read {path}: {exc}") from None


def check_reward(cfg: RewardConfig, layout: str) -> None:
    """Missing files, a detector whose classes do not map to the layout's, a segmenter without the 19 trainIds, a
    missing tiny decoder: clear errors before anything trains."""
    if not cfg.enabled:
        return
    path = Path(cfg.model).expanduser()
    if perception_kind(layout) == "detector":
        if not path.is_file():
            raise UserError(
                f"reward.model: YOLO weights not found: {path} (box layouts take an ultralytics detector .pt of the "
                "10 BDD100K classes, e.g. stage 4's or `python -m annotation.train_demo_detector`'s)"
            )
        class_map(load_detector(path).names, str(path))
    else:
        config = path / "config.json"
        if not config.is_file():
            raise UserError(
                f"reward.model: {path} is not a transformers model folder (no config.json); masks take a local "
                "semantic-segmentation model (AutoModelForSemanticSegmentation, e.g. a Segformer) of the 19 "
                "Cityscapes trainIds"
            )
        c = _read_json(config, "reward.model")
        n = c.get("num_labels", len(c.get("id2label", {})) or None)
        if n != SEG_LABELS:
            raise UserError(
                f"reward.model {path}: the model predicts {n} labels, but BDD100K masks hold the {SEG_LABELS} "
                "Cityscapes trainIds (0-18): use a model trained on Cityscapes or BDD100K sem_seg"
            )
    if cfg.decoder == "tiny":
        if not cfg.tiny_decoder:
            raise UserError(
                "reward.decoder=tiny needs reward.tiny_decoder (a local AutoencoderTiny folder, e.g. taesdxl)"
            )
        config = Path(cfg.tiny_decoder).expanduser() / "config.json"
        if not config.is_file():
            raise UserError(
                f"reward.tiny_decoder: not a diffusers model folder (no config.json): {cfg.tiny_decoder}"
            )
        name = _read_json(config, "reward.tiny_decoder").get("_class_name")
        if name != "AutoencoderTiny":
            raise UserError(f"reward.tiny_decoder {cfg.tiny_decoder} is a {name}, not an AutoencoderTiny")


def load_detector(path: Path):
    """The ultralytics DetectionModel in ``path`` (its own loader: weights of any ultralytics version it reads).

    Offline like stage 4 (annotation/yolo_runtime.py): ultralytics reads its switches at first import. Its
    process-wide ``PIL.Image.open`` patch is undone: offline it turns the training data's corrupt-image errors into
    a failed pi-heif install."""
    import os

    for key, value in (("YOLO_OFFLINE", "true"), ("YOLO_AUTOINSTALL", "false"),
                       ("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1"), ("YOLO_VERBOSE", "false")):  # fmt: skip
        os.environ.setdefault(key, value)
    from PIL import Image
    from ultralytics import YOLO
    from ultralytics.utils import patches

    if getattr(patches, "_image_open", None) is not None:
        Image.open = patches._image_open

    try:
        yolo = YOLO(str(Path(path).resolve()), task="detect")
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise UserError(
            f"reward.model: cannot load YOLO weights {path}: {type(exc).__name__}: {exc}"
        ) from None
    if getattr(yolo, "task", "detect") != "detect":
        raise UserError(f"reward.model {path} is a {yolo.task} model; box layouts need a detection model")
    return yolo.model


# ---------------------------------------------------------------------------------------------------------------
# Layout -> targets
# ---------------------------------------------------------------------------------------------------------------


def ids_from_condition(cond, kind: str, layout: str):
    """The label ids (B, H, W) int64 of condition tensors (B, C, H, W), exactly: the inverse of
    :func:`ai.controlnet.conditioning.ids_to_tensor` (one-hot: the set channel; palette: the id of the colour;
    all-zero / black: 255)."""
    import torch

    spec = layouts.get(layout)
    n = spec.one_hot_channels
    if kind == "one_hot":
        ids = cond.argmax(1)
        return torch.where(cond.amax(1) > 0.5, ids, torch.full_like(ids, 255))
    colours = torch.as_tensor(spec.palette[:n].astype("float32") / 255.0, device=cond.device)  # (n, 3)
    dist = (cond[:, None] - colours[None, :, :, None, None]).abs().amax(2)  # (B, n, H, W)
    best, ids = dist.min(1)
    return torch.where(best < 1e-3, ids, torch.full_like(ids, 255))


def layout_boxes(ids) -> list[tuple[int, float, float, float, float]]:
    """Boxes ``(class, x1, y1, x2, y2)`` (pixel edges) of a box layout's ids (H, W): each connected region of a class
    with the outline pixels within 3 px of it (outlines are drawn inside a box's edges)."""
    import cv2
    import numpy as np

    arr = np.asarray(ids, dtype=np.uint8)
    outline = arr == box_layout.BOUNDARY_ID
    kernel = np.ones((7, 7), np.uint8)
    h, w = arr.shape
    out = []
    for c in np.unique(arr):
        if c >= box_layout.NUM_BOX_CLASSES:
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats((arr == c).astype(np.uint8), connectivity=4)
        for k in range(1, n):
            x, y, bw, bh, _ = stats[k]
            x0, y0, x1, y1 = max(x - 3, 0), max(y - 3, 0), min(x + bw + 3, w), min(y + bh + 3, h)
            region = (labels[y0:y1, x0:x1] == k).astype(np.uint8)
            grown = region | (cv2.dilate(region, kernel) & outline[y0:y1, x0:x1])
            ys, xs = np.nonzero(grown)
            out.append((int(c), float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1),
                        float(y0 + ys.max() + 1)))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------------------------


def clean_estimate(out, scheduler, prediction_type: str):
    """The one-step estimate of the clean latents x0 from a forward pass (:class:`ai.common.trainer.Denoised`)."""
    import torch

    a = scheduler.alphas_cumprod.to(out.pred.device, torch.float32)[out.timesteps].view(-1, 1, 1, 1)
    pred, noisy = out.pred.float(), out.noisy.float()
    if prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * pred) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * pred
    raise ValueError(f"unknown prediction type {prediction_type!r}")


class ConsistencyReward:
    """Decoder + frozen perception model; ``reward(batch, out)`` is the batch's reward term (unweighted)."""

    def __init__(
        self, cfg: RewardConfig, layout: str, kind: str, vae, scheduler, device, prediction_type: str
    ):
        import torch

        self.cfg, self.layout, self.kind, self.device = cfg, layout, kind, device
        self.scheduler, self.prediction_type = scheduler, prediction_type
        self.perception = perception_kind(layout)
        self.vae = vae
        if cfg.decoder == "tiny":
            from diffusers import AutoencoderTiny

            self.decoder = AutoencoderTiny.from_pretrained(cfg.tiny_decoder).to(device, torch.float32)
        else:
            self.decoder = vae  # the run's own VAE, in its dtype
        self.decoder.requires_grad_(False)
        if cfg.gradient_checkpointing:
            self.decoder.enable_gradient_checkpointing()
        path = Path(cfg.model).expanduser()
        if self.perception == "detector":
            from ultralytics.cfg import get_cfg

            model = load_detector(path)
            self.class_ids = torch.tensor(class_map(model.names, str(path)), device=device)
            # the loss reads its gains (box, cls, dfl) as attributes; the checkpoint stores them as a dict
            args = model.args if isinstance(model.args, dict) else vars(model.args) if model.args else {}
            model.args = get_cfg(overrides={k: v for k, v in args.items() if k in ("box", "cls", "dfl")})
        else:
            from transformers import AutoModelForSemanticSegmentation

            model = AutoModelForSemanticSegmentation.from_pretrained(path)
            pre = path / "preprocessor_config.json"
            stats = _read_json(pre, "reward.model") if pre.is_file() else {}
            mean, std = stats.get("image_mean", IMAGENET_MEAN), stats.get("image_std", IMAGENET_STD)
            self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.model = model.to(device, torch.float32).eval().requires_grad_(False)

    def modules(self) -> list:
        """The frozen models the reward adds (the decoder when it is not the run's VAE, the perception model)."""
        return [m for m in (self.decoder, self.model) if m is not self.vae]

    def decode(self, x0):
        """Scaled clean latents -> RGB in [0, 1], with gradients to the latents (frozen decoder, fp32 output)."""
        from ai.common import diffusion
        from ai.common.validation import vae_precision

        if self.decoder is self.vae:
            with vae_precision(self.vae):
                z = diffusion.unscale_latents(self.vae.config, x0).to(self.vae.dtype)
                image = self.vae.decode(z).sample
        else:  # AutoencoderTiny decodes the UNet's latents divided by its own scaling factor (1 for taesdxl)
            image = self.decoder.decode(x0 / self.decoder.config.scaling_factor).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    def __call__(self, batch: dict, out):
        """Mean over the batch of each sample's perception loss, zero for samples above ``max_timestep``."""
        import torch

        selected = (out.timesteps <= self.cfg.max_timestep).nonzero().flatten()
        bsz = out.timesteps.shape[0]
        if selected.numel() == 0:
            return torch.zeros((), device=out.pred.device)
        x0 = clean_estimate(out, self.scheduler, self.prediction_type)[selected]
        ids = ids_from_condition(
            batch["conditioning"].float().to(self.device)[selected], self.kind, self.layout
        )
        image = self.decode(x0)
        with torch.autocast(self.device.type, enabled=False):
            if self.perception == "detector":
                loss = self.detection_loss(image, ids)
            else:
                loss = self.segmentation_loss(image, ids)
        return loss * (selected.numel() / bsz)

    def reading(self, image):
        """What the perception model reads in a generated PIL image, for the validation sheets: its detections
        drawn over the image (boxes), or its segmentation blended over it (masks)."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image, ImageDraw

        rgb = image.convert("RGB")
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            if self.perception == "detector":
                from ultralytics.utils.nms import non_max_suppression

                h, w = x.shape[-2:]
                size = (-(-h // YOLO_STRIDE) * YOLO_STRIDE, -(-w // YOLO_STRIDE) * YOLO_STRIDE)
                pred = self.model(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
                found = non_max_suppression(pred[0] if isinstance(pred, tuple | list) else pred, 0.25, 0.7)[0]
                out, (sx, sy) = rgb.copy(), (w / size[1], h / size[0])
                draw = ImageDraw.Draw(out)
                for x1, y1, x2, y2, conf, c in found.cpu().tolist():
                    draw.rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=(255, 48, 48), width=2)
                    draw.text(
                        (x1 * sx + 2, y1 * sy + 1),
                        f"{self.model.names[int(c)]} {conf:.2f}",
                        fill=(255, 48, 48),
                    )
                return out
            logits = self.model(pixel_values=(x - self.mean) / self.std).logits
            ids = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).argmax(1)[0]
        from ai.controlnet.conditioning import ids_to_preview

        return Image.blend(
            rgb, ids_to_preview(ids.cpu().numpy().astype(np.uint8), self.layout).convert("RGB"), 0.5
        )

    def detection_loss(self, image, ids):
        """ultralytics' detection loss (box + class + DFL, gains from the checkpoint) against the layout's boxes."""
        import torch
        import torch.nn.functional as F

        h, w = image.shape[-2:]
        size = (-(-h // YOLO_STRIDE) * YOLO_STRIDE, -(-w // YOLO_STRIDE) * YOLO_STRIDE)
        if size != (h, w):  # boxes are normalised, so a resize keeps them
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        rows = []
        ih, iw = ids.shape[-2:]
        for i, sample in enumerate(ids.cpu().numpy()):
            for c, x1, y1, x2, y2 in layout_boxes(sample):
                rows.append([i, c, (x1 + x2) / 2 / iw, (y1 + y2) / 2 / ih, (x2 - x1) / iw, (y2 - y1) / ih])
        t = torch.tensor(rows, dtype=torch.float32, device=self.device).view(-1, 6)
        targets = {
            "batch_idx": t[:, 0],
            "cls": self.class_ids[t[:, 1].long()].float().view(-1, 1),
            "bboxes": t[:, 2:],
        }
        loss, _ = self.model.loss(targets, self.model(image))
        return loss.sum() / image.shape[0]  # ultralytics scales its loss by the batch size

    def segmentation_loss(self, image, ids):
        """Per-sample mean cross-entropy of the segmenter's logits (upsampled to the mask) against it, 255 ignored,
        averaged over the samples."""
        import torch.nn.functional as F

        logits = self.model(pixel_values=(image - self.mean) / self.std).logits
        logits = F.interpolate(logits, size=ids.shape[-2:], mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(
            logits, ids, ignore_index=255, reduction="none"
        )  # (B, H, W), 0 where ignored
        valid = (ids != 255).flatten(1).sum(1).clamp(min=1)
        return (per_pixel.flatten(1).sum(1) / valid).mean()
