"""What ultralytics' trainer makes of a schedule: optimizer steps, warmup and mosaic, and the warnings they call for.

A pure copy of the *rule* (not the code) of ``ultralytics/engine/trainer.py`` (8.4), so ``--check`` can say it
before anything trains and a test can compare it with the steps a real training counts:

* gradients accumulate over ``accumulate = max(round(nbs / batch), 1)`` batches (``nbs``, the nominal batch, 64 by
  default), capped at the run's total batches; one optimizer step when ``ni - last_step >= accumulate``;
* warmup runs ``nw = round(min(warmup_epochs, max(epochs - 1, 0)) * nb)`` iterations (0: none; the last epoch is
  never warmup), during which ``accumulate`` ramps from 1 to its nominal value (``round(interp(ni, [0, nw],
  [1, acc]))``), so warmup steps more often than once per ``accumulate`` batches;
* mosaic (probability ``mosaic``) is switched off for the last ``close_mosaic`` epochs: it runs in
  ``max(epochs - close_mosaic, 0)`` epochs (all of them when ``close_mosaic`` is 0).

No ultralytics import: the defaults come from the caller (ultralytics' default.yaml merged with ``train.args``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from annotation.gain.design import Schedule

#: the ultralytics hyperparameters the recipe depends on
RECIPE_ARGS = ("nbs", "warmup_epochs", "close_mosaic", "mosaic")


@dataclass(frozen=True)
class Recipe:
    """What every arm's training does under one schedule."""

    iterations: int
    accumulate: int  # batches per optimizer step after warmup
    optimizer_steps: int
    warmup_iterations: int
    mosaic_epochs: int  # epochs trained with mosaic (0: none)
    epochs: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def optimizer_steps(nb: int, epochs: int, batch: int, nbs: int, warmup_epochs: float) -> tuple[int, int, int]:
    """(steps, nominal accumulate, warmup iterations) of ultralytics' training loop with ``nb`` batches per epoch."""
    total = nb * epochs
    acc0 = min(max(round(nbs / batch), 1), total)
    we = min(float(warmup_epochs), max(epochs - 1, 0))
    nw = round(we * nb) if we > 0 else 0
    accumulate, last, steps = acc0, -1, 0
    for ni in range(total):
        if nw and ni <= nw:
            accumulate = max(1, int(np.interp(ni, [0, nw], [1, acc0]).round()))
        if ni - last >= accumulate:
            steps, last = steps + 1, ni
    return steps, acc0, nw


def recipe(schedule: Schedule, args: Mapping[str, Any]) -> Recipe:
    """The recipe of ``schedule`` under ultralytics arguments ``args`` (needs every key of RECIPE_ARGS)."""
    steps, acc, nw = optimizer_steps(
        schedule.batches_per_epoch,
        schedule.epochs,
        schedule.batch,
        int(args["nbs"]),
        float(args["warmup_epochs"]),
    )
    close = int(args["close_mosaic"] or 0)
    mosaic = (
        0
        if not float(args["mosaic"] or 0)
        else schedule.epochs
        if close <= 0
        else max(schedule.epochs - close, 0)
    )
    return Recipe(schedule.iterations, acc, steps, nw, mosaic, schedule.epochs)


def recipe_warnings(r: Recipe, args: Mapping[str, Any], min_steps: int) -> list[str]:
    """Plain sentences for what the budget leaves out: warmup, mosaic, enough optimizer steps."""
    out = []
    if r.optimizer_steps < min_steps:
        out.append(
            f"every arm makes only {r.optimizer_steps} optimizer step(s) ({r.iterations} iterations, gradients "
            f"accumulated over {r.accumulate} batches to ultralytics' nominal batch nbs={args['nbs']}), fewer than "
            f"design.min_optimizer_steps={min_steps}: a model this briefly trained may learn nothing, and no gain "
            "can show; raise --iterations/--epochs, or set train.args.nbs to the batch (one step per batch)"
        )
    if float(args["warmup_epochs"] or 0) > 0 and r.warmup_iterations == 0:
        out.append(
            f"no warmup in any arm: {r.epochs} epoch(s), and ultralytics never warms up in the last epoch "
            f"(warmup_epochs={args['warmup_epochs']} asked for); the first steps run at the full learning rate. "
            "Raise the budget to 2+ epochs or set train.args.warmup_epochs=0 to make it explicit"
        )
    if float(args["mosaic"] or 0) > 0 and r.mosaic_epochs == 0:
        out.append(
            f"no mosaic in any arm: {r.epochs} epoch(s) <= close_mosaic={args['close_mosaic']} (ultralytics turns "
            "mosaic off for the last close_mosaic epochs); set train.args.close_mosaic to fewer epochs, or "
            "train.args.mosaic=0 to make it explicit"
        )
    return out
