"""Continuous batching: which requests run in the next step, and for which positions.

Every step runs, for each scheduled request, the positions whose inputs are known: a new
request's prompt up to its first latent slot (prefill), one thought (latent), or one new
token (decode); the three kinds share a step. When captured thought loops are on and every
scheduled request is one latent step in, the step runs as many latent steps back to back as all of
them allow (blocks for all of them reserved here). Running requests go first, oldest first; when
the cache runs out of blocks the newest running request is preempted: its blocks are freed and
it waits (first in line) to be recomputed from its prompt, its thoughts and its tokens so far.
Waiting requests are admitted while free blocks, `max_num_seqs` and the step's token budget allow.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from .block_manager import BlockAllocator
from .sequence import Phase, Sequence, Status
from .step import ScheduledStep, StepOutput


@dataclass
class StepRecord:
    """What one step held: requests per phase, positions computed, requests preempted."""

    phases: dict[Phase, int]
    num_tokens: int
    num_preempted: int
    num_cached_tokens: int = 0  # prompt positions of the requests admitted here found in cached blocks

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
    """`loop_rows`: the most requests a captured thought loop takes (0: no thought loops)."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int, loop_rows: int = 0):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.allocator = allocator
        self.loop_rows = loop_rows
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
        need = self.allocator.blocks_for(seq.max_length)
        if need > self.allocator.num_blocks:
            raise ValueError(
                f"request {seq.seq_id} needs up to {need} blocks of {self.allocator.block_size} tokens "
                f"(prompt {seq.prompt_len} + max_new_tokens {seq.sampling.max_new_tokens}); the cache has "
                f"{self.allocator.num_blocks}: give the engine more blocks or a larger memory_fraction")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.stats.preempted_phases[seq.phase] += 1
        self.allocator.free(seq)
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1

    def schedule(self) -> ScheduledStep | None:
        """The next step, or None when nothing can run."""
        scheduled: list[tuple[Sequence, int]] = []
        queue, preempted = deque(self.running), 0
        while queue:
            seq = queue.popleft()
            end = seq.next_chunk_end()
            while not self.allocator.can_append(seq, end) and queue:
                self.preempt(queue.pop())
                preempted += 1
            if not self.allocator.can_append(seq, end):
                self.preempt(seq)
                preempted += 1
                continue
            self.allocator.append(seq, end)
            scheduled.append((seq, end))
        num_tokens = sum(end - seq.num_computed for seq, end in scheduled)
        num_cached = 0
        # a step that had to preempt admits nobody: the freed blocks go to the running requests
        while self.waiting and not preempted and len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            end = seq.next_chunk_end()
            if not self.allocator.can_allocate(seq, end):
                break
            cached = len(self.allocator.cached_blocks(seq)) * self.allocator.block_size
            if scheduled and num_tokens + end - cached > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            self.allocator.allocate(seq, end)
            seq.status = Status.RUNNING
            num_tokens += end - seq.num_computed
            num_cached += seq.num_cached_tokens
            scheduled.append((seq, end))
        self.running = [seq for seq, _ in scheduled]
        if not scheduled:
            return None
        self.stats.steps.append(StepRecord(Counter(seq.phase for seq, _ in scheduled), num_tokens, preempted,
                                           num_cached))
        step = ScheduledStep(scheduled, self.latent_steps(scheduled))
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.allocator.num_used_blocks)
        return step

    def latent_steps(self, chunks: list[tuple[Sequence, int]]) -> int:
        """How many latent steps all of `chunks` can run back to back in a thought loop (their blocks reserved
        now): each request one latent step in and the pool holding every step, else 1."""
        if not 0 < len(chunks) <= self.loop_rows:
            return 1
        steps = min(seq.latent_run() if end == seq.num_computed + 1 else 0 for seq, end in chunks)
        if steps < 2:
            return 1
        need = sum(max(0, self.allocator.blocks_for(seq.num_computed + steps) - len(seq.block_table))
                   for seq, _ in chunks)
        if need > self.allocator.num_free_blocks:
            return 1
        for seq, _ in chunks:
            self.allocator.append(seq, seq.num_computed + steps)
        return steps

    def postprocess(self, step: ScheduledStep, output: StepOutput) -> list[Sequence]:
        """Apply a finished step: the blocks it wrote become shareable, thoughts and tokens join their requests;
        returns the requests it finished."""
        self.allocator.commit_pending()
        finished = []
        for i, ((seq, end), thoughts, token) in enumerate(zip(step.chunks, output.thoughts, output.tokens)):
            seq.num_computed = end + step.latent_steps - 1
            if thoughts is not None and seq.needs_decision(end):  # learned switch: <eot> or one more latent
                seq.decide(thoughts[0], output.switch[i])
                continue
            if thoughts is not None:
                for thought in thoughts.unbind(0):
                    seq.add_thought(thought)
                continue
            if token is None:  # no new token allowed (max_new_tokens=0)
                seq.finish_reason = "length"
            else:
                seq.add_token(token)
            if seq.finish_reason is not None:
                self.finish(seq)
                finished.append(seq)
        return finished

    def step_failed(self) -> None:
        """The step raised: the prompt blocks it was to write hold nothing a key may promise."""
        self.allocator.discard_pending()

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.allocator.free(seq)
        self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished request and free its blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
