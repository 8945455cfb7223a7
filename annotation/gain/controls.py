"""The controls around the largest synthetic share, and the real-data learning curve: which arms, which images.

* **positive control** (``design.positive_control``): the real arm's N frames plus S *more real* frames in place of
  the largest share's S synthetic ones: the gain a perfect generator could give. The S frames are the next S of
  the seed's real ranking (:func:`annotation.gain.design.real_draw`), so they are train frames outside the real
  arm's draw; it needs ``design.max_real`` (otherwise no real frame is left over).
* **negative control** (``design.negative_control``): the largest share's synthetic images spoiled:
  ``shuffled_labels`` gives each image the labels of another (a seeded derangement: every image gets another's),
  ``blank_images`` trains on mid-grey images of the same sizes with the synthetic labels (the runner draws them).
  A generator whose gain is no larger than this control's taught the detector nothing beyond more label boxes.
* **real curve** (``design.real_curve``): real-only arms at other real budgets (nested draws of the same ranking).
  The baseline (N) and the positive control (N + S) are points on it too, so a budget equal to either is not
  trained twice.

Controls run for the largest share only: they bracket the share where a gain is largest and easiest to see, at a
cost of one training per control per seed (for every share it would be one per share per control per seed).

Pure: items in, arms out; no ultralytics, no files.
"""

from __future__ import annotations

from collections.abc import Sequence

from annotation.gain.data import Item
from annotation.gain.design import CURVE, NEGATIVE, NEGATIVE_CONTROLS, POSITIVE, Arm, ranked, real_draw
from core.cli import UserError


def positive_control(real: Sequence[Item], largest: Arm) -> Arm:
    """The largest share's arm with its synthetic images replaced by as many more real frames of the seed's draw."""
    n, s = len(largest.real), len(largest.synthetic)
    if n + s > len(real):
        raise UserError(
            f"design.positive_control: the positive control needs {n} + {s} = {n + s} real train frames (the real "
            f"arm's {n} and {s} more in place of the {largest.share:g} % share's synthetic images); the real train "
            f"split has {len(real)}: set or lower design.max_real (--max_real) so that both fit, or lower the "
            "largest share, or set positive_control: false"
        )
    drawn = real_draw(real, largest.seed, n + s)
    base = {i.key for i in largest.real}
    extra = tuple(i for i in drawn if i.key not in base)
    return Arm(largest.share, largest.seed, largest.real, (), kind=POSITIVE, extra_real=extra)


def shuffled_labels(items: Sequence[Item], seed: int) -> tuple[Item, ...]:
    """Each image with the label file of another: a seeded order, each taking its successor's labels."""
    order = ranked({i.key: i for i in items}, seed, "shuffled_labels")
    by_key = {i.key: i for i in items}
    successor = {k: order[(n + 1) % len(order)] for n, k in enumerate(order)}
    return tuple(Item(i.key, i.image, by_key[successor[i.key]].label) for i in items)


def negative_control(largest: Arm, mode: str) -> Arm:
    """The largest share's arm with its synthetic images spoiled by ``mode`` (see NEGATIVE_CONTROLS)."""
    if mode not in NEGATIVE_CONTROLS:
        raise ValueError(f"unknown negative control {mode!r}")
    if mode == "shuffled_labels" and len(largest.synthetic) < 2:
        raise UserError(
            f"design.negative_control: shuffled_labels needs 2+ synthetic images in the largest share "
            f"({largest.share:g} %: {len(largest.synthetic)}); raise the share or use blank_images"
        )
    synthetic = (
        shuffled_labels(largest.synthetic, largest.seed) if mode == "shuffled_labels" else largest.synthetic
    )
    return Arm(largest.share, largest.seed, largest.real, synthetic, kind=NEGATIVE, spoil=mode)


def curve_arms(real: Sequence[Item], seed: int, budgets: Sequence[int], covered: Sequence[int]) -> list[Arm]:
    """Real-only arms at each budget not ``covered`` by another arm (the baseline, the positive control)."""
    arms = []
    for budget in sorted(set(budgets) - set(covered)):
        if budget > len(real):
            raise UserError(
                f"design.real_curve: budget {budget} is more than the {len(real)} real train frames; lower it"
            )
        arms.append(Arm(0, seed, real_draw(real, seed, budget), (), kind=CURVE))
    return arms


def control_arms(
    real: Sequence[Item],
    arms: Sequence[Arm],
    *,
    positive: bool,
    negative: str | None,
    curve: Sequence[int],
) -> list[Arm]:
    """The controls and curve arms of one seed, given its real and synthetic ``arms`` (from design_arms)."""
    largest = max(arms, key=lambda a: a.share)
    out = []
    if (positive or negative) and largest.share == 0:
        raise UserError(
            "design.positive_control/negative_control: the controls stand beside the largest synthetic share; "
            "add a share > 0 to design.shares"
        )
    if positive:
        out.append(positive_control(real, largest))
    if negative:
        out.append(negative_control(largest, negative))
    covered = [len(arms[0].real)] + [a.real_budget for a in out if a.kind == POSITIVE]
    return out + curve_arms(real, largest.seed, curve, covered)
