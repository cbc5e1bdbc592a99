"""CUDA graphs for the engine's single-position steps: the thought loop and the decode step.

A step whose rows all compute one position runs on static buffers of its batch-size bucket (1, 2, 4, …,
256), rows past the batch being padding (slot -1: nothing written, output ignored). Two graphs per bucket:

- `ThoughtLoopGraph`: n latent steps × all layers back to back; each step's fused feedback (final norm ->
  next input, positions / slots / context lengths advanced on the device) feeds the next, so the loop
  replays with no host work inside. One graph per (bucket, n).
- the decode graph: one forward of all layers -> final-norm hidden states (the LM head and sampling run
  after it, eagerly).

All graphs share one memory pool and are captured on first use. Without CUDA, or when capture fails (the
torch reference kernels sync with the host, say), the same static-buffer code runs eagerly, said once.
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch

from .layers import StepMetadata

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(batch: int) -> int | None:
    """The smallest bucket that holds `batch` rows, or None when the batch is larger than every bucket."""
    return next((b for b in BATCH_BUCKETS if b >= batch), None)


class StaticInputs:
    """One bucket's input buffers; the graphs of the bucket read (and the thought loop advances) them."""

    def __init__(self, rows: int, hidden: int, max_blocks: int, scratch_block: int, dtype: torch.dtype,
                 device: torch.device):
        self.rows, self.scratch_block = rows, scratch_block
        self.embeds = torch.zeros(rows, hidden, dtype=dtype, device=device)
        self.meta = StepMetadata(
            positions=torch.zeros(rows, dtype=torch.int64, device=device),
            slot_mapping=torch.full((rows,), -1, dtype=torch.int64, device=device),
            block_tables=torch.full((rows, max_blocks), scratch_block, dtype=torch.int32, device=device),
            context_lens=torch.ones(rows, dtype=torch.int32, device=device),
            num_decode=rows,
            prefill_cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device),
        )

    def load(self, embeds: torch.Tensor, meta: StepMetadata) -> None:
        """Copy a step's single-position inputs in; the rows past them become padding."""
        n, width = embeds.shape[0], meta.block_tables.shape[1]
        m = self.meta
        self.embeds[:n].copy_(embeds)
        m.positions[:n].copy_(meta.positions)
        m.slot_mapping[:n].copy_(meta.slot_mapping)
        m.context_lens[:n].copy_(meta.context_lens)
        m.block_tables[:n, :width].copy_(meta.block_tables)
        m.block_tables[:n, width:].fill_(self.scratch_block)  # a loop step past the reserved blocks lands there
        m.positions[n:].zero_()
        m.slot_mapping[n:].fill_(-1)
        m.context_lens[n:].fill_(1)
        m.block_tables[n:].fill_(self.scratch_block)

    def snapshot(self) -> list[torch.Tensor]:
        m = self.meta
        return [t.clone() for t in (self.embeds, m.positions, m.slot_mapping, m.context_lens)]

    def restore(self, saved: list[torch.Tensor]) -> None:
        m = self.meta
        for dst, src in zip((self.embeds, m.positions, m.slot_mapping, m.context_lens), saved):
            dst.copy_(src)


class ThoughtLoopGraph:
    """`num_steps` latent steps over a bucket's static inputs; thoughts land in `thoughts` [num_steps, rows, H]."""

    def __init__(self, forward, cache, inputs: StaticInputs, num_steps: int, block_size: int):
        self.forward, self.cache, self.inputs = forward, cache, inputs
        self.num_steps, self.block_size = num_steps, block_size
        self.thoughts = torch.empty(num_steps, *inputs.embeds.shape, dtype=inputs.embeds.dtype,
                                    device=inputs.embeds.device)

    def __call__(self) -> None:
        inputs = self.inputs
        for i in range(self.num_steps):
            hidden, residual = self.forward.body(inputs.embeds, inputs.meta, self.cache)
            self.forward.feedback(hidden, residual, inputs.meta, self.thoughts[i], inputs.embeds, self.block_size)


