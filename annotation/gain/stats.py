"""Figures over seeds: mean ± sample standard deviation [min, max], gains paired by seed, and their formatting.

Pure (no ultralytics, no files). A run's figures are fractions (COCO mAP in [0, 1]); the text shows them × 100.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (n - 1; None for one value), min and max of one figure over seeds."""

    n: int
    mean: float
    std: float | None
    min: float
    max: float


def spread(values: Iterable[float | None]) -> Spread | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Spread(len(vals), statistics.fmean(vals), std, min(vals), max(vals))


def paired_gain(rows: Sequence[dict[str, Any]], share: float, field: str = "map") -> Spread | None:
    """Spread over seeds of (share's figure - 0 %'s figure) at the same seed (same init and real images)."""
    base = {r["seed"]: r[field] for r in rows if r["share"] == 0 and r[field] is not None}
    return spread(
        r[field] - base[r["seed"]]
        for r in rows
        if r["share"] == share and r["seed"] in base and r[field] is not None
    )


def summarize(results: Sequence[dict[str, Any]], shares: Sequence[float]) -> dict[str, Any]:
    """Per share: spreads of map/map50 over seeds and the seed-paired gains vs 0 % (gain.json's summary)."""
    out = {}
    flat = [{"share": r["share"], "seed": r["seed"], **r["metrics"]} for r in results]
    for share in shares:
        rows = [r for r in results if r["share"] == share]
        entry = {
            "seeds": sorted(r["seed"] for r in rows),
            "real_images": sorted({r["real_images"] for r in rows}),
            "synthetic_images": sorted({r["synthetic_images"] for r in rows}),
        }
        for field in ("map", "map50"):
            s = spread(r["metrics"][field] for r in rows)
            entry[field] = None if s is None else s.__dict__
            g = paired_gain(flat, share, field) if share != 0 else None
            entry[f"{field}_gain"] = None if g is None else g.__dict__
        out[f"{share:g}"] = entry
    return out


# ---------------------------------------------------------------------------------------------------------------
# Text: mAP points (× 100)
# ---------------------------------------------------------------------------------------------------------------


def pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def fmt_spread(s: Spread | None, signed: bool = False) -> str:
    """'31.20 ± 0.40 [30.80, 31.60]' in mAP points (x100); one seed: no ±."""
    if s is None:
        return "–"
    text = pct(s.mean, signed)
    if s.std is not None:
        text += f" ± {s.std * 100:.2f} [{pct(s.min, signed)}, {pct(s.max, signed)}]"
    return text


def fmt_cell(values: list[float | None], base: Spread | None) -> str:
    """'mean ± std' plus the difference of means to the 0 % arm, in points."""
    s = spread(values)
    if s is None:
        return "–"
    text = pct(s.mean) + (f" ± {s.std * 100:.2f}" if s.std is not None else "")
    if base is not None:
        text += f" ({pct(s.mean - base.mean, signed=True)})"
    return text
