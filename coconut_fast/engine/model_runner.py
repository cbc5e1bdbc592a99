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
        self.kernels = select_kernels(kernels)
        self.forward = build_forward(causal_lm, self.kernels, max_positions)
        self.embed = causal_lm.get_input_embeddings()
        self.lm_head = causal_lm.get_output_embeddings()
        self.block_size = block_size
        self.cache = PagedKVCache(kv_shape(causal_lm)[0], num_blocks, block_size, self.forward.num_kv_heads,
                                  self.forward.head_dim, self.dtype, self.device)
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
        dev = self.device
        meta = StepMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [scratch] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            num_decode=len(chunks) - (len(cu_seqlens) - 1),
            prefill_cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32, device=dev),
        )
        embeds = self.embed(torch.tensor(token_ids, dtype=torch.int64, device=dev))
        if thoughts:
            embeds[torch.tensor(thought_rows, device=dev)] = torch.stack(thoughts).to(embeds.dtype)
        return embeds, meta

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
        if self.graphs is not None and meta.num_decode == len(ordered) and self.graphs.fits(*meta.block_tables.shape):
            hidden = self.graphs.decode(embeds, meta)
        else:
            hidden = self.forward(embeds, meta, self.cache)
        counts = torch.tensor([end - seq.num_computed for seq, end in ordered], device=self.device)
        last = hidden[counts.cumsum(0) - 1]
        output = StepOutput([None] * len(chunks), [None] * len(chunks))
        wants = []
        for row, (i, (seq, end)) in enumerate(zip(order, ordered)):
            if not seq.wants_token(end):
                output.thoughts[i] = last[row : row + 1].clone()
            elif seq.sampling.max_new_tokens > len(seq.output_token_ids):
                wants.append((row, i, seq))
        if wants:
            logits = self.lm_head(last[[row for row, _, _ in wants]]).float()
            for (_, i, _), token in zip(wants, self.sample(logits, [seq for _, _, seq in wants])):
                output.tokens[i] = token
        return output

    def run_thought_loop(self, seqs: list[Sequence], num_steps: int) -> StepOutput:
        """`num_steps` latent steps of each request, back to back on the graph runner (blocks for the positions
        must be reserved)."""
        embeds, meta = self.prepare([(seq, seq.num_computed + 1) for seq in seqs])
        thoughts = self.graphs.thought_loop(embeds, meta, num_steps).transpose(0, 1).clone()  # [n, steps, H]
        return StepOutput(list(thoughts.unbind(0)), [None] * len(seqs))

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
