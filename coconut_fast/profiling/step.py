"""The cost of one engine step of each kind, measurable on any machine: launches, bytes, host time.

`profile_step(family, shape, batch)` builds a random-weight model of that shape, puts `batch` requests in
lockstep into a thought block, and profiles a latent step (every row one thought) and a decode step (every
row one token): launches and kernel bytes by the rule of `launches.py` on one step of each kind, the byte
floor of the step, and the host time outside the model's compute (median over every step of the kind).
On CPU the timed steps run with the model's compute stubbed out (`compute_stubbed`): the host work
(scheduling, metadata, sampling, post-processing) is the same. The counted steps run the real kernels, or,
with `execute_kernels=False`, count the Triton launches without running them: the counts and byte models
read only launch arguments, and the big shapes would take hours under the interpreter.
"""
from __future__ import annotations

import platform
import statistics
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..engine import LLM, Phase, SamplingParams
from ..model import CoconutModel
from .launches import LaunchCounter, counting_triton_launches

SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, context=512),
    "gpt2-124m": dict(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=3072, vocab=50257, context=1024),
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, context=2048),
}
PROFILE_FAMILIES = ("gpt2", "llama")
KERNELS = ("triton", "cuda", "torch")
STEPS = 24  # thoughts and new tokens per request: 21 steps of each kind are timed, 2 counted


