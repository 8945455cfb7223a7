"""Generation plans in ControlNet inference: each planned scene of ``convert/plan_generation.py`` as a work-list entry.

A plan (``paths.plan``, a ``plan.jsonl``) holds one scene per line: an ``id``, a ``caption``, the layout ``size``
and its ``labels`` in det_20 form. Each scene becomes one :class:`~ai.common.generation.PromptEntry` named by its
id (images ``<id>_00.png``), prompted with its caption; its condition is its labels rendered as a box layout
(vocab/box_layout.py, the renderer of the ControlNet's layout) at the layout size and resized nearest-neighbour like a mask. Its metadata record carries
what stage 4 needs: the planned ``labels`` (the source layout, inline), ``source_size`` (their pixel space), and
the plan's ids and edits; ``source_frame``, ``source_labels`` and ``mask_path`` are null, since the layout is the
plan's, not a real frame's (the real frame it was made from is ``plan_source_frame``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ai.common.generation import PromptEntry
from ai.controlnet.architecture import layout_of
from ai.controlnet.infer_config import ControlNetInferConfig
from core.cli import UserError
from vocab import layouts

PLAN_HINT = "write one with python convert/plan_generation.py --targets T.yaml --out plan/ (plan/plan.jsonl)"


class PlanBox(BaseModel):
    model_config = ConfigDict(extra="ignore")

    x1: float
    y1: float
    x2: float
    y2: float

    @field_validator("x2", "y2")
    @classmethod
    def _ordered(cls, value: float, info) -> float:
        low = info.data.get("x1" if info.field_name == "x2" else "y1")
        if not math.isfinite(value) or (low is not None and value < low):
            raise ValueError(
                f"must be finite and >= {'x1' if info.field_name == 'x2' else 'y1'}, got {value}"
            )
        return value


class PlanLabel(BaseModel):
    model_config = ConfigDict(extra="allow")

    category: str
    box2d: PlanBox
    attributes: dict[str, Any] = {}


class PlanRow(BaseModel):
    """The fields of a plan line that generation reads (others, such as ``cell``, travel along unread)."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    caption: str = Field(min_length=1)
    size: tuple[int, int]
    labels: list[PlanLabel]
    attributes: dict[str, str] = {}
    target: str | None = None
    source_frame: str | None = None
    edits: list[dict[str, Any]] = []

    @field_validator("size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) <= 0:
            raise ValueError(f"[width, height] must be positive, got {list(value)}")
        return value


def read_plan(path: str | Path) -> list[tuple[int, PlanRow]]:
    """(line number, row) of each scene of a plan.jsonl; every bad line is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"paths.plan not found: {path} ({PLAN_HINT})")
    rows, seen = [], {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = PlanRow.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); a plan holds one scene per line"
            ) from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(line)'}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise UserError(f"{path}:{lineno}: not a planned scene: {problems} ({PLAN_HINT})") from None
        if row.id in seen:
            raise UserError(
                f"{path}:{lineno}: scene id {row.id!r} is also on line {seen[row.id]}; ids name images"
            )
        seen[row.id] = lineno
        rows.append((lineno, row))
    if not rows:
        raise UserError(f"{path} holds no planned scenes ({PLAN_HINT})")
    return rows


def check_plan_controlnet(plan: str, layout: str, controlnet: dict, controlnet_name: str) -> None:
    """A plan's scenes are labels: refuse a ControlNet whose layout is not drawn from labels (masks are files)."""
    if layouts.get(layout).renderer is not None:
        return
    drawn = [spec for spec in layouts.LAYOUTS.values() if spec.renderer is not None]
    raise UserError(
        f"paths.plan {plan} needs a ControlNet trained on {' or '.join(s.what for s in drawn)} (each planned "
        f"scene's boxes are rendered as one), but {controlnet_name} was trained on "
        f"{layout_of(controlnet, controlnet_name)}: train one with controlnet.layout={drawn[0].name} on a CSV of "
        f"them (convert/controlnet_bdd_to_huggingface_csv.py --layout {drawn[0].name}), or generate from masks "
        "(paths.plan=null)"
    )


def plan_entries(cfg: ControlNetInferConfig) -> list[PromptEntry]:
    """One entry per planned scene of ``cfg.paths.plan``, in plan order (a longer plan keeps the earlier scenes'
    names and seeds), prompted with the scenes' captions; ``max_prompts`` keeps the first ones."""
    if cfg.prompt:
        raise UserError(
            "set either paths.plan (each planned scene has its caption) or prompt (one prompt for all masks), not "
            "both; clear one with paths.plan=null or prompt=null"
        )
    path = Path(cfg.paths.plan).resolve()
    entries = []
    for lineno, row in read_plan(path):
        labels = [label.model_dump(mode="json") for label in row.labels]
        source = {
            "mask_path": None,
            "source_frame": None,  # the layout is the plan's (possibly edited), not a real frame's
            "source_size": list(row.size),
            "source_labels": None,
            "prompt_source": f"{path}:{lineno}",
            "plan": str(path),
            "plan_id": row.id,
            "plan_target": row.target,
            "plan_source_frame": row.source_frame,
            "plan_edits": row.edits,
            "attributes": row.attributes,
            "labels": labels,
        }
        entries.append(PromptEntry(row.caption, source, name=row.id))
    return entries[: cfg.max_prompts] if cfg.max_prompts is not None else entries


def plan_layout(source: dict[str, Any], layout: str) -> Image.Image:
    """A planned scene's layout (mode ``L`` ids) at its layout size, drawn from the labels in its record source by
    the layout's renderer."""
    drawing = layouts.get(layout).renderer.draw(source["labels"], tuple(source["source_size"]))
    return Image.fromarray(drawing.ids())  # uint8 HxW: mode L
