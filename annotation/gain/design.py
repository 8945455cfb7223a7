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


@dataclass(frozen=True)
class Arm:
    """One training run's data: the real images and the synthetic ones of a share, for one seed."""

    share: float
    seed: int
    real: tuple[Item, ...]
    synthetic: tuple[Item, ...]

    @property
    def name(self) -> str:
        return f"share{self.share:g}_seed{self.seed}"

    @property
    def images(self) -> tuple[Item, ...]:
        return self.real + self.synthetic


def design_arms(
    real: Sequence[Item], synthetic: Sequence[Item], shares: Sequence[float], seed: int, max_real: int | None
) -> list[Arm]:
    """One arm per share for ``seed``: the same real images in each (all, or a seeded draw of ``max_real``), and a
    seeded draw of synthetic images per share that contains every smaller share's draw."""
    by_key = {i.key: i for i in real}
    keys = sorted(by_key)
    if max_real is not None:
        if max_real > len(keys):
            raise UserError(f"--max_real {max_real}: the real train split has only {len(keys)} images")
        keys = sorted(ranked(keys, seed, "real")[:max_real])
    real_used = tuple(by_key[k] for k in keys)
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
    """The schedule every arm shares: ``nb = ceil(largest_arm / batch)`` batches per epoch (full batches only);
    with ``iterations`` N, E is the largest divisor of N with N / E >= that nb (E = 1 when N is smaller)."""
    if largest_arm < 1 or batch < 1:
        raise ValueError("largest_arm and batch must be positive")
    nb = math.ceil(largest_arm / batch)
    if iterations is None:
        return Schedule(int(epochs or 1), nb, batch)
    fits = [e for e in range(1, iterations + 1) if iterations % e == 0 and iterations // e >= nb]
    e = max(fits) if fits else 1
    return Schedule(e, iterations // e, batch)


def epoch_list(arm: Arm, length: int) -> list[Item]:
    """The arm's training list of ``length`` entries: each image ``length // n`` times, plus one more copy of a
    seeded draw of ``length % n`` images (so counts differ by at most one); sorted by key as ultralytics sorts."""
    images = {i.key: i for i in arm.images}
    q, r = divmod(length, len(images))
    extra = set(ranked(images, arm.seed, f"extra{arm.share:g}")[:r])
    return [images[k] for k in sorted(images) for _ in range(q + (k in extra))]