def build_model(family: str, shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> CoconutModel:
    """A random-weight model of `shape` with a small local word tokenizer (the latent tokens join it)."""
    if family not in PROFILE_FAMILIES:
        raise ValueError(f"family must be one of {PROFILE_FAMILIES}, got {family!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {tuple(SHAPES)}, got {shape!r}")
    s = SHAPES[shape]
    if family == "gpt2":
        config = GPT2Config(vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                            n_inner=s["intermediate"], n_positions=s["context"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
        cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                             num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                             intermediate_size=s["intermediate"], max_position_embeddings=s["context"],
                             tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        cls = LlamaForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config).to(device=device, dtype=dtype).eval()
    words = {f"w{i}": i for i in range(8)} | {"<eos>": 8, "<<": 9, "<unk>": 10, "<pad>": 11}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    return CoconutModel.from_pretrained(model, tokenizer=tokenizer)


class StepClock:
    """Wall time of each step, and of the model's compute inside it: the forward, the LM head and the token
    choice (argmax or the warped draw: device kernels, on CPU as long as a small GEMM at a large vocabulary)."""

    def __init__(self, runner, device: torch.device):
        self.device, self.compute = device, 0.0
        self.events: list = []
        runner.forward = self.timed(runner.forward, events=True)
        runner.lm_head = self.timed(runner.lm_head)
        runner.sample = self.timed(runner.sample)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn, events: bool = False):
        def run(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            if events and self.device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            out = fn(*args, **kwargs)
            if events and self.device.type == "cuda":
                end.record()
                self.events.append((begin, end))
            self.sync()
            self.compute += time.perf_counter() - start
            return out

        return run


def floor_bytes(causal_lm, llm, phase: Phase) -> int:
    """What the step must move at least: the block weights (and the LM head to decode) read once, the live
    K/V read once, the new K/V written, the inputs read and the outputs (thoughts or token ids) written."""
    decoder = [m for name, m in causal_lm.named_children() if name in ("transformer", "model")][0]
    blocks = decoder.h if hasattr(decoder, "h") else decoder.layers
    final_norm = decoder.ln_f if hasattr(decoder, "ln_f") else decoder.norm
    weights = sum(p.numel() * p.element_size() for m in (blocks, final_norm) for p in m.parameters())
    if phase is Phase.DECODE:
        head = causal_lm.get_output_embeddings().weight
        weights += head.numel() * head.element_size()
    cache = llm.runner.cache
    kv_row = 2 * len(cache.k) * cache.k[0].shape[2] * cache.k[0].shape[3] * cache.k[0].element_size()
    seqs = llm.scheduler.running
    hidden = causal_lm.get_input_embeddings().weight
    rows = len(seqs) * hidden.shape[1] * hidden.element_size()
    out = rows if phase is Phase.LATENT else 8 * len(seqs)
    return weights + kv_row * sum(seq.num_computed + 1 for seq in seqs) + rows + out


def stub_compute(runner) -> None:
    """Replace the model's compute by outputs of the right shape (the host work of a step stays as it is)."""
    vocab = runner.lm_head.weight.shape[0]
    runner.forward = lambda embeds, meta, cache: torch.zeros_like(embeds)
    runner.lm_head = lambda hidden: hidden.new_zeros(hidden.shape[0], vocab)


def count_step(llm, phase: Phase, forward, lm_head, execute: bool = True) -> dict:
    """Launches and kernel bytes of a step, run under the counter with the real `forward` and `lm_head`, after one
    real step of the same kind (so buffers the kernels allocate once, such as split-K counters, exist already).
    `execute=False` counts the Triton launches of both steps without running them (see counting_triton_launches)."""
    runner, ops = llm.runner, llm.runner.kernels
    saved, timed = dict(vars(ops)), (runner.forward, runner.lm_head)
    runner.forward, runner.lm_head = forward, lm_head
    try:
        with counting_triton_launches(LaunchCounter(), execute):
            llm.step()  # the warm-up step
        counter = LaunchCounter()
        counter.wrap_kernels(ops)
        floor = floor_bytes(llm.coconut.model, llm, phase)
        with counting_triton_launches(counter, execute), counter:
            llm.step()
    finally:
        vars(ops).update(saved)
        runner.forward, runner.lm_head = timed
    count = counter.count
    layers = llm.coconut.model.config.num_hidden_layers
    return {"launches": count.launches, "launches_per_layer": count.launches / layers, "kernel_bytes": count.bytes,
            "floor_bytes": floor, "bytes_over_floor": count.bytes / floor, "uploads": count.uploads,
            "host_syncs": count.host_syncs, "by_kind": count.as_dict()}


def profile_step(family: str, shape: str, batch: int, kernels: str = "triton", context: int = 64,
                 dtype: torch.dtype | None = None, device: str | None = None, seed: int = 0,
                 stub: bool | None = None, execute_kernels: bool = True) -> dict:
    """The step profile of `family` at `shape` with `batch` requests of `context` prompt tokens; `stub`
    (default: on CPU) times the steps with the model's compute stubbed out; `execute_kernels=False` counts
    the Triton launches of the counted steps without running them (the big shapes under the interpreter)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if context < 2 or context + 2 * STEPS + 2 > SHAPES[shape]["context"]:
        raise ValueError(f"context must be in [2, {SHAPES[shape]['context'] - 2 * STEPS - 2}] for shape {shape!r}")
    cm = build_model(family, shape, dtype, device, seed)
    per_request = -(-(context + 2 * STEPS + 2) // 16)
    llm = LLM(cm, num_blocks=batch * per_request, block_size=16, kernels=kernels, max_num_seqs=batch,
              max_num_batched_tokens=batch * (context + 2), enable_prefix_caching=False)
    ids, gen = cm.latent_ids, torch.Generator().manual_seed(seed)
    sampling = SamplingParams(max_new_tokens=STEPS, eos_token_ids=())
    for _ in range(batch):
        question = torch.randint(0, 8, (context,), generator=gen).tolist()
        llm.add_request(question + [ids.start] + [ids.latent] * STEPS + [ids.end], sampling)
    stub = device == "cpu" if stub is None else stub
    forward, lm_head = llm.runner.forward, llm.runner.lm_head
    if stub:
        stub_compute(llm.runner)
    llm.step()  # prefill: every request now one latent step in
    clock = StepClock(llm.runner, torch.device(device))
    host: dict[Phase, list[float]] = {Phase.LATENT: [], Phase.DECODE: []}
    compute: dict[Phase, list[float]] = {Phase.LATENT: [], Phase.DECODE: []}
    counted: dict[Phase, dict] = {}
    while llm.has_unfinished():
        running = llm.scheduler.running
        phases = {seq.phase for seq in running}
        single = all(seq.next_chunk_end() == seq.num_computed + 1 for seq in running)
        phase = phases.pop() if len(phases) == 1 and single and len(running) == batch else None
        if phase in host and phase not in counted and len(host[phase]) == STEPS // 2:
            counted[phase] = count_step(llm, phase, forward, lm_head, execute_kernels)  # two of each kind, midway
            continue
        clock.compute, start = 0.0, time.perf_counter()
        llm.step()
        clock.sync()
        if phase in host:
            host[phase].append(time.perf_counter() - start - clock.compute)
            compute[phase].append(clock.compute)
    result = {"family": family, "shape": shape, "batch": batch, "layers": cm.config.num_hidden_layers,
              "kernels": llm.runner.kernels.name, "context": context, "dtype": str(dtype).replace("torch.", ""),
              "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
              "threads": torch.get_num_threads(), "compute_stubbed": stub,
              "kernels_executed": execute_kernels or llm.runner.kernels.name != "triton"}
    for phase, key in ((Phase.LATENT, "latent"), (Phase.DECODE, "decode")):
        result[key] = {**counted[phase], "host_us": 1e6 * statistics.median(host[phase]),
                       "compute_us": 1e6 * statistics.median(compute[phase]), "timed_steps": len(host[phase])}
    if clock.events:
        times = [begin.elapsed_time(end) * 1e3 for begin, end in clock.events]
        result["forward_device_us_median"] = statistics.median(times)
    return result
