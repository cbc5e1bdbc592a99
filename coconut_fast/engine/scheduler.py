"""Continuous batching: which requests run in the next step, and for which positions.

Every step runs, for each scheduled request, the positions whose inputs are known: a new
request's prompt up to its first latent slot (prefill), one thought (thinking), or one new
token (answering); the three kinds share a step. Running requests go first, oldest first; when
the cache runs out of blocks the newest running request is preempted: its blocks are freed and
it waits (first in line) to be recomputed from its prompt, its thoughts and its tokens so far.
Waiting requests are admitted while free blocks, `max_num_seqs` and the step's token budget allow.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from .block_manager import BlockAllocator
from .sequence import Phase, Sequence, Status


@dataclass
class StepRecord:
    """What one step held: requests per phase, positions computed, requests preempted."""

    phases: dict[Phase, int]
    num_tokens: int
    num_preempted: int

    @property
    def mixed(self) -> bool:
        return sum(1 for n in self.phases.values() if n) > 1


@dataclass
class SchedulerStats:
    steps: list[StepRecord] = field(default_factory=list)
    num_preemptions: int = 0
    preempted_phases: Counter = field(default_factory=Counter)  # phase of each request when preempted
    peak_used_blocks: int = 0

    @property
    def num_mixed_steps(self) -> int:
        return sum(s.mixed for s in self.steps)

    def steps_with(self, *phases: Phase) -> int:
        """Steps holding at least one request in each of `phases`."""
        return sum(all(s.phases.get(p, 0) for p in phases) for s in self.steps)


class Scheduler:
    def __init__(self, blocks: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def check_fits(self, seq: Sequence) -> None:
        """A request must fit the whole pool alone, or preemption could never let it finish."""
        need = self.blocks.blocks_for(seq.max_length)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"request {seq.seq_id} needs up to {need} blocks of {self.blocks.block_size} tokens "
                f"(prompt {seq.prompt_len} + max_new_tokens {seq.sampling.max_new_tokens}); the cache has "
                f"{self.blocks.num_blocks}: give the engine more blocks or a larger memory_fraction")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.stats.preempted_phases[seq.phase] += 1
        self.blocks.free(seq)
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(request, end) pairs: each request runs its positions [num_computed, end) in the next step."""
        scheduled: list[tuple[Sequence, int]] = []
        queue, preempted = deque(self.running), 0
        while queue:
            seq = queue.popleft()
            end = seq.next_chunk_end()
            while not self.blocks.can_append(seq, end) and queue:
                self.preempt(queue.pop())
                preempted += 1
            if not self.blocks.can_append(seq, end):
                self.preempt(seq)
                preempted += 1
                continue
            self.blocks.append(seq, end)
            scheduled.append((seq, end))
        num_tokens = sum(end - seq.num_computed for seq, end in scheduled)
        # a step that had to preempt admits nobody: the freed blocks go to the running requests
        while self.waiting and not preempted and len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            end = seq.next_chunk_end()
            if not self.blocks.can_allocate(seq, end):
                break
            cached = len(self.blocks.cached_blocks(seq)) * self.blocks.block_size
            if scheduled and num_tokens + end - cached > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, end)
            seq.status = Status.RUNNING
            num_tokens += end - seq.num_computed
            scheduled.append((seq, end))
        self.running = [seq for seq, _ in scheduled]
        if scheduled:
            self.stats.steps.append(StepRecord(Counter(seq.phase for seq, _ in scheduled), num_tokens, preempted))
            self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.blocks.num_used_blocks)
        return scheduled

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.blocks.free(seq)
        self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished request and free its blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
