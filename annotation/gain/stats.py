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
    results = [
        r
        for r in results
        if r.get("arm", "real" if r["share"] == 0 else "synthetic") in ("real", "synthetic")
    ]
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


# ---------------------------------------------------------------------------------------------------------------
# Arms other than the shares, convergence, "no signal"
# ---------------------------------------------------------------------------------------------------------------

#: below this final mAP (a tenth of a point) the convergence rule's tolerance is absolute, not relative
CONVERGENCE_FLOOR = 0.001


def paired_vs_real(
    results: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], field: str = "map"
) -> Spread | None:
    """Spread over seeds of (a run's figure - the real arm's figure at the same seed)."""
    base = {r["seed"]: r["metrics"][field] for r in results if r.get("arm") == "real"}
    return spread(
        r["metrics"][field] - base[r["seed"]]
        for r in runs
        if base.get(r["seed"]) is not None and r["metrics"][field] is not None
    )


def converged(result: dict[str, Any], tolerance: float) -> bool | None:
    """Whether the run's mAP50-95 was flat over its last fifth of iterations: it rose by at most ``tolerance`` of
    its final value (or a tenth of a point, whichever is larger) since the checkpoint; None without a checkpoint."""
    at = (result.get("convergence") or {}).get("map")
    end = result["metrics"]["map"]
    if at is None or end is None:
        return None
    return end - at <= max(tolerance * end, CONVERGENCE_FLOOR)


def no_signal(results: Sequence[dict[str, Any]]) -> str | None:
    """Why the sweep shows nothing either way (a zero baseline, or every run the same figure), else None."""
    base = [
        r["metrics"]["map"] for r in results if r.get("arm") == "real" and r["metrics"]["map"] is not None
    ]
    values = [r["metrics"]["map"] for r in results if r["metrics"]["map"] is not None]
    if base and max(base) == 0:
        return "no signal: the baseline learned nothing (real-only mAP50-95 is 0 on every seed); raise the budget"
    if len(values) > 1 and len(set(values)) == 1:
        return (
            f"no signal: every run scored the same mAP50-95 ({values[0] * 100:.2f}), so no arm can differ from "
            "another; raise the budget"
        )
    return None
