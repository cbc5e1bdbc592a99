"""torch.distributed for training: process group from torchrun's variables, DDP / FSDP2 wrapping,
deterministic data sharding, and forward calls kept in step across ranks.

FSDP2 gathers a layer's weights in every call of that layer, so all ranks must make the same
number of backbone calls. Training equalizes the number of latent passes per micro-batch
(`equalize_latent_passes`); evaluation, whose generation length differs per rank, votes before
every call (`SyncedForward`, the official runner's `synced_gpus`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..passes import latent_layout


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce(values: list[float], ctx: DistContext, op=None) -> list[float]:
    """Sum (or `op`) of a few numbers over ranks, in float64."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, ctx: DistContext):
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- data sharding
def shard_batches(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[int]]:
    """This rank's micro-batches (sample indices) of an epoch.

    The epoch's order is a permutation seeded by seed + epoch (as DistributedSampler), padded by
    wrapping to a multiple of world_size. Consecutive chunks of batch_size * world_size samples are
    the global batches; rank r takes the r-th slice of each. So global batch = per-rank batch x world
    size, every rank gets the same number of micro-batches, and one process with
    gradient_accumulation_steps x world_size sees the very same micro-batches.
    """
    if num_samples < 1:
        raise ValueError("the training set is empty")
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(num_samples))
    pad = -len(order) % world_size
    order += (order * (pad // len(order) + 1))[:pad]
    chunk = batch_size * world_size
    batches = []
    for start in range(0, len(order), chunk):
        piece = order[start : start + chunk]
        per_rank = len(piece) // world_size
        batches.append(piece[rank * per_rank : (rank + 1) * per_rank])
    return batches


# ---------------------------------------------------------------------- wrapping
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The HF model's transformer blocks (the classes it lists in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard "
                         f"(_no_split_modules={sorted(names)})")
    return layers


def wrap_model(coconut: nn.Module, ctx: DistContext, parallel: str) -> nn.Module:
    """DDP or FSDP2 around a CoconutModel; the model itself when not distributed."""
    if not ctx.enabled:
        return coconut
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(coconut, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for layer in decoder_layers(coconut.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(coconut, mesh=mesh)  # the root unit: embeddings, final norm, LM head
        return coconut
    raise ValueError(f"parallel must be 'ddp' or 'fsdp2', got {parallel!r}")


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_gradient_sync(model: nn.Module, skip: bool):
    """Context for a micro-step: no gradient all-reduce / reduce-scatter while accumulating."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync() if skip else contextlib.nullcontext()
    if is_fsdp(model):
        model.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------- forward calls in step
def latent_pass_count(batch: dict, latent_id: int) -> int:
    """Single-column latent passes `CoconutModel.forward` makes for a batch: its aligned latent span."""
    span = latent_layout(batch["input_ids"] == latent_id, batch["attention_mask"]).span
    return 0 if span is None else span[1] - span[0] + 1


def equalize_latent_passes(batch: dict, latent_id: int, pad_id: int, ctx: DistContext) -> dict:
    """Give this rank's batch as many latent passes as the busiest rank's, with one extra row.

    The row is a token, the missing number of latents, and a token, all without labels: it adds
    nothing to the loss or the gradients, only the passes that keep FSDP2's gathers in step.
    """
    if not ctx.enabled:
        return batch
    need = latent_pass_count(batch, latent_id)
    most = int(all_reduce([need], ctx, op=dist.ReduceOp.MAX)[0])
    if need == most:
        return batch
    row_len = most + 2
    width = max(batch["input_ids"].shape[1], row_len)
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "position_ids": 0}
    out = {}
    for key, t in batch.items():
        if key not in fills:
            out[key] = t
            continue
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fills[key])
        row = t.new_full((1, width), fills[key])
        if key == "input_ids":
            row[0, :row_len] = torch.tensor([pad_id] + [latent_id] * most + [pad_id])
        elif key == "attention_mask":
            row[0, :row_len] = 1
        elif key == "position_ids":
            row[0, :row_len] = torch.arange(row_len)
        out[key] = torch.cat([t, row])
    return out


class SyncedForward:
    """Keeps every rank's backbone calls in step during evaluation.

    Before each backbone call the ranks vote (an all-reduce of "still working"); a rank that is done
    calls `finish()`, which keeps making one-token dummy calls as long as another rank still works.
    Under FSDP2 the root unit (embeddings, LM head) stays gathered for the whole block.
    `forward_calls` counts this rank's backbone calls, the `dummy_calls` among them included.
    """

    def __init__(self, coconut: nn.Module, ctx: DistContext):
        self.coconut, self.ctx = coconut, ctx
        self.forward_calls = self.dummy_calls = 0
        self._idle = False
        self._hook = None

    def __enter__(self) -> "SyncedForward":
        self._hook = self.coconut.backbone.model.register_forward_pre_hook(self._before_call)
        if self.ctx.enabled and is_fsdp(self.coconut):
            self.coconut.unshard()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self._hook.remove()
            if self.ctx.enabled and is_fsdp(self.coconut):
                self.coconut.reshard()

    def _vote(self, working: int) -> int:
        if not self.ctx.enabled:
            return working
        t = torch.tensor([working], device=self.ctx.device)
        dist.all_reduce(t)
        return int(t)

    def _before_call(self, module, args) -> None:
        self.forward_calls += 1
        if not self._idle:
            self._vote(1)

    def finish(self) -> None:
        """Make dummy calls until no rank works any more."""
        self._idle = True
        backbone = self.coconut.backbone
        weight = self.coconut.model.get_input_embeddings().weight
        while self._vote(0) > 0:
            embeds = torch.zeros(1, 1, weight.shape[-1], dtype=weight.dtype, device=self.ctx.device)
            ones = torch.ones(1, 1, dtype=torch.long, device=self.ctx.device)
            self.dummy_calls += 1
            with torch.no_grad():
                backbone(embeds, ones, ones * 0, None)
