"""The experiment's design: seeded arms per synthetic share, the equal-iteration schedule, each arm's training list.

Pure functions of the items and the numbers (no ultralytics, no files): the same inputs give the same arms, lists
and schedule on every machine. The rule they implement is described in ``annotation/evaluate_gain.py``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from annotation.gain.data import Item
from core.cli import UserError

#: the budget of every arm when neither epochs nor iterations is given
DEFAULT_EPOCHS = 50


def ranked(keys: Iterable[str], seed: int, salt: str) -> list[str]:
    """``keys`` in a seeded pseudo-random order (hash of seed, salt and key): stable, independent of list order."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{salt}:{k}".encode()).digest())


def synthetic_count(share: float, n_real: int) -> int:
    """Synthetic images of a ``share`` % arm: share/100 of the real count, rounded half up."""
    return math.floor(share / 100 * n_real + 0.5)


#: the kinds of arm, as gain.csv's ``arm`` column names them
REAL, SYNTHETIC, POSITIVE, NEGATIVE, CURVE = (
    "real",
    "synthetic",
    "positive_control",
    "negative_control",
    "real_curve",
)
ARM_KINDS = (REAL, SYNTHETIC, POSITIVE, NEGATIVE, CURVE)
#: what a negative control does to the synthetic images of the largest share
NEGATIVE_CONTROLS = ("shuffled_labels", "blank_images")


@dataclass(frozen=True)
class Arm:
    """One training run's data for one seed: real images, the synthetic ones of a share, and for the controls the
    extra real frames (positive) or how the synthetic images are spoiled (negative)."""

    share: float
    seed: int
    real: tuple[Item, ...]
    synthetic: tuple[Item, ...]
    kind: str = ""  # "": real when share 0, else synthetic
    extra_real: tuple[Item, ...] = ()  # positive control: real frames held out of the real arm
    spoil: str | None = None  # negative control: one of NEGATIVE_CONTROLS

    @property
    def arm(self) -> str:
        return self.kind or (REAL if self.share == 0 else SYNTHETIC)

    @property
    def real_budget(self) -> int:
        """Real frames trained on (the real draw plus a positive control's extra frames)."""
        return len(self.real) + len(self.extra_real)

    @property
    def name(self) -> str:
        if self.arm == POSITIVE:
            return f"positive{self.share:g}_seed{self.seed}"
        if self.arm == NEGATIVE:
            return f"negative_{self.spoil}{self.share:g}_seed{self.seed}"
        if self.arm == CURVE:
            return f"real{self.real_budget}_seed{self.seed}"
        return f"share{self.share:g}_seed{self.seed}"  # the names runs had before the controls

    @property
    def images(self) -> tuple[Item, ...]:
        return self.real + self.extra_real + self.synthetic


def real_draw(real: Sequence[Item], seed: int, count: int | None) -> tuple[Item, ...]:
    """The first ``count`` real frames of the seed's ranking (all when None), sorted by key: every budget's draw
    contains every smaller one's, so the real arm, the positive control and the curve budgets are nested."""
    by_key = {i.key: i for i in real}
    keys = sorted(by_key) if count is None else sorted(ranked(by_key, seed, "real")[:count])
    return tuple(by_key[k] for k in keys)


def design_arms(
    real: Sequence[Item], synthetic: Sequence[Item], shares: Sequence[float], seed: int, max_real: int | None
) -> list[Arm]:
    """One arm per share for ``seed``: the same real images in each (all, or a seeded draw of ``max_real``), and a
    seeded draw of synthetic images per share that contains every smaller share's draw."""
    if max_real is not None and max_real > len(real):
        raise UserError(f"--max_real {max_real}: the real train split has only {len(real)} images")
    real_used = real_draw(real, seed, max_real)
    syn_by_key = {i.key: i for i in synthetic}
    syn_order = ranked(syn_by_key, seed, "synthetic")
    arms = []
    for share in shares:
        n = synthetic_count(share, len(real_used))
        if share > 0 and n == 0:
            raise UserError(
                f"--shares {share:g}: {share:g} % of {len(real_used)} real images is 0 synthetic images; "
                "raise --max_real or the share"
            )
        if n > len(syn_order):
            raise UserError(
                f"--shares {share:g}: {share:g} % of {len(real_used)} real images needs {n} synthetic images, "
                f"the synthetic set has {len(syn_order)}; lower the share or --max_real, or generate more"
            )
        chosen = tuple(syn_by_key[k] for k in sorted(syn_order[:n]))
        arms.append(Arm(share, seed, real_used, chosen))
    return arms


@dataclass(frozen=True)
class Schedule:
    """Every arm: ``epochs`` passes over a list of ``batches_per_epoch * batch`` entries."""

    epochs: int
    batches_per_epoch: int
    batch: int

    @property
    def list_length(self) -> int:
        return self.batches_per_epoch * self.batch

    @property
    def iterations(self) -> int:
        return self.epochs * self.batches_per_epoch

    @property
    def images_seen(self) -> int:
        return self.epochs * self.list_length


def equal_iteration_schedule(
    largest_arm: int, batch: int, epochs: int | None = None, iterations: int | None = None
) -> Schedule:
    """The schedule every arm shares: at least ``nb = ceil(largest_arm / batch)`` batches per epoch (full batches
    only), so the largest arm sees each of its images once per epoch.

    With ``iterations`` N: ``E = max(1, N // nb)`` epochs of ``N // E`` batches, i.e. as many whole passes over the
    largest arm as fit, each a little longer when N is no multiple of nb. The iterations run are ``E * (N // E)``:
    N, or up to E - 1 fewer (whole epochs only; the caller says so). E grows smoothly with N (N = 12 or 13 at
    nb = 4: 3 epochs either way), unlike a rule that needs N's divisors.
    """
    if largest_arm < 1 or batch < 1:
        raise ValueError("largest_arm and batch must be positive")
    nb = math.ceil(largest_arm / batch)
    if iterations is None:
        return Schedule(int(epochs or 1), nb, batch)
    e = max(1, iterations // nb)
    return Schedule(e, iterations // e, batch)


def epoch_list(arm: Arm, length: int) -> list[Item]:
    """The arm's training list of ``length`` entries: each image ``length // n`` times, plus one more copy of a
    seeded draw of ``length % n`` images (so counts differ by at most one); sorted by key as ultralytics sorts."""
    images = {i.key: i for i in arm.images}
    q, r = divmod(length, len(images))
    extra = set(
        ranked(images, arm.seed, f"extra{arm.share:g}" if arm.arm in (REAL, SYNTHETIC) else arm.name)[:r]
    )
    return [images[k] for k in sorted(images) for _ in range(q + (k in extra))]
