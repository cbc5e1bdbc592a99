"""Temperature / top-k / top-p as transformers' logits warpers, shared by both generation backends."""
from __future__ import annotations

from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def logits_warpers(temperature: float, top_k: int, top_p: float) -> list:
    """The warpers that turn logits into the sampling distribution, in transformers' order; checks the values."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers
