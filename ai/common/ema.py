"""Exponential moving average of the trained weights (``ema:`` in the training configs).

diffusers' ``EMAModel`` keeps the shadow copy; this wraps it for the trainers: one update every
``ema.every_n_steps`` optimizer steps, its state in every checkpoint (accelerate's custom objects, so a resume is
exact), and a context in which the trained parameters hold the averaged values, for validation and export.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class Ema:
    """EMA of the parameters of ``models`` that require gradients (the LoRA layers, the ControlNet).

    The shadow copy is fp32 on the parameters' device: one more copy of the trained weights in memory (a full SDXL
    ControlNet: 5 GB in fp32; a rank-32 LoRA: ~90 MB). ``decay`` applies per update; diffusers warms it up as
    min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not dominated by the initial weights.
    """

    def __init__(self, models: Sequence[torch.nn.Module], decay: float, every_n_steps: int):
        from diffusers.training_utils import EMAModel

        self.params = [p for m in models for p in m.parameters() if p.requires_grad]
        self.every_n_steps = every_n_steps
        self.average = EMAModel(self.params, decay=decay)
        self.average.shadow_params = [s.float() for s in self.average.shadow_params]

    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        if step % self.every_n_steps == 0:
            # EMAModel.step mixes in the live values in the shadow's dtype (fp32)
            self.average.step(self.params)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the trained parameters hold the averages; the live values come back after it."""
        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.average.shadow_params, strict=True):
                    p.copy_(s.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)

    # accelerate's register_for_checkpointing saves and restores these
    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.average.shadow_params = [s.to(device, torch.float32) for s in self.average.shadow_params]
