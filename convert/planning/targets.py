"""The targets file of generation plans: its schema (config/plan_targets.yaml documents every key) and its cells.

A cell is a combination of frame attributes (weather x time of day x scene) that a target fixes; a frame's
attributes are in a cell when they agree on every key the cell fixes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from convert.planning.boxes import ROAD_USERS
from core.config import Section, load_config
from vocab import bdd

#: Frame attributes a target can fix, in the order cells are named.
CELL_KEYS: tuple[str, ...] = ("weather", "timeofday", "scene")
DEFINED: dict[str, tuple[str, ...]] = {
    key: tuple(v for v in bdd.FRAME_ATTRIBUTES[key] if v != "undefined") for key in CELL_KEYS
}

Weather = Literal[DEFINED["weather"]]
TimeOfDay = Literal[DEFINED["timeofday"]]
Scene = Literal[DEFINED["scene"]]
DetClass = Literal[bdd.DET_CLASSES]


class Target(Section):
    """Cells (weather x time of day x scene) to fill, the classes each planned scene must hold, and how many."""

    name: str = Field(min_length=1)
    weather: list[Weather] | Literal["all"] | None = None
    timeofday: list[TimeOfDay] | Literal["all"] | None = None
    scene: list[Scene] | Literal["all"] | None = None
    require: dict[DetClass, int] = {}
    scenes: int | None = Field(None, ge=1)
    weight: float = Field(1.0, gt=0)

    @field_validator("weather", "timeofday", "scene", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        """``rainy`` -> ``[rainy]``: one value is a one-value list; ``all`` and null stay as they are."""
        return [value] if isinstance(value, str) and value != "all" else value

    @field_validator("weather", "timeofday", "scene")
    @classmethod
    def _no_repeats(cls, value, info):
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one value, or write all or null")
            if len(set(value)) != len(value):
                raise ValueError(f"a value is listed twice: {value}")
        return value

    @field_validator("require")
    @classmethod
    def _counts(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if v < 1}
        if bad:
            raise ValueError(f"minimum counts must be >= 1, got {bad}")
        return value

    def values(self, key: str) -> tuple[str, ...] | None:
        """The values of ``key`` this target's cells take (None: not fixed, the source frame's own value)."""
        value = getattr(self, key)
        return DEFINED[key] if value == "all" else tuple(value) if value is not None else None

    def cells(self) -> list[dict[str, str]]:
        """Every combination of the fixed keys' values, in vocabulary order (one empty cell: nothing fixed)."""
        cells: list[dict[str, str]] = [{}]
        for key in CELL_KEYS:
            values = self.values(key)
            if values is not None:
                cells = [{**cell, key: v} for cell in cells for v in values]
        return cells


class Edits(Section):
    """How layouts are edited (each planned scene draws its edits from its own generator)."""

    mirror: float = Field(0.5, ge=0, le=1)
    remove: float = Field(0.25, ge=0, le=1)
    remove_max_fraction: float = Field(0.25, ge=0, le=1)
    move: float = Field(0.25, ge=0, le=1)
    max_moves: int = Field(2, ge=0)
    duplicate: float = Field(0.25, ge=0, le=1)
    max_duplicates: int = Field(2, ge=0)
    classes: list[DetClass] = list(ROAD_USERS)
    overlap_quantile: float = Field(0.95, ge=0, le=1)
    containment_limit: float = Field(0.5, ge=0, le=1)
    baseline_tolerance: float = Field(0.25, ge=0)
    span_margin: float = Field(1.0, ge=0)


class PlanTargets(Section):
    scenes: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)  # numpy's seed sequences take non-negative integers
    targets: list[Target] = Field(min_length=1)
    edits: Edits = Edits()

    @model_validator(mode="after")
    def _unique_names(self) -> PlanTargets:
        names = [t.name for t in self.targets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"targets: names must be unique, repeated: {repeated}")
        return self


def load_targets(path: str | Path) -> PlanTargets:
    return load_config(PlanTargets, path)


# ---------------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------------


def in_cell(attributes: dict[str, str], cell: dict[str, str]) -> bool:
    return all(attributes.get(k) == v for k, v in cell.items())


def holds(counts: Counter, require: dict[str, int]) -> bool:
    return all(counts[c] >= n for c, n in require.items())


def matches(
    attributes: dict[str, str], counts: Counter, cell: dict[str, str], require: dict[str, int]
) -> bool:
    return in_cell(attributes, cell) and holds(counts, require)


def cell_name(cell: dict[str, str]) -> str:
    return " / ".join(f"{cell[k]}" for k in CELL_KEYS if k in cell) or "any conditions"


def cell_order(cell: Sequence[str]) -> tuple[int, ...]:
    """Vocabulary order (bdd.py's), 'undefined' and unknown values last."""
    out = []
    for key, value in zip(CELL_KEYS, cell, strict=True):
        vocab = DEFINED[key]
        out.append(vocab.index(value) if value in vocab else len(vocab) + (value != "undefined"))
    return tuple(out)
