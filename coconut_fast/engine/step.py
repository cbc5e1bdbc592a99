"""What the scheduler hands the runner for one step, and what the runner hands back."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sequence import Sequence


@dataclass
class ScheduledStep:
    """Each request of `chunks` computes its positions [num_computed, end). With `latent_steps` > 1 every
    request is one latent step in and runs that many latent steps back to back (the thought loop), its blocks
    for all of them already reserved."""

    chunks: list[tuple[Sequence, int]]
    latent_steps: int = 1

    @property
    def seqs(self) -> list[Sequence]:
        return [seq for seq, _ in self.chunks]


@dataclass
class StepOutput:
    """Per request of the step, in its order: the new thoughts [n, H] (latent work) or None, and the new
    token, or None where no token was computed or allowed; `switch`: the switch head's choice for requests
    with a learned thought count whose next input it picks (else None, or empty when there were none)."""

    thoughts: list[torch.Tensor | None]
    tokens: list[int | None]
    switch: list[bool | None] = field(default_factory=list)
