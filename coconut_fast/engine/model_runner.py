"""Runs one engine step: builds the flattened batch, runs the forward, turns hidden states into
thoughts or sampled tokens.

A step holds three kinds of work side by side, one per request:
- prefill: a request's prompt through `<bot>` (or, after preemption, everything known so far);
- latent: the input is the previous thought; the final-norm hidden state becomes the next
  thought, and the LM head is skipped (a thought loop runs several latent steps back to back);
- decode: the input is the last token's embedding; LM head, then greedy or sampled token.
"""
from __future__ import annotations

import functools
import itertools

import torch

from ..sampling import logits_warpers
from . import cuda_graph
from .cuda_graph import GraphRunner
from .kv_cache import PagedKVCache, kv_shape
from .layers import StepMetadata, select_kernels
from .models import build_forward
from .sequence import SamplingParams, Sequence
from .step import ScheduledStep, StepOutput


@functools.lru_cache(maxsize=64)
def warpers_for(params: SamplingParams) -> tuple:
    """transformers' temperature / top-k / top-p logits warpers for a request's sampling parameters."""
    return tuple(logits_warpers(params.temperature, params.top_k, params.top_p))


class ModelRunner:
    def __init__(self, causal_lm, num_blocks: int, block_size: int, max_positions: int, kernels: str = "auto",
                 cuda_graphs: bool = False):
        self.model = causal_lm
        self.device = causal_lm.device
        self.dtype = causal_lm.get_input_embeddings().weight.dtype
        self.kernels = select_kernels(kernels, self.device, self.dtype)
        self.forward = build_forward(causal_lm, self.kernels, max_positions)
        self.embed = causal_lm.get_input_embeddings()
        self.lm_head = causal_lm.get_output_embeddings()
        self.block_size = block_size
        self.cache = PagedKVCache(kv_shape(causal_lm)[0], num_blocks, block_size, self.forward.num_kv_heads,
                                  self.forward.head_dim, self.dtype, self.device)
        self.switch_head = None  # the model's switch head (set by the LLM): decides for learned thought counts
        self.graphs = None
        if cuda_graphs:
            self.graphs = GraphRunner(self.forward, self.cache, self.embed.weight.shape[1],
                                      -(-max_positions // block_size), self.dtype, self.device)

    @property
    def loop_rows(self) -> int:
        """The most requests one captured thought loop takes (0 without graphs)."""
        return cuda_graph.BATCH_BUCKETS[-1] if self.graphs is not None else 0

    # ------------------------------------------------------------ batch
    def prepare(self, chunks: list[tuple[Sequence, int]]):
        """Flattened inputs of the step; decode chunks (one position) come first."""
        bs, scratch = self.block_size, self.cache.scratch_block
        token_ids, positions, slots, thought_rows, thoughts = [], [], [], [], []
        cu_seqlens, context_lens, tables = [0], [], []
        for seq, end in chunks:
            start = seq.num_computed
            row0 = len(token_ids)
            token_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            for pos, j in seq.thought_slots(start, end):
                thought_rows.append(row0 + pos - start)
                thoughts.append(seq.thoughts[j])
            if end - start > 1:
                cu_seqlens.append(cu_seqlens[-1] + end - start)
            context_lens.append(end)
            tables.append(seq.block_table)
        width = max(len(t) for t in tables)
        n, B = len(token_ids), len(chunks)
        # two uploads for the whole step: the int64 rows and the int32 tables
        longs = self.upload(token_ids + positions + slots + thought_rows, torch.int64)
        ints = self.upload([b for t in tables for b in t + [scratch] * (width - len(t))] + context_lens + cu_seqlens,
                           torch.int32)
        meta = StepMetadata(
            positions=longs[n : 2 * n],
            slot_mapping=longs[2 * n : 3 * n],
            block_tables=ints[: B * width].view(B, width),
            context_lens=ints[B * width : B * width + B],
            num_decode=B - (len(cu_seqlens) - 1),
            prefill_cu_seqlens=ints[B * width + B :],
            max_context=max(context_lens),
        )
        if len(thoughts) == n:  # every input is a thought (a latent step): no token to look up
            return torch.stack(thoughts).to(self.dtype), meta
        embeds = self.embed(longs[:n])
        if thoughts:
            embeds[longs[3 * n :]] = torch.stack(thoughts).to(embeds.dtype)
        return embeds, meta

    def upload(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Host integers on the device: through pinned memory and a non-blocking copy where there is a GPU."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------ step
    @torch.no_grad()
    def run(self, step: ScheduledStep) -> StepOutput:
        """The step's new thoughts and tokens, per request in the step's order."""
        if step.latent_steps > 1:
            return self.run_thought_loop(step.seqs, step.latent_steps)
        chunks = step.chunks
        order = sorted(range(len(chunks)), key=lambda i: chunks[i][1] - chunks[i][0].num_computed > 1)
        ordered = [chunks[i] for i in order]
        embeds, meta = self.prepare(ordered)
        static = (self.graphs is not None and meta.num_decode == len(ordered)
                  and self.graphs.fits(*meta.block_tables.shape))  # the graph's buffer: reused by the next step
        hidden = self.graphs.decode(embeds, meta) if static else self.forward(embeds, meta, self.cache)
        if meta.num_decode < len(ordered):  # the last row of each request
            ends = list(itertools.accumulate(end - seq.num_computed for seq, end in ordered))
            hidden, static = hidden[self.upload([e - 1 for e in ends], torch.int64)], False
        output = StepOutput([None] * len(chunks), [None] * len(chunks))
        latent, wants = [], []
        for row, (i, (seq, end)) in enumerate(zip(order, ordered)):
            if not seq.wants_token(end):
                latent.append((row, i))
            elif seq.sampling.max_new_tokens > len(seq.output_token_ids):
                wants.append((row, i, seq))
        if latent:  # one gather (or one copy out of a graph's buffer) for all new thoughts; each a view of it
            rows = [row for row, _ in latent]
            if len(rows) < len(ordered):
                thoughts = hidden[self.upload(rows, torch.int64)]
            else:
                thoughts = hidden.clone() if static else hidden
            for j, (_, i) in enumerate(latent):
                output.thoughts[i] = thoughts[j : j + 1]
            self.decide_switch(output, thoughts, [(j, i, chunks[i]) for j, (_, i) in enumerate(latent)])
        if wants:
            rows = [row for row, _, _ in wants]
            logits = self.lm_head(hidden if len(rows) == len(ordered) else hidden[self.upload(rows, torch.int64)])
            for (_, i, _), token in zip(wants, self.sample(logits.float(), [seq for _, _, seq in wants])):
                output.tokens[i] = token
        return output

    def run_thought_loop(self, seqs: list[Sequence], num_steps: int) -> StepOutput:
        """`num_steps` latent steps of each request, back to back on the graph runner (blocks for the positions
        must be reserved)."""
        embeds, meta = self.prepare([(seq, seq.num_computed + 1) for seq in seqs])
        thoughts = self.graphs.thought_loop(embeds, meta, num_steps).transpose(0, 1).clone()  # [n, steps, H]
        return StepOutput(list(thoughts.unbind(0)), [None] * len(seqs))

    def decide_switch(self, output: StepOutput, thoughts: torch.Tensor, rows) -> None:
        """The switch head on the step's thoughts of requests whose next input it picks: one GEMM for all."""
        deciding = [(j, i, seq) for j, i, (seq, end) in rows if seq.needs_decision(end)]
        if not deciding:
            return
        if self.switch_head is None:
            raise RuntimeError("a request thinks until its switch head says switch, but the model has no switch head")
        index = self.upload([j for j, _, _ in deciding], torch.int64)
        p = self.switch_head.switch_probability(thoughts[index]).tolist()
        output.switch = [None] * len(output.thoughts)
        for prob, (_, i, seq) in zip(p, deciding):
            output.switch[i] = prob >= seq.auto[1]

    @staticmethod
    def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Greedy argmax, or a draw from the warped distribution with the request's own generator."""
        tokens = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            if seq.sampling.do_sample:
                row = logits[i : i + 1]
                for warp in warpers_for(seq.sampling):
                    row = warp(None, row)
                tokens[i] = int(torch.multinomial(row.softmax(-1), 1, generator=seq.generator))
        return tokens
