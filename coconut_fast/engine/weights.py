"""What the engine knows about the model's weights: whether they moved, changed or would drop activations.

The engine runs on the HF weights in place, and its prefix cache holds K/V computed from them. Before new work it
compares the weights with what it saw last: new storage (a parameter replaced) means new kernels' pointers; the
same storage with other values means stale cached K/V. Values are compared through a fingerprint (each
parameter's float32 sum, row-index-weighted sum and L2 norm, on its device) so that writes no version counter
records (`p.data.mul_`, fused optimizers) are seen too. A change that keeps all three bit for bit (values swapped
within one row, say) is not seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WeightState:
    """The parameters' storage pointers and version counters (host-side, free to read) and their value
    fingerprint (a [3, P] float32 tensor on the parameters' device, or None before it is taken)."""

    pointers: list[int]
    versions: list[int]
    fingerprint: torch.Tensor | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, with_values: bool = True) -> "WeightState":
        params = list(model.parameters())
        return cls([p.data_ptr() for p in params], [p._version for p in params],
                   value_fingerprint(params) if with_values else None)

    def same_storage(self, other: "WeightState") -> bool:
        return self.pointers == other.pointers

    def same_values(self, other: "WeightState") -> bool:
        """True when nothing seen changed: versions, and the fingerprints where both were taken."""
        if self.versions != other.versions:
            return False
        if self.fingerprint is None or other.fingerprint is None:
            return True
        return self.fingerprint.shape == other.fingerprint.shape and torch.equal(self.fingerprint, other.fingerprint)


@torch.no_grad()
def value_fingerprint(params: list[torch.Tensor]) -> torch.Tensor | None:
    """[3, P]: per parameter, the sum, the sum of its rows weighted by their index, and the L2 norm, in float32.
    One row-sum launch per parameter, the rest a few launches in all (the norms in one multi-tensor launch).
    Deterministic for the same values on the same device and thread count; rows moved within a tensor change the
    weighted sum, values moved within a row are not seen."""
    if not params:
        return None
    tensors = [p.detach() for p in params]
    device = tensors[0].device
    rows = [t.reshape(t.shape[0] if t.dim() else 1, -1).sum(1, dtype=torch.float32) for t in tensors]
    counts = torch.tensor([r.numel() for r in rows], device=device)
    owner = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
    row_sums = torch.cat(rows)
    first = torch.cumsum(counts, 0) - counts  # each parameter's first row in row_sums
    index = torch.arange(row_sums.numel(), device=device) - first[owner] + 1
    sums = torch.zeros(len(rows), device=device).index_add_(0, owner, row_sums)
    weighted = torch.zeros(len(rows), device=device).index_add_(0, owner, row_sums * index)
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)]).to(device)
    return torch.stack([sums, weighted, norms])


def active_dropout(model: torch.nn.Module) -> list[str]:
    """Names of the modules that would drop activations now (training mode and a probability > 0)."""
    names = []
    for name, module in model.named_modules():
        p = module.p if isinstance(module, torch.nn.Dropout) else getattr(module, "attention_dropout", 0.0)
        if module.training and isinstance(p, (int, float)) and p > 0:
            names.append(name or type(module).__name__)
    return names
