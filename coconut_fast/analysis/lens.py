"""The logit lens of continuous thoughts: each thought decoded through the LM head, and its geometry."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lens_probs(lm_head, thoughts: torch.Tensor) -> torch.Tensor:
    """Vocabulary distributions [..., V] (float32) of thoughts [..., H].

    A thought is already the last layer's output after the final norm, so the LM head alone
    decodes it, as it would decode the hidden state of a language token."""
    return lm_head(thoughts).float().softmax(-1)


def top_tokens(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable tokens of each distribution: (probabilities, token ids), highest first."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
    return probs.topk(min(k, probs.shape[-1]), dim=-1)


def thought_norms(thoughts: torch.Tensor) -> torch.Tensor:
    """L2 norm of each thought [..., n, H] -> [..., n], in float32."""
    return thoughts.float().norm(dim=-1)


def consecutive_cosines(thoughts: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of thought i-1 and thought i for i = 1..n-1: [..., n, H] -> [..., n-1]."""
    t = thoughts.float()
    return F.cosine_similarity(t[..., :-1, :], t[..., 1:, :], dim=-1)