class DecodeGraph:
    """One forward of a bucket's static inputs; the final-norm hidden states land in `hidden` [rows, H]."""

    def __init__(self, forward, cache, inputs: StaticInputs):
        self.forward, self.cache, self.inputs = forward, cache, inputs
        self.hidden = torch.empty_like(inputs.embeds)

    def __call__(self) -> None:
        self.hidden.copy_(self.forward(self.inputs.embeds, self.inputs.meta, self.cache))


class GraphRunner:
    """Buckets, static buffers, and the graphs captured on them (or the same bodies run eagerly)."""

    def __init__(self, forward, cache, hidden: int, max_blocks: int, dtype: torch.dtype, device: torch.device):
        self.forward, self.cache = forward, cache
        self.hidden, self.max_blocks, self.dtype, self.device = hidden, max_blocks, dtype, device
        self.inputs: dict[int, StaticInputs] = {}
        self.bodies: dict[tuple, ThoughtLoopGraph | DecodeGraph] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.replays: Counter[tuple] = Counter()  # replays per graph key (benchmarks check graphs really ran)
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.eager_reason: str | None = None
        if not self.capture:
            self.fall_back(f"CUDA graphs need a CUDA device, the model is on {device.type}")

    def fall_back(self, reason: str) -> None:
        """Run every later step eagerly, and say why once."""
        self.capture = False
        if self.eager_reason is None:
            self.eager_reason = reason
            warnings.warn(f"coconut_fast engine: {reason}; running the static-buffer steps eagerly", stacklevel=3)

    def bucket_inputs(self, batch: int) -> StaticInputs:
        rows = bucket_for(batch)
        if rows not in self.inputs:
            self.inputs[rows] = StaticInputs(rows, self.hidden, self.max_blocks, self.cache.scratch_block,
                                             self.dtype, self.device)
        return self.inputs[rows]

    def fits(self, batch: int, width: int) -> bool:
        return bucket_for(batch) is not None and width <= self.max_blocks

    # ------------------------------------------------------------ running
    def thought_loop(self, embeds: torch.Tensor, meta: StepMetadata, num_steps: int) -> torch.Tensor:
        """Thoughts [num_steps, n, H] of n rows, starting from their input thoughts `embeds` at meta's positions
        (whose blocks must already cover the next num_steps positions)."""
        inputs = self.bucket_inputs(embeds.shape[0])
        inputs.load(embeds, meta)
        key = ("thoughts", inputs.rows, num_steps)
        if key not in self.bodies:
            self.bodies[key] = ThoughtLoopGraph(self.forward, self.cache, inputs, num_steps, self.cache.block_size)
        self.run(key)
        return self.bodies[key].thoughts[:, : embeds.shape[0]]

    def decode(self, embeds: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """Final-norm hidden states [n, H] of n single-position rows."""
        inputs = self.bucket_inputs(embeds.shape[0])
        inputs.load(embeds, meta)
        key = ("decode", inputs.rows)
        if key not in self.bodies:
            self.bodies[key] = DecodeGraph(self.forward, self.cache, inputs)
        self.run(key)
        return self.bodies[key].hidden[: embeds.shape[0]]

    def run(self, key: tuple) -> None:
        body = self.bodies[key]
        if self.capture and key not in self.graphs:
            self.try_capture(key, body)
        if key in self.graphs:
            self.graphs[key].replay()
            self.replays[key] += 1
        else:
            body()

    def try_capture(self, key: tuple, body) -> None:
        """Warm up on the real inputs (compiles kernels, sets up cuBLAS), put the inputs back, capture.

        The caller's stream is current again afterwards whatever fails: a capture that fails in capture_end leaves
        torch's capture stream current, and the eager fallback must not run on it."""
        saved = body.inputs.snapshot()
        stream = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        failure = None
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                body()
            stream.wait_stream(side)
            body.inputs.restore(saved)
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    body()
            except Exception as error:  # e.g. a kernel that syncs with the host
                failure = error
        finally:
            torch.cuda.set_stream(stream)
        if failure is not None:
            torch.cuda.synchronize(self.device)
            body.inputs.restore(saved)
            self.fall_back(f"CUDA graph capture failed ({type(failure).__name__}: {failure})")
            return
        self.graphs[key] = graph
