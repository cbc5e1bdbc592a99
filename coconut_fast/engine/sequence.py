"""One request's state: its tokens, its continuous thoughts, its place in the KV cache.

A request moves through three phases, the engine's one vocabulary from scheduler to kernels:
prefill (its prompt up to the first latent slot, or everything known so far after preemption),
latent (the next input is a continuous thought) and decode (the next input is a token).
"""
from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

import torch

from ..sampling import logits_warpers


class Phase(enum.Enum):
    PREFILL = "prefill"  # nothing computed since admission (a new or a preempted request)
    LATENT = "latent"  # the next input is a continuous thought
    DECODE = "decode"  # the next input is a generated or trailing prompt token
    FINISHED = "finished"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """How a request's answer is decoded; the defaults are greedy, like `CoconutModel.generate`.

    `eos_token_ids=None` means the tokenizer's EOS; `seed` makes sampling reproducible per request.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        eos = self.eos_token_ids
        if eos is not None:
            if not isinstance(eos, (tuple, list)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                            for t in eos):
                raise ValueError(f"eos_token_ids must be None (the tokenizer's EOS) or a tuple of token ids, for one "
                                 f"id (60,); got {eos!r}")
            object.__setattr__(self, "eos_token_ids", tuple(eos))  # hashable, like the other fields
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if self.do_sample:
            logits_warpers(self.temperature, self.top_k, self.top_p)  # validates the three values


class Sequence:
    """A request: prompt (with `<|latent|>` slots) + generated tokens, and the thoughts computed so far.

    A latent slot's input is the thought computed at the position before it, so a step can run
    the positions from `num_computed` up to the first slot whose thought is still unknown
    (`next_chunk_end`). Thoughts and generated tokens survive preemption: a preempted request
    is recomputed from them, never resampled.
    """

    def __init__(self, seq_id: int, prompt: list[int], latent_id: int, sampling: SamplingParams, eos: tuple[int, ...],
                 auto: tuple[int, float] | None = None, end_id: int | None = None):
        if not prompt:
            raise ValueError(f"request {seq_id}: the prompt is empty")
        self.seq_id = seq_id
        self.token_ids = list(prompt)
        self.prompt_len = len(prompt)
        self.latent_positions = [p for p, t in enumerate(prompt) if t == latent_id]
        if self.latent_positions and self.latent_positions[0] == 0:
            raise ValueError(f"request {seq_id}: a latent slot at position 0 has no preceding hidden state")
        self.thoughts: list[torch.Tensor] = []
        self.sampling = sampling
        self.eos = eos
        self.generator: torch.Generator | None = None
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_computed = 0  # positions whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, positions found in shared prefix blocks at admission
        self.block_table: list[int] = []
        self.num_preemptions = 0
        # learned thought count: the prompt ends at <bot>; after each thought the switch head picks the next input
        self.auto, self.end_id, self.latent_id = auto, end_id, latent_id
        self.deciding = auto is not None
        self.block_budget = auto[0] + 1 if auto is not None else 0  # latents and <eot> still to come, at most

    # ------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_thoughts(self) -> int:
        return len(self.latent_positions)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def max_length(self) -> int:
        """Longest the request can grow: prompt + every allowed new token."""
        return self.prompt_len + self.block_budget + self.sampling.max_new_tokens

    @property
    def shareable_len(self) -> int:
        """Leading prompt positions whose K/V depend on tokens only, minus the last one, whose
        hidden state the first step must still produce."""
        first_latent = self.latent_positions[0] if self.latent_positions else self.prompt_len
        return first_latent - 1

    # ------------------------------------------------------------ progress
    @property
    def phase(self) -> Phase:
        if self.status is Status.FINISHED:
            return Phase.FINISHED
        if self.num_computed == self.num_cached_tokens:  # nothing computed since admission
            return Phase.PREFILL
        if self.thought_slots(self.num_computed, self.num_computed + 1):
            return Phase.LATENT
        return Phase.DECODE

    def next_chunk_end(self) -> int:
        """End (exclusive) of the positions whose inputs are known from `num_computed` on."""
        j = len(self.thoughts)
        return self.latent_positions[j] if j < self.num_thoughts else len(self.token_ids)

    def thought_slots(self, start: int, end: int) -> list[tuple[int, int]]:
        """(position, thought index) of the latent slots in [start, end)."""
        lo = bisect.bisect_left(self.latent_positions, start)
        hi = bisect.bisect_left(self.latent_positions, end)
        return [(self.latent_positions[j], j) for j in range(lo, hi)]

    def latent_run(self) -> int:
        """Latent steps that can run back to back from `num_computed`: the input is the last thought, and each
        step's output is the input of the next latent slot."""
        j, c = len(self.thoughts), self.num_computed
        if j == 0 or self.latent_positions[j - 1] != c:
            return 0
        n = 0
        while j + n < self.num_thoughts and self.latent_positions[j + n] == c + n + 1:
            n += 1
        return n

    def wants_token(self, end: int) -> bool:
        """After computing up to `end`, is the next input a new token (else a new thought)?"""
        return end == len(self.token_ids) and not self.deciding

    def needs_decision(self, end: int) -> bool:
        """After computing up to `end`, does the switch head pick the next input (a latent or `<eot>`)?"""
        return self.deciding and end == len(self.token_ids)

    def decide(self, thought: torch.Tensor, switch: bool) -> None:
        """The head's choice after the hidden state `thought`: `<eot>` (switch, or max_thoughts reached) or one more
        latent slot, whose input is `thought`. Either joins the prompt."""
        if switch or len(self.thoughts) >= self.auto[0]:
            self.token_ids.append(self.end_id)
            self.deciding = False
        else:
            self.token_ids.append(self.latent_id)
            self.latent_positions.append(len(self.token_ids) - 1)
            self.thoughts.append(thought)
        self.prompt_len += 1
        self.block_budget -= 1

    def add_thought(self, thought: torch.Tensor) -> None:
        self.thoughts.append(thought)

    def add_token(self, token: int) -> None:
        self.token_ids.append(token)
        if token in self.eos:
            self.finish_reason = "eos"
        elif len(self.output_token_ids) >= self.sampling.max_new_tokens:
            self.finish_reason = "length"

    def reset_cache_state(self) -> None:
        """Forget the cached K/V (blocks freed): a later admission recomputes it."""
        self.num_computed = 0
        self.num_cached_tokens = 0
        self.block_table = []


@dataclass
class RequestOutput:
    """A finished request: its prompt ids, new tokens (EOS included when produced), thoughts [k, H]."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    thoughts: torch.Tensor
    finish_reason: str
    text: str | None = None
    num_preemptions: int = 0

    @property
    def num_thoughts(self) -> int:
        """The request's thought count (with learned switching, the count its head chose)."""
        return self.thoughts.shape[0]
