"""The real-data learning curve and a synthetic arm's real-equivalent: "these S synthetic frames are worth ≈ M
real frames".

Per seed, the real-only arms (the baseline at ``N`` real frames, the ``design.real_curve`` budgets, the positive
control at ``N + S``) give points (real budget, mAP). The synthetic arm's mAP of the same seed is read off that
curve: the real budget that would score the same. Paired per seed (same initial weights, nested real draws), then
mean ± spread over seeds.

Interpolation: piecewise linear in **log budget**, on the curve made monotone (non-decreasing) by pooling adjacent
violators. Why log: detection accuracy grows roughly linearly in the logarithm of the training-set size over the
ranges a sweep covers (Sun et al. 2017, "Revisiting Unreasonable Effectiveness of Data"), so between 500 and 2000
frames the halfway mAP sits near 1000 frames, not near 1250. Why monotone: at equal iterations more real data does
not hurt in expectation; a dip between two budgets is seed noise, and inverting a curve that dips would give two
answers. A value below the smallest budget's mAP or above the largest's is not extrapolated: it is clamped to that
budget and flagged ("< smallest", "> largest").

Pure: numbers in, numbers out; no ultralytics, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from annotation.gain.stats import spread

BELOW, ABOVE = "below", "above"


def monotone(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(budget, value) sorted by budget, values made non-decreasing by pooling adjacent violators (equal weights):
    the closest non-decreasing curve in least squares."""
    pts = sorted(points)
    blocks: list[list[float]] = []  # [sum, count] per pooled block
    for _, value in pts:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    values = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return [(b, v) for (b, _), v in zip(pts, values, strict=True)]


@dataclass(frozen=True)
class Equivalent:
    """The real budget a value corresponds to on a curve; ``flag`` BELOW/ABOVE when clamped to the curve's end."""

    budget: float
    flag: str | None = None


def real_equivalent(points: Sequence[tuple[float, float]], value: float) -> Equivalent:
    """The budget at which the (monotone) curve through ``points`` reaches ``value``: piecewise linear in log
    budget; on a flat stretch the smallest budget that reaches it. Needs two or more distinct budgets."""
    curve = monotone(points)
    if len({b for b, _ in curve}) < 2:
        raise ValueError("a learning curve needs at least two real budgets")
    if any(b <= 0 for b, _ in curve):
        raise ValueError("real budgets must be positive")
    (b0, v0), (bn, vn) = curve[0], curve[-1]
    if value < v0:
        return Equivalent(b0, BELOW)
    if value > vn:
        return Equivalent(bn, ABOVE)
    for (ba, va), (bb, vb) in zip(curve, curve[1:], strict=False):
        if va <= value <= vb:
            if value == va or vb == va:
                return Equivalent(ba)
            if value == vb:
                return Equivalent(bb)
            t = (value - va) / (vb - va)
            return Equivalent(math.exp(math.log(ba) + t * (math.log(bb) - math.log(ba))))
    return Equivalent(bn)  # value == vn on a curve that ends flat


@dataclass(frozen=True)
class ExchangeRate:
    """A synthetic arm's real-equivalent over seeds: the budget (mean ± spread), the real frames it is worth on
    top of the baseline's ``base`` (budget - base), and how many seeds were clamped to the curve's ends."""

    seeds: int
    budget: dict | None  # Spread as a dict
    worth: dict | None  # Spread of budget - base
    base: int
    below: int
    above: int
    smallest: float
    largest: float

    def text(self, synthetic: int) -> str:
        """'64 synthetic ≈ 41 ± 6 real frames (real-equivalent budget 105 ± 6; 1 of 3 seeds > largest budget 128)'."""
        if self.budget is None or self.worth is None:
            return "–"
        w, b = self.worth, self.budget
        if self.below == self.seeds:  # every seed clamped: the curve cannot say how much less
            return (
                f"{synthetic} synthetic are worth less than the curve can measure: below "
                f"{self.smallest - self.base:+g} real frames on every seed (under its smallest budget {self.smallest:g})"
            )
        if self.above == self.seeds:
            return (
                f"{synthetic} synthetic are worth more than the curve can measure: above "
                f"{self.largest - self.base:+g} real frames on every seed (over its largest budget {self.largest:g}); "
                "add larger --real_curve budgets"
            )
        std = f" ± {w['std']:.0f}" if w["std"] is not None else ""
        text = f"{synthetic} synthetic ≈ {w['mean']:.0f}{std} real frames (real-equivalent budget {b['mean']:.0f}"
        notes = []
        if self.below:
            notes.append(f"{self.below} of {self.seeds} seed(s) < smallest budget {self.smallest:g}")
        if self.above:
            notes.append(f"{self.above} of {self.seeds} seed(s) > largest budget {self.largest:g}")
        return text + ("; " + "; ".join(notes) if notes else "") + ")"


def exchange_rate(
    curves: Mapping[int, Sequence[tuple[float, float]]], values: Mapping[int, float], base: int
) -> ExchangeRate | None:
    """Per seed: the real-equivalent of ``values[seed]`` on ``curves[seed]``; then mean ± spread over the seeds
    that have both a value and a curve of two or more budgets. None when no seed has."""
    eqs = {
        seed: real_equivalent(curves[seed], v)
        for seed, v in sorted(values.items())
        if v is not None and len({b for b, _ in curves.get(seed, ())}) >= 2
    }
    if not eqs:
        return None
    budgets = [e.budget for e in eqs.values()]
    b, w = spread(budgets), spread(x - base for x in budgets)
    all_budgets = [pt[0] for seed in eqs for pt in curves[seed]]
    return ExchangeRate(
        seeds=len(eqs),
        budget=None if b is None else b.__dict__,
        worth=None if w is None else w.__dict__,
        base=base,
        below=sum(e.flag == BELOW for e in eqs.values()),
        above=sum(e.flag == ABOVE for e in eqs.values()),
        smallest=min(all_budgets),
        largest=max(all_budgets),
    )
