"""Offline batch generation over the paged engine, in the spirit of vLLM's `LLM.generate`."""
from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from ..generation import check_latent_blocks, check_token_ids
from ..tokens import LatentIds
from .block_manager import BlockAllocator, PagedKVCache
from .model_runner import ModelRunner
from .models import sliding_window
from .scheduler import Scheduler
from .sequence import RequestOutput, SamplingParams, Sequence

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MEMORY_FRACTION = {"cuda": 0.9, "cpu": 0.2}


def build_prompt(prompt, num_thoughts: int | None, ids: LatentIds, tokenizer, index: int) -> list[int]:
    """Token ids of a prompt (text or ids) with its `<bot><latent>*k<eot>` block.

    With `num_thoughts=None` the prompt carries its blocks (the official format); otherwise the
    block with `num_thoughts` latents is appended.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompt {index} is text but the engine has no tokenizer; pass token ids")
        tokens = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens = list(prompt)
    else:
        raise TypeError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
    if not tokens:
        raise ValueError(f"prompt {index} is empty")
    if num_thoughts is None:
        check_latent_blocks(tokens, ids, index)
        return tokens
    if isinstance(num_thoughts, bool) or not isinstance(num_thoughts, int) or num_thoughts < 0:
        raise ValueError(f"num_thoughts for prompt {index} must be an integer >= 0, got {num_thoughts!r}")
    if ids.start in tokens or ids.end in tokens:
        raise ValueError(f"prompt {index} already carries a <bot> … <eot> block; pass num_thoughts=None for it")
    return tokens + [ids.start] + [ids.latent] * num_thoughts + [ids.end]


class LLM:
    """A Coconut model behind a paged KV cache and a continuous-batching scheduler.

    `model` is a `CoconutModel` or a directory for `CoconutModel.from_pretrained`. The cache
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
        if isinstance(model, (str, os.PathLike)):
            from ..model import CoconutModel

            model = CoconutModel.from_pretrained(model)
        self.coconut = model
        self.options = dict(num_blocks=num_blocks, block_size=block_size, memory_fraction=memory_fraction,
                            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            kernels=kernels, enable_prefix_caching=enable_prefix_caching, cuda_graphs=cuda_graphs)
        causal_lm, config = model.model, model.config
        self.device, self.dtype = causal_lm.device, causal_lm.get_input_embeddings().weight.dtype
        self.max_positions = getattr(config, "max_position_embeddings", None)
        if self.max_positions is None:
            raise ValueError("the model config has no max_position_embeddings; the engine needs a context limit")
        self.window = sliding_window(config)
        if num_blocks is None:
            fraction = memory_fraction or DEFAULT_MEMORY_FRACTION.get(self.device.type, 0.2)
            per_block = ModelRunner.cache_block_bytes(causal_lm, block_size)
            fits = PagedKVCache.blocks_from_memory(fraction, per_block, self.device)
            num_blocks = min(fits, max_num_seqs * -(-self.max_positions // block_size))
            if num_blocks < 1:
                raise ValueError(f"memory_fraction {fraction} of the free {self.device.type} memory holds no cache block "
                                 f"of {per_block} bytes; raise memory_fraction or pass num_blocks")
        self.sizes = dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens)
        self.build()
        self.next_request_id = 0

    def build(self) -> None:
        """Allocator, scheduler and runner (cache pools, graphs) over the model's current weights."""
        o, causal_lm = self.sizes, self.coconut.model
        self.blocks = BlockAllocator(o["num_blocks"], o["block_size"], self.options["enable_prefix_caching"])
        self.scheduler = Scheduler(self.blocks, o["max_num_seqs"], o["max_num_batched_tokens"])
        self.runner = ModelRunner(causal_lm, o["num_blocks"], o["block_size"], self.max_positions,
                                  self.options["kernels"], self.options["cuda_graphs"])
        self.weights = weight_fingerprint(causal_lm)

    # ------------------------------------------------------------ the model under the engine
    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block, so the next requests compute their prompts afresh."""
        self.blocks.reset_prefix_cache()

    def sync_with_model(self) -> None:
        """Before new requests: refuse a model with active dropout, and never serve K/V of other weights.

        In-place weight updates (optimizer steps, `load_state_dict`, `p.add_` under no_grad) bump the
        parameters' version counters but keep their storage, so the kernels and captured CUDA graphs read the
        new values: only the prompt blocks cached under the old weights are dropped. New storage (a parameter
        replaced, `load_state_dict(assign=True)`) rebuilds the runner, whose graphs hold the old pointers.
        Writes that bump no version counter (through `.data`, fused optimizers) are not seen: call
        `reset_prefix_cache()` after them.
        """
        dropout = active_dropout(self.coconut.model)
        if dropout:
            raise ValueError(f"the paged engine is for inference, but the model is in training mode with dropout in "
                             f"{', '.join(dropout[:3])}{' ...' if len(dropout) > 3 else ''}: call .eval() on the model "
                             "first, or generate with backend='torch'")
        now = weight_fingerprint(self.coconut.model)
        if now == self.weights:
            return
        if self.has_unfinished():
            raise RuntimeError("the model's weights changed while requests were in flight; finish or abort them "
                               "before changing the weights")
        if [ptr for ptr, _ in now] != [ptr for ptr, _ in self.weights]:
            self.build()
        else:
            self.reset_prefix_cache()
            self.weights = now

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def stats(self):
        """The scheduler's step log (phases per step, preemptions, peak blocks in use)."""
        return self.scheduler.stats

    # ------------------------------------------------------------ requests and steps
    def add_request(self, prompt: list[int], sampling: SamplingParams | None = None) -> int:
        """Queue a prompt (token ids with its latent block); returns its request id."""
        self.sync_with_model()
        seq = self.new_sequence(prompt, sampling)
        self.scheduler.add(seq)
        return seq.seq_id

    def new_sequence(self, prompt: list[int], sampling: SamplingParams | None = None) -> Sequence:
        """A checked request, not yet queued: bad token ids, lengths or pool sizes are ValueErrors here."""
        sampling = sampling or SamplingParams()
        check_token_ids(prompt, self.runner.embed.weight.shape[0], self.next_request_id)
        total = len(prompt) + sampling.max_new_tokens
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
        seq = Sequence(self.next_request_id, prompt, self.coconut.latent_ids.latent, sampling, tuple(eos))
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
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.has_unfinished():
                raise RuntimeError("the scheduler could not schedule any waiting request")
            return []
        steps = self.thought_loop_steps(chunks)
        try:
            if steps > 1:
                self.run_thought_loop([seq for seq, _ in chunks], steps)
                results = None
            else:
                results = self.runner.run(chunks)
        except BaseException:  # the step's new prompt blocks were not (all) written: their keys go
            self.blocks.discard_pending()
            raise
        self.blocks.commit_pending()
        if results is None:
            return []
        finished = []
        for (seq, end), result in zip(chunks, results):
            seq.num_computed = end
            if isinstance(result, torch.Tensor):
                seq.add_thought(result)
                continue
            if result is None:  # no new token allowed (max_new_tokens=0)
                seq.finish_reason = "length"
            else:
                seq.add_token(result)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                finished.append(self.output(seq))
        return finished

    def thought_loop_steps(self, chunks: list[tuple[Sequence, int]]) -> int:
        """With graphs on and every scheduled request one latent step in: how many latent steps all of them can
        run back to back (blocks for them reserved now), else 1."""
        graphs = self.runner.graphs
        if graphs is None or not graphs.fits(len(chunks), 0):
            return 1
        steps = min(seq.latent_run() if end == seq.num_computed + 1 else 0 for seq, end in chunks)
        if steps < 2:
            return 1
        need = sum(max(0, self.blocks.blocks_for(seq.num_computed + steps) - len(seq.block_table)) for seq, _ in chunks)
        if need > self.blocks.num_free_blocks:
            return 1
        for seq, _ in chunks:
            self.blocks.append(seq, seq.num_computed + steps)
        return steps

    def run_thought_loop(self, seqs: list[Sequence], steps: int) -> None:
        thoughts = self.runner.run_thought_loop(seqs, steps).transpose(0, 1).clone()  # [n, steps, H]
        for seq, own in zip(seqs, thoughts):
            for thought in own.unbind(0):
                seq.add_thought(thought)
            seq.num_computed += steps

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
                 num_thoughts: int | list[int | None] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for a list of prompts (text or token ids); results come back in input order.

        `num_thoughts`: None (prompts carry their `<bot> … <eot>` blocks), an int, or one per prompt.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        counts = num_thoughts if isinstance(num_thoughts, list) else [num_thoughts] * n
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        for name, values in (("num_thoughts", counts), ("sampling_params", params)):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
        self.sync_with_model()
        ids, tokenizer = self.coconut.latent_ids, self.coconut.tokenizer
        token_prompts = [build_prompt(p, k, ids, tokenizer, i) for i, (p, k) in enumerate(zip(prompts, counts))]
        seqs = [self.new_sequence(p, s) for p, s in zip(token_prompts, params)]  # all checked before any runs
        for seq in seqs:
            self.scheduler.add(seq)
        outputs = {}
        try:
            with tqdm(total=n, desc="Generating", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while self.has_unfinished():
                    for out in self.step():
                        outputs[out.request_id] = out
                        bar.update(1)
        except BaseException:  # an error or an interrupt: leave no request behind for the next call
            for seq in seqs:
                self.scheduler.abort(seq)
            raise
        return [outputs[seq.seq_id] for seq in seqs]


def weight_fingerprint(model) -> list[tuple[int, int]]:
    """(storage pointer, in-place version) of every parameter: changes when the weights are updated or replaced."""
    return [(p.data_ptr(), p._version) for p in model.parameters()]


def active_dropout(model) -> list[str]:
    """Names of the modules that would drop activations now (training mode and a probability > 0)."""
    names = []
    for name, module in model.named_modules():
        p = module.p if isinstance(module, torch.nn.Dropout) else getattr(module, "attention_dropout", 0.0)
        if module.training and isinstance(p, (int, float)) and p > 0:
            names.append(name or type(module).__name__)
    return names


def engine_for(coconut, min_blocks: int = 1, **options) -> LLM:
    """The engine `CoconutModel.generate(backend="paged")` uses for `coconut`, built on first use.

    Options given here (see `LLM`) replace the engine and are kept for later rebuilds. Without
    `num_blocks` or `memory_fraction` the cache is sized to the batch at hand (`min_blocks`) and
    grows with later, larger batches. The engine is also rebuilt when the model moved to another
    device or dtype.
    """
    engine, user = coconut.__dict__.get("_paged_engine", (None, {}))
    user = dict(options) if options else user
    sized_by_user = user.get("num_blocks") is not None or user.get("memory_fraction") is not None
    dtype = coconut.model.get_input_embeddings().weight.dtype
    if (engine is None or options or engine.device != coconut.device or engine.dtype != dtype
            or (not sized_by_user and engine.num_blocks < min_blocks)):
        built = dict(user)
        if not sized_by_user:
            built["num_blocks"] = max(min_blocks, engine.num_blocks if engine is not None and not options else 0)
        engine = LLM(coconut, **built)
        coconut.__dict__["_paged_engine"] = (engine, user)  # not a submodule: kept out of state_dict
    return engine


def paged_generate(coconut, prompts: list[list[int]], max_new_tokens: int, eos: list[int], do_sample: bool,
                   temperature: float, top_k: int, top_p: float) -> tuple[list[list[int]], list[torch.Tensor]]:
    """New tokens (EOS included when produced) and thoughts [k, H] of each prompt, via the engine."""
    _, user = coconut.__dict__.get("_paged_engine", (None, {}))
    block_size = user.get("block_size", DEFAULT_BLOCK_SIZE)
    need = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    engine = engine_for(coconut, min_blocks=need)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_token_ids=tuple(eos))
    outputs = engine.generate(prompts, sampling, use_tqdm=False)
    return [o.token_ids for o in outputs], [o.thoughts for o in outputs]
