"""The gain evaluation's pure parts beyond the shares: controls' arms, the real-data curve and its exchange rate,
ultralytics' optimizer steps, "no signal" and convergence. Hand-computed numbers, no training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from annotation.gain import controls, curve, design, recipe, stats
from annotation.gain.data import Item
from core.cli import UserError


def items(n: int, prefix: str) -> list[Item]:
    return [
        Item(f"{prefix}{i:03d}.jpg", Path(f"/{prefix}{i:03d}.jpg"), Path(f"/{prefix}{i:03d}.txt"))
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------------------------
# The real-data learning curve and real-equivalents
# ---------------------------------------------------------------------------------------------------------------


def test_real_equivalent_is_piecewise_linear_in_log_budget():
    points = [(100, 0.10), (400, 0.20), (1600, 0.30)]
    assert curve.real_equivalent(points, 0.10) == curve.Equivalent(100)
    assert curve.real_equivalent(points, 0.20) == curve.Equivalent(400)
    # halfway in mAP between 100 and 400 frames is halfway in log budget: sqrt(100 * 400) = 200, not 250
    assert curve.real_equivalent(points, 0.15).budget == pytest.approx(200)
    assert curve.real_equivalent(points, 0.25).budget == pytest.approx(800)
    # a quarter of the way: 100 * 4 ** 0.25
    assert curve.real_equivalent(points, 0.125).budget == pytest.approx(100 * 4**0.25)
    # outside the curve: clamped to its ends and flagged, never extrapolated
    assert curve.real_equivalent(points, 0.05) == curve.Equivalent(100, curve.BELOW)
    assert curve.real_equivalent(points, 0.31) == curve.Equivalent(1600, curve.ABOVE)
    # the order of the points does not matter
    assert curve.real_equivalent(points[::-1], 0.15).budget == pytest.approx(200)
    with pytest.raises(ValueError, match="at least two"):
        curve.real_equivalent([(100, 0.1), (100, 0.2)], 0.15)


def test_a_dip_in_the_curve_is_pooled_so_the_inverse_is_one_budget():
    # 0.20 at 200 frames, 0.16 at 400 (seed noise): pooled to 0.18 at both
    pooled = curve.monotone([(100, 0.10), (200, 0.20), (400, 0.16), (800, 0.30)])
    assert pooled == [(100, 0.10), (200, pytest.approx(0.18)), (400, pytest.approx(0.18)), (800, 0.30)]
    assert curve.real_equivalent(pooled, 0.18).budget == 200  # on a flat stretch: the smallest budget
    assert curve.real_equivalent(pooled, 0.24).budget == pytest.approx(
        400 * 2**0.5
    )  # (0.24-0.18)/(0.30-0.18)
    falling = curve.monotone([(1, 0.3), (2, 0.2), (3, 0.1)])  # all pooled: the mean
    assert falling == [(1, pytest.approx(0.2)), (2, pytest.approx(0.2)), (3, pytest.approx(0.2))]


def test_exchange_rate_is_paired_per_seed_then_averaged():
    curves = {
        0: [(100, 0.10), (200, 0.20), (400, 0.30)],
        1: [(100, 0.12), (200, 0.16), (400, 0.20)],
        2: [(100, 0.10)],  # one budget: no curve, left out
    }
    values = {0: 0.15, 1: 0.20, 2: 0.5}
    rate = curve.exchange_rate(curves, values, base=100)
    # seed 0: halfway 100..200 -> 141.42; seed 1: 0.20 is the top point -> 400
    b0, b1 = 100 * 2**0.5, 400.0
    assert rate.seeds == 2 and (rate.below, rate.above) == (0, 0)
    assert rate.budget["mean"] == pytest.approx((b0 + b1) / 2)
    assert rate.budget["std"] == pytest.approx(abs(b1 - b0) / math.sqrt(2))
    assert rate.worth["mean"] == pytest.approx((b0 + b1) / 2 - 100)
    assert rate.text(50).startswith(f"50 synthetic ≈ {(b0 + b1) / 2 - 100:.0f} ± ")
    over = curve.exchange_rate(curves, {0: 0.35, 1: 0.05}, base=100)
    assert (over.above, over.below) == (1, 1)
    assert over.budget["mean"] == pytest.approx((400 + 100) / 2)  # clamped to the ends
    assert "1 of 2 seed(s) > largest budget 400" in over.text(50)
    assert "1 of 2 seed(s) < smallest budget 100" in over.text(50)
    under = curve.exchange_rate(
        curves, {0: 0.01, 1: 0.02}, base=200
    )  # every seed under the curve's first point
    assert under.text(50) == (
        "50 synthetic are worth less than the curve can measure: below -100 real frames on every seed (under its "
        "smallest budget 100)"
    )
    above = curve.exchange_rate(curves, {0: 0.9, 1: 0.9}, base=100)
    assert above.text(50).startswith(
        "50 synthetic are worth more than the curve can measure: above +300 real"
    )
    assert curve.exchange_rate({0: [(100, 0.1)]}, {0: 0.1}, base=100) is None


# ---------------------------------------------------------------------------------------------------------------
# Controls: which images each arm trains on
# ---------------------------------------------------------------------------------------------------------------


def test_positive_control_adds_real_frames_from_outside_the_real_arm():
    real, synthetic = items(20, "r"), items(30, "s")
    for seed in (0, 1):
        arms = design.design_arms(real, synthetic, [0, 25, 50], seed, max_real=8)
        extra = controls.control_arms(real, arms, positive=True, negative=None, curve=[])
        (pos,) = extra
        largest = arms[-1]
        assert pos.arm == design.POSITIVE and pos.real == largest.real == arms[0].real
        assert len(pos.extra_real) == len(largest.synthetic) == 4 and pos.synthetic == ()
        assert not {i.key for i in pos.extra_real} & {i.key for i in pos.real}  # held out of the real arm
        assert {i.key for i in pos.extra_real} <= {i.key for i in real}  # real train frames only
        # the positive control is the real ranking's first N + S frames: a point on the learning curve
        assert set(pos.images) == set(design.real_draw(real, seed, 12))
        assert pos.real_budget == 12 and pos.name == f"positive50_seed{seed}"
    with pytest.raises(
        UserError, match=r"needs 16 \+ 8 = 24 real train frames.*has 20: set or lower design.max_real"
    ):
        controls.control_arms(real, design.design_arms(real, synthetic, [0, 50], 0, 16), positive=True,
                              negative=None, curve=[])  # fmt: skip


def test_negative_controls_spoil_the_largest_shares_synthetic_images():
    real, synthetic = items(10, "r"), items(10, "s")
    arms = design.design_arms(real, synthetic, [0, 50], 0, max_real=None)
    (neg,) = controls.control_arms(real, arms, positive=False, negative="shuffled_labels", curve=[])
    largest = arms[-1]
    assert neg.real == largest.real and [i.image for i in neg.synthetic] == [
        i.image for i in largest.synthetic
    ]
    labels = [i.label for i in neg.synthetic]
    assert sorted(labels) == sorted(i.label for i in largest.synthetic)  # the same labels ...
    assert all(i.label != i.image.with_suffix(".txt") for i in neg.synthetic)  # ... each on another image
    assert neg.name == "negative_shuffled_labels50_seed0" and neg.spoil == "shuffled_labels"
    (blank,) = controls.control_arms(real, arms, positive=False, negative="blank_images", curve=[])
    assert blank.synthetic == largest.synthetic and blank.spoil == "blank_images"  # the runner greys them


def test_curve_arms_are_nested_draws_and_skip_budgets_other_arms_cover():
    real, synthetic = items(40, "r"), items(40, "s")
    arms = design.design_arms(real, synthetic, [0, 50], 3, max_real=10)
    extra = controls.control_arms(real, arms, positive=True, negative=None, curve=[5, 10, 15, 20])
    curve_arms = [a for a in extra if a.arm == design.CURVE]
    assert [a.real_budget for a in curve_arms] == [5, 20]  # 10: the real arm; 15: the positive control
    assert set(curve_arms[0].real) < set(arms[0].real) < set(curve_arms[1].real)
    assert [a.name for a in curve_arms] == ["real5_seed3", "real20_seed3"]
    with pytest.raises(UserError, match="budget 41 is more than the 40 real train frames"):
        controls.control_arms(real, arms, positive=False, negative=None, curve=[41])


# ---------------------------------------------------------------------------------------------------------------
# ultralytics' optimizer steps, warmup and mosaic
# ---------------------------------------------------------------------------------------------------------------


def test_optimizer_steps_follow_ultralytics_accumulation_and_warmup():
    # the demo: 6 batches of 4, nbs 64, one epoch: accumulate 16 capped at 6 -> one step
    assert recipe.optimizer_steps(nb=6, epochs=1, batch=4, nbs=64, warmup_epochs=3) == (1, 6, 0)
    # 13 batches, one epoch: no warmup (never in the last epoch), one step after 13 batches
    assert recipe.optimizer_steps(nb=13, epochs=1, batch=4, nbs=64, warmup_epochs=3) == (1, 13, 0)
    # nbs = batch: a step per batch
    assert recipe.optimizer_steps(nb=10, epochs=3, batch=8, nbs=8, warmup_epochs=0) == (30, 1, 0)
    # warmup ramps accumulate from 1 to 2 over nw = 4 iterations: steps at ni 0, 1, 3, then every 2nd: 5, 7
    assert recipe.optimizer_steps(nb=4, epochs=2, batch=2, nbs=4, warmup_epochs=3) == (5, 2, 4)
    # no warmup: every 4th batch of 40
    assert recipe.optimizer_steps(nb=20, epochs=2, batch=16, nbs=64, warmup_epochs=0) == (10, 4, 0)


def test_recipe_warns_when_warmup_mosaic_or_steps_drop_out():
    defaults = {"nbs": 64, "warmup_epochs": 3.0, "close_mosaic": 10, "mosaic": 1.0}
    one_epoch = recipe.recipe(design.Schedule(1, 13, 4), defaults)
    assert (one_epoch.optimizer_steps, one_epoch.warmup_iterations, one_epoch.mosaic_epochs) == (1, 0, 0)
    warnings = recipe.recipe_warnings(one_epoch, defaults, min_steps=100)
    assert len(warnings) == 3
    assert "only 1 optimizer step(s)" in warnings[0] and "nbs=64" in warnings[0]
    assert "no warmup in any arm" in warnings[1] and "no mosaic in any arm" in warnings[2]
    long = recipe.recipe(design.Schedule(50, 100, 16), defaults)
    assert long.warmup_iterations == 300 and long.mosaic_epochs == 40
    assert recipe.recipe_warnings(long, defaults, min_steps=100) == []
    # asked-for absence is no surprise: mosaic 0 and warmup 0 are not warned about
    off = {**defaults, "mosaic": 0.0, "warmup_epochs": 0, "nbs": 4}
    assert recipe.recipe_warnings(recipe.recipe(design.Schedule(1, 200, 4), off), off, min_steps=100) == []


# ---------------------------------------------------------------------------------------------------------------
# No signal, convergence
# ---------------------------------------------------------------------------------------------------------------


def run(arm: str, seed: int, value: float, at: float | None = None) -> dict:
    return {"arm": arm, "share": 0 if arm == "real" else 50, "seed": seed, "metrics": {"map": value},
            "convergence": None if at is None else {"iteration": 8, "map": at}}  # fmt: skip


def test_no_signal_when_the_baseline_is_zero_or_every_run_is_equal():
    assert "baseline learned nothing" in stats.no_signal([run("real", 0, 0.0), run("synthetic", 0, 0.02)])
    assert "every run scored the same" in stats.no_signal([run("real", 0, 0.1), run("synthetic", 0, 0.1)])
    assert stats.no_signal([run("real", 0, 0.0), run("real", 1, 0.01), run("synthetic", 0, 0.02)]) is None


def test_converged_means_flat_over_the_last_fifth():
    assert stats.converged(run("real", 0, 0.300, at=0.290), tolerance=0.05) is True  # +0.010 <= 0.015
    assert stats.converged(run("real", 0, 0.300, at=0.280), tolerance=0.05) is False  # +0.020
    assert stats.converged(run("real", 0, 0.250, at=0.300), tolerance=0.05) is True  # falling is not rising
    assert stats.converged(run("real", 0, 0.0008, at=0.0), tolerance=0.05) is True  # under a tenth of a point
    assert stats.converged(run("real", 0, 0.3), tolerance=0.05) is None  # no checkpoint
