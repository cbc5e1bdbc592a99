"""Offline batch generation over the paged engine, in the spirit of vLLM's `LLM.generate`."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..prompts import check_num_thoughts_arg, prompt_token_ids
from .block_manager import BlockAllocator
from .kv_cache import num_cache_blocks
from .model_runner import ModelRunner
from .models import sliding_window
from .scheduler import Scheduler
from .sequence import RequestOutput, SamplingParams, Sequence
from .weights import WeightState, active_dropout

DEFAULT_BLOCK_SIZE = 16


class LLM:
    """A Coconut model behind a paged KV cache and a continuous-batching scheduler.

    `model` is a `CoconutModel` (the engine reads its `model`, `tokenizer` and `latent_ids`). The cache
    holds `num_blocks` blocks of `block_size` tokens, or as many as fit in `memory_fraction` of
    the free device memory (free RAM on CPU), at most what `max_num_seqs` full-length requests
    need. `kernels`: "auto" (Triton where it runs, else the torch references), "triton", "cuda" (the
    compiled extension), "torch". `cuda_graphs=True` runs single-position steps on CUDA graphs per
    batch-size bucket, and each run of back-to-back latent steps as one captured thought loop (see
    `cuda_graph.py`); without CUDA the same static-buffer steps run eagerly.
    """

    def __init__(self, model, num_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 memory_fraction: float | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, kernels: str = "auto", enable_prefix_caching: bool = True,
                 cuda_graphs: bool = False):
        if not all(hasattr(model, name) for name in ("model", "tokenizer", "latent_ids")):
            raise TypeError(f"model must be a CoconutModel (load a directory with CoconutModel.from_pretrained), "
                            f"got {type(model).__name__}")
        self.coconut = model
        self.options = dict(num_blocks=num_blocks, block_size=block_size, memory_fraction=memory_fraction,
                            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            kernels=kernels, enable_prefix_caching=enable_prefix_caching, cuda_graphs=cuda_graphs)
        causal_lm, config = model.model, model.model.config
        self.device, self.dtype = causal_lm.device, causal_lm.get_input_embeddings().weight.dtype
        self.max_positions = getattr(config, "max_position_embeddings", None)
        if self.max_positions is None:
            raise ValueError("the model config has no max_position_embeddings; the engine needs a context limit")
        self.window = sliding_window(config)
        if num_blocks is None:
            num_blocks = num_cache_blocks(causal_lm, block_size, memory_fraction, max_num_seqs, self.max_positions)
        self.sizes = dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens)
        self.build()
        self.next_request_id = 0
        self.requests: dict[int, Sequence] = {}  # unfinished requests queued with add_request, by id

    def build(self) -> None:
        """Allocator, scheduler and runner (cache pools, graphs) over the model's current weights."""
        o, causal_lm = self.sizes, self.coconut.model
        self.allocator = BlockAllocator(o["num_blocks"], o["block_size"], self.options["enable_prefix_caching"])
        self.runner = ModelRunner(causal_lm, o["num_blocks"], o["block_size"], self.max_positions,
                                  self.options["kernels"], self.options["cuda_graphs"])
        self.scheduler = Scheduler(self.allocator, o["max_num_seqs"], o["max_num_batched_tokens"],
                                   self.runner.loop_rows)
        self.weights = WeightState.of(causal_lm)

    # ------------------------------------------------------------ the model under the engine
    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block, so the next requests compute their prompts afresh."""
        self.allocator.reset_prefix_cache()

    def sync_with_model(self) -> None:
        """Before new requests: refuse a model with active dropout, and never serve K/V of other weights.

        New storage (a parameter replaced, `load_state_dict(assign=True)`) rebuilds the runner, whose kernels and
        graphs hold the old pointers. The same storage with other values (optimizer steps, `load_state_dict`,
        writes through `.data`, fused optimizers) drops the prompt blocks cached under the old values; the
        kernels and captured graphs read the new ones where they are. Values are compared through a fingerprint
        (`weights.py`) when the engine is idle; while requests are in flight only the version counters are read,
        and a change there is an error.
        """
        dropout = active_dropout(self.coconut.model)
        if dropout:
            raise ValueError(f"the paged engine is for inference, but the model is in training mode with dropout in "
                             f"{', '.join(dropout[:3])}{' ...' if len(dropout) > 3 else ''}: call .eval() on the model "
                             "first, or generate with backend='torch'")
        busy = self.has_unfinished()
        now = WeightState.of(self.coconut.model, with_values=not busy)
        if now.same_storage(self.weights) and now.same_values(self.weights):
            if now.fingerprint is not None:
                self.weights = now
            return
        if busy:
            raise RuntimeError("the model's weights changed while requests were in flight; finish or abort them "
                               "before changing the weights")
        if not now.same_storage(self.weights):
            self.build()
        else:
            self.reset_prefix_cache()
            self.weights = now

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def stats(self):
        """The scheduler's step log (phases per step, preemptions, peak blocks in use)."""
        return self.scheduler.stats

    # ------------------------------------------------------------ requests and steps
    def add_request(self, prompt, sampling: SamplingParams | None = None) -> int:
        """Queue a prompt (text, or token ids that carry their `<bot> … <eot>` block, if any); returns its request
        id. The prompt is checked as `generate` checks it."""
        self.sync_with_model()
        ids, vocab = self.coconut.latent_ids, self.runner.embed.weight.shape[0]
        tokens = prompt_token_ids(prompt, None, ids, self.coconut.tokenizer, vocab, self.next_request_id)
        seq = self.new_sequence(tokens, sampling)
        self.scheduler.add(seq)
        self.requests[seq.seq_id] = seq
        return seq.seq_id

    def abort(self, request_id: int) -> bool:
        """Drop a queued or running request and free its blocks; False when it is unknown or already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.finish_reason is not None:
            return False
        self.scheduler.abort(seq)
        return True

    def new_sequence(self, prompt: list[int], sampling: SamplingParams | None = None,
                     auto: tuple[int, float] | None = None) -> Sequence:
        """A request of checked token ids, not yet queued: bad lengths or pool sizes are ValueErrors here.

        `auto=(max_thoughts, switch_threshold)`: the prompt ends at `<bot>` and the model's switch head picks the
        thought count."""
        sampling = sampling or SamplingParams()
        if auto is not None:
            check_auto(self.coconut, *auto)
            if prompt[-1:] != [self.coconut.latent_ids.start]:
                raise ValueError("a request with a learned thought count must end at <bot>")
        total = len(prompt) + sampling.max_new_tokens + (auto[0] + 1 if auto is not None else 0)
        if total > self.max_positions:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens with max_new_tokens={sampling.max_new_tokens} exceeds the "
                f"model's context of {self.max_positions} positions")
        if self.window is not None and total > self.window:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens with max_new_tokens={sampling.max_new_tokens} exceeds the "
                f"model's sliding attention window of {self.window}; the paged engine does not support "
                "sliding-window attention: use generate(backend='torch')")
        eos = sampling.eos_token_ids
        if eos is None:
            eos_id = getattr(self.coconut.tokenizer, "eos_token_id", None)
            eos = () if eos_id is None else (eos_id,)
        ids = self.coconut.latent_ids
        seq = Sequence(self.next_request_id, prompt, ids.latent, sampling, tuple(eos), auto, ids.end)
        if sampling.do_sample:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))
            seq.generator = torch.Generator(self.device).manual_seed(seed)
        self.scheduler.check_fits(seq)
        self.next_request_id += 1
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the requests it finished."""
        step = self.scheduler.schedule()
        if step is None:
            if self.has_unfinished():
                raise RuntimeError("the scheduler could not schedule any waiting request")
            return []
        self.runner.switch_head = getattr(self.coconut, "switch_head", None)
        try:
            output = self.runner.run(step)
        except BaseException:  # an error or an interrupt: the step's prompt blocks were not (all) written
            self.scheduler.step_failed()
            raise
        finished = self.scheduler.postprocess(step, output)
        for seq in finished:
            self.requests.pop(seq.seq_id, None)
        return [self.output(seq) for seq in finished]

    def output(self, seq: Sequence) -> RequestOutput:
        hidden = self.runner.embed.weight.shape[1]
        empty = torch.zeros(0, hidden, dtype=self.dtype, device=self.device)
        thoughts = torch.stack(seq.thoughts) if seq.thoughts else empty
        tokenizer = self.coconut.tokenizer
        text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True) if tokenizer is not None else None
        return RequestOutput(seq.seq_id, seq.token_ids[: seq.prompt_len], seq.output_token_ids, thoughts,
                             seq.finish_reason, text, seq.num_preemptions)

    # ------------------------------------------------------------ offline batch
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 num_thoughts: int | list[int | None] | str | None = None, use_tqdm: bool = True,
                 max_thoughts: int | None = None, switch_threshold: float = 0.5) -> list[RequestOutput]:
        """Generate for a list of prompts (text or token ids); results come back in input order.

        `num_thoughts`: None (prompts carry their `<bot> … <eot>` blocks), an int, or one per prompt; or "auto":
        each prompt gets `<bot>` and thinks until the model's switch head (`coconut.switch_head`) gives
        p(switch) >= `switch_threshold`, or `max_thoughts` thoughts, then `<eot>` and the answer. A request that
        stops thinking moves on to `<eot>` in the next step while the others keep thinking. Requests with a
        learned count run single latent steps (no captured multi-step thought loop).
        """
        check_num_thoughts_arg(num_thoughts)
        auto = None
        if num_thoughts == "auto":
            check_auto(self.coconut, max_thoughts, switch_threshold)
            auto, num_thoughts = (max_thoughts, float(switch_threshold)), 0
        elif max_thoughts is not None:
            raise ValueError("max_thoughts applies to num_thoughts='auto' only")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        counts = num_thoughts if isinstance(num_thoughts, list) else [num_thoughts] * n
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        for name, values in (("num_thoughts", counts), ("sampling_params", params)):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
        ids, tokenizer, vocab = self.coconut.latent_ids, self.coconut.tokenizer, self.runner.embed.weight.shape[0]
        token_prompts = [prompt_token_ids(p, k, ids, tokenizer, vocab, i) for i, (p, k) in enumerate(zip(prompts, counts))]
        if auto is not None:
            token_prompts = [p[:-1] for p in token_prompts]  # up to <bot>: the head decides what follows
        return self.generate_checked(token_prompts, params, use_tqdm, auto)

    def generate_checked(self, prompts: list[list[int]], params: list[SamplingParams | None],
                         use_tqdm: bool = False, auto: tuple[int, float] | None = None) -> list[RequestOutput]:
        """`generate` for token-id prompts already checked and carrying their latent blocks (with `auto`: ending at
        `<bot>`), one sampling each."""
        if self.requests:
            raise RuntimeError(f"{len(self.requests)} request(s) queued with add_request are unfinished; generate() "
                               "would run them and drop their outputs: step() until they finish, or abort() them")
        self.sync_with_model()
        seqs = [self.new_sequence(p, s, auto) for p, s in zip(prompts, params)]  # all checked before any runs
        for seq in seqs:
            self.scheduler.add(seq)
        outputs = {}
        try:
            with tqdm(total=len(seqs), desc="Generating", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while self.has_unfinished():
                    for out in self.step():
                        outputs[out.request_id] = out
                        bar.update(1)
        except BaseException:  # an error or an interrupt: leave no request behind for the next call
            for seq in seqs:
                self.scheduler.abort(seq)
            raise
        return [outputs[seq.seq_id] for seq in seqs]


def check_auto(coconut, max_thoughts, switch_threshold) -> None:
    """Arguments of a learned thought count."""
    if getattr(coconut, "switch_head", None) is None:
        raise ValueError("num_thoughts='auto' needs the model's switch head (coconut.switch_head)")
    if isinstance(max_thoughts, bool) or not isinstance(max_thoughts, int) or max_thoughts < 0:
        raise ValueError(f"num_thoughts='auto' needs max_thoughts, an integer >= 0, got {max_thoughts!r}")
    if isinstance(switch_threshold, bool) or not isinstance(switch_threshold, (int, float)):
        raise ValueError(f"switch_threshold must be a number, got {switch_threshold!r}")
