"""Counting what a step asks of the device: kernel launches and the bytes each must move.

The rule (what a CUDA graph of the region would hold, one node per launch):
- each Triton kernel launch (`kernel[grid](...)`) is one launch, whatever the grid; the host-side work of
  the Triton interpreter inside it is not counted;
- each aten op dispatched in the region is one launch, except ops that launch nothing: views and
  aliases (`view`, `reshape` as a view, `slice`, `select`, `t`, `transpose`, `expand`, `split`, ...),
  allocations without a fill (`empty`, `empty_like`, `empty_strided`), uploads of host data
  (`lift_fresh`: `torch.tensor(list)`; counted apart as `uploads`) and scalar reads (`item()`; counted
  apart as `host_syncs`).
So `reshape` of a non-contiguous tensor counts one (its `clone`), `torch.zeros` counts one (its fill),
and a Python `gelu_new` of eight element-wise ops counts eight.

Bytes: an aten op reads its tensor inputs and writes its outputs (an embedding or index lookup reads only
the rows it gathers); an engine kernel reads and writes what its `KERNEL_BYTES` model says (live K/V, not
the whole cache). The sum is what the launches must move without more fusion; `floor_bytes` in
`step.py` is what the step itself must move.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "alias", "as_strided", "slice", "select", "t", "transpose", "permute",
    "expand", "squeeze", "unsqueeze", "split", "split_with_sizes", "unbind", "chunk", "narrow", "detach",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "unflatten", "flatten",
    "view_as", "expand_as", "diagonal", "movedim", "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride",
    "is_nonzero", "set_", "_reshape_alias", "squeeze_", "unsqueeze_", "t_", "transpose_",
}
GATHERS = {"embedding", "index", "index_select"}  # read only the rows they return


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def aten_bytes(name: str, args, kwargs, out) -> int:
    outs = tensors(out)
    written = sum(nbytes(t) for t in outs)
    if name in GATHERS:  # the table is read only where gathered: the output's size, plus the indices
        indices = [t for t in tensors((args, kwargs)) if not t.is_floating_point()]
        return 2 * written + sum(nbytes(t) for t in indices)
    read = sum(nbytes(t) for t in tensors((args, kwargs)))
    return read + written


@dataclass
class Tally:
    launches: int = 0
    bytes: int = 0


@dataclass
class LaunchCount:
    """What a region launched: per kind (aten op or engine kernel name) launches and bytes."""

    by_kind: dict[str, Tally] = field(default_factory=dict)
    uploads: int = 0
    host_syncs: int = 0

    def add(self, kind: str, launches: int, moved: int) -> None:
        tally = self.by_kind.setdefault(kind, Tally())
        tally.launches += launches
        tally.bytes += moved

    @property
    def launches(self) -> int:
        return sum(t.launches for t in self.by_kind.values())

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.by_kind.values())

    def as_dict(self) -> dict:
        return {k: {"launches": t.launches, "bytes": t.bytes} for k, t in sorted(self.by_kind.items())}


class LaunchCounter(TorchDispatchMode):
    """Counts the launches of everything run inside `with counter:` (see the module's rule)."""

    def __init__(self):
        super().__init__()
        self.count = LaunchCount()
        self.kernel: list[str] = []  # the engine kernel being run (its launches and bytes are its own)
        self.paused = 0
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = func.overloadpacket.__name__
        if name == "lift_fresh":
            self.count.uploads += 1
        elif name == "_local_scalar_dense":
            self.count.host_syncs += 1
        elif name not in NO_LAUNCH:  # inside an engine kernel, its launches are its own and so are its bytes
            if self.kernel:
                self.count.add(self.kernel[-1], 1, 0)
            else:
                self.count.add(name, 1, aten_bytes(name, args, kwargs, out))
        return out

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    # ------------------------------------------------------------ engine kernels
    def wrap_kernels(self, ops) -> None:
        """Count each engine kernel of the namespace `ops` by its own byte model (in place)."""
        from .kernel_bytes import KERNEL_BYTES

        for name, fn in list(vars(ops).items()):
            if callable(fn) and name in KERNEL_BYTES:
                setattr(ops, name, self.counted_kernel(name, fn, KERNEL_BYTES[name]))

    def counted_kernel(self, name: str, fn, model):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.pause():
                moved = model(*args, **kwargs)  # before the call: some kernels advance their inputs in place
            self.kernel.append(name)
            try:
                out = fn(*args, **kwargs)
            finally:
                self.kernel.pop()
            self.count.add(name, 0, moved)
            self.calls[name] += 1
            return out

        return run


@contextlib.contextmanager
def counting_triton_launches(counter: LaunchCounter, execute: bool = True):
    """Inside: every Triton launch is one launch of the current kernel, and its own host work is not counted.

    `execute=False` counts the launches without running them (their outputs keep whatever the wrapper
    allocated): launches and byte models depend on the launch arguments only, never on tensor values."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        yield
        return
    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        launch = original(kernel, grid)

        def counted(*args, **kwargs):
            if not counter.paused:
                counter.count.add(counter.kernel[-1] if counter.kernel else "triton", 1, 0)
            if not execute:
                return None
            with counter.pause():
                return launch(*args, **kwargs)

        return counted

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original
