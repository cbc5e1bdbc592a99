"""One GEMM where HF has several: the q/k/v projections as one matrix and gate/up as one (Llama family).

The fused matrix is built once when the engine is built and the HF parameters become views of it (the same
Parameter objects, repointed with `.data`): there is no second copy of the weights, and an optimizer, the
torch backend and the engine all read and update the same storage. A later engine finds the fusion in place
and reuses it.
"""
from __future__ import annotations

import torch


def backs(fused: torch.Tensor | None, parts: list[torch.Tensor]) -> bool:
    """Whether `parts` are, in order, the consecutive row blocks of `fused`."""
    if fused is None:
        return False
    offset = fused.data_ptr()
    for part in parts:
        if part.data_ptr() != offset or part.dtype != fused.dtype or part.device != fused.device:
            return False
        offset += part.numel() * part.element_size()
    return offset == fused.data_ptr() + fused.numel() * fused.element_size()


def fuse_rows(tensors: list[torch.Tensor], previous: torch.Tensor | None) -> torch.Tensor:
    """The [sum of rows, ...] tensor whose row blocks `tensors` now view (reused when they already do)."""
    if backs(previous, tensors):
        return previous
    with torch.no_grad():
        fused = torch.cat([t.detach() for t in tensors])
    start = 0
    for t in tensors:
        t.data = fused[start : start + t.shape[0]]  # same Parameter object: optimizers keep their references
        start += t.shape[0]
    return fused


def fuse_linears(owner: torch.nn.Module, name: str, linears: list[torch.nn.Linear]) -> tuple:
    """(weight, bias or None) of the Linear layers stacked by output rows, kept on `owner` as `name`."""
    weight, bias = getattr(owner, name, (None, None))
    weight = fuse_rows([lin.weight for lin in linears], weight)
    biases = [lin.bias for lin in linears]
    if all(b is not None for b in biases):
        bias = fuse_rows(biases, bias)
    elif any(b is not None for b in biases):
        raise NotImplementedError(f"{name}: some of the fused projections have a bias and some do not")
    else:
        bias = None
    owner.__dict__[name] = (weight, bias)  # a plain attribute: not a parameter, not in state_dict
    return weight, bias
