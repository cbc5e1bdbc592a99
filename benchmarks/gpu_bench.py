"""What the GPU benchmarks (test_bench_gpu.py, test_bench_kernels.py, gpu_check.py) measure, kept apart so
tests/test_gpu_bench_helpers.py can run every piece small on CPU.

- Model shapes: GPT-2 124M and a 1B Llama (random weights, bf16).
- Variants: the reference (batch 1, full recompute per token), the torch backend (HF cache, batched), and the
  paged engine with Triton kernels, with the CUDA kernels, and with CUDA graphs. The engine runs without prefix
  caching, so a repeated run computes its prompts again, and with at most as many requests as the largest graph
  bucket, so every single-position step can replay a graph.
- Phases by differences of three runs: prefill = (0 thoughts, 1 token); thought loop = (k thoughts, 1 token)
  minus prefill; answer = (k thoughts, n tokens) minus (k thoughts, 1 token). No EOS, so every run is full length.
- Device time of a kernel: CUDA events around a CUDA graph of >= 100 launches (no host work inside), or around
  the launches themselves for code that cannot be captured.
- The byte floor of a latent step: the transformer blocks' weights plus the live K/V bytes, over the copy
  bandwidth measured in the same run. A replayed thought loop starts from its inputs as loaded for the loop.
- Greedy answers of two paths are compared where the baseline's top-2 logit gap is at least 1e-4 at every answer
  position; random weights leave near-ties that any rounding flips, and those rows are counted, not compared.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from coconut_fast import CoconutModel
from coconut_fast.data import CurriculumConfig, build_eval_example, default_tokenizer, generate_prosqa, load_records
from coconut_fast.data import tokenize_record
from coconut_fast.engine import LLM, SamplingParams
from coconut_fast.engine.cuda_graph import BATCH_BUCKETS
from coconut_fast.prompts import left_pad
from coconut_fast.reference import reference_generate

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # flash-attn is optional
    flash_attn_with_kvcache = None
try:
    import flashinfer
except ImportError:  # FlashInfer is optional
    flashinfer = None

SHAPES = {
    "gpt2-124m": dict(family="gpt2", vocab=50257, hidden=768, layers=12, heads=12, kv_heads=12, ffn=3072,
                      context=1024),
    "llama-1b": dict(family="llama", vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192,
                     context=2048),
}
VARIANTS = ("reference", "torch", "paged-triton", "paged-cuda", "paged-graphs")
RESULTS_DIR = Path(__file__).parent / "results"


def build_model(shape: dict, dtype: torch.dtype, device: str, seed: int = 0) -> CoconutModel:
    """A random-weight model of `shape` with the local tokenizer (its ids are a subset of the vocabulary)."""
    if shape["family"] == "gpt2":
        config = GPT2Config(vocab_size=shape["vocab"], n_embd=shape["hidden"], n_layer=shape["layers"],
                            n_head=shape["heads"], n_inner=shape["ffn"], n_positions=shape["context"],
                            bos_token_id=None, eos_token_id=None)
        cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                             num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                             intermediate_size=shape["ffn"], max_position_embeddings=shape["context"],
                             bos_token_id=None, eos_token_id=None, pad_token_id=None)
        cls = LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(device=device, dtype=dtype).eval()
    return CoconutModel.from_pretrained(model, tokenizer=default_tokenizer())


def random_prompts(cm: CoconutModel, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """Question-like prompts of ordinary token ids (no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ordinary = min(cm.latent_ids.start, cm.latent_ids.latent, cm.latent_ids.end)
    return torch.randint(0, ordinary, (batch, length), generator=gen).tolist()


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 1) -> float:
    """Median wall seconds of `fn()` with the device drained before and after."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass
class Variant:
    """One way to generate: `run(prompts, num_thoughts, max_new_tokens)` -> new tokens per prompt."""

    name: str
    cm: CoconutModel
    engine: LLM | None = None

    @classmethod
    def build(cls, name: str, cm: CoconutModel, batch: int, prompt_len: int) -> "Variant":
        if not name.startswith("paged"):
            return cls(name, cm)
        kernels = {"paged-triton": "triton", "paged-cuda": "cuda", "paged-graphs": None}[name]
        if kernels is None:  # graphs on the best kernels this machine has
            from coconut_fast.kernels import cuda_kernels_available

            kernels = "cuda" if cuda_kernels_available() else "triton"
        if cm.device.type != "cuda":
            kernels = "torch"  # the CPU check of these helpers
        # a wave of requests prefills in one step, so its requests think in lockstep; no prefix caching, so a
        # repeated run computes its prompts again; waves no larger than the largest graph bucket
        engine = LLM(cm, kernels=kernels, cuda_graphs=name == "paged-graphs", enable_prefix_caching=False,
                     max_num_seqs=engine_batch(batch), max_num_batched_tokens=max(8192, batch * (prompt_len + 16)),
                     memory_fraction=0.5 if cm.device.type == "cuda" else 0.2)
        return cls(name, cm, engine)

    def graph_counts(self) -> tuple[int, int]:
        """(graphs captured, graph replays) of the engine so far; (0, 0) without graphs."""
        graphs = self.engine.runner.graphs if self.engine is not None else None
        return (0, 0) if graphs is None else (len(graphs.graphs), sum(graphs.replays.values()))

    def run(self, prompts: list[list[int]], num_thoughts: int, max_new_tokens: int) -> list[list[int]]:
        ids = self.cm.latent_ids
        with torch.no_grad():
            if self.name == "reference":
                full = [p + [ids.start] + [ids.latent] * num_thoughts + [ids.end] for p in prompts]
                return [reference_generate(self.cm.model, p, ids.latent, None, max_new_tokens)[0] for p in full]
            if self.engine is not None:
                outs = self.engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=()),
                                            num_thoughts=num_thoughts, use_tqdm=False)
                return [o.token_ids for o in outs]
            input_ids, mask = left_pad(prompts, self.cm.tokenizer.pad_token_id, self.cm.device)
            seqs = self.cm.generate(input_ids, mask, num_thoughts=num_thoughts, max_new_tokens=max_new_tokens,
                                    eos_token_id=[], backend="torch")
            width = input_ids.shape[1] + num_thoughts + 2
            return seqs[:, width:].tolist()


def engine_batch(batch: int) -> int:
    """The engine's max_num_seqs for `batch` prompts: all of them, up to the largest graph bucket."""
    return min(max(batch, 1), BATCH_BUCKETS[-1])


def phase_times(variant: Variant, prompts, num_thoughts: int, new_tokens: int, device, repeats: int = 3) -> dict:
    """Seconds per phase (by differences of three runs), samples/s and ms per latent step."""
    prefill = timed(lambda: variant.run(prompts, 0, 1), device, repeats)
    thinking = timed(lambda: variant.run(prompts, num_thoughts, 1), device, repeats)
    total = timed(lambda: variant.run(prompts, num_thoughts, new_tokens), device, repeats)
    loop = max(thinking - prefill, 0.0)
    return dict(prefill_s=prefill, thought_loop_s=loop, answer_s=max(total - thinking, 0.0), total_s=total,
                samples_per_s=len(prompts) / total, latent_step_ms=1e3 * loop / max(num_thoughts, 1))


def device_seconds(fn, device, launches: int = 100, repeats: int = 5, capture: bool = True) -> tuple[float, str]:
    """(median seconds per call of `fn`, method). On CUDA: events around one CUDA graph holding `launches` calls
    (device time, no host work between them); with capture=False, or when the capture fails (code that syncs with
    the host), around the `launches` calls themselves. On CPU: wall time of the `launches` calls."""
    fn()  # warm-up: compiles kernels, allocates
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(launches):
                fn()
            times.append((time.perf_counter() - start) / launches)
        return statistics.median(times), "wall"
    torch.cuda.synchronize(device)
    run, method = lambda: [fn() for _ in range(launches)], "cuda-events"
    if capture:
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph):
                run()
            run, method = graph.replay, "cuda-graph"
        except Exception as error:  # host work inside fn: time the launches themselves
            method = f"cuda-events (capture failed: {type(error).__name__})"
        finally:
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return statistics.median(times), method


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), by device_seconds."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, _ = device_seconds(lambda: dst.copy_(src), device, launches=10 if src.is_cuda else 1, repeats=3)
    return 2 * nbytes / seconds


def decode_attention_bytes(batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                           element_size: int) -> int:
    """Bytes a decode-attention call must move: every context's K and V, the queries and the outputs."""
    return (2 * batch * context * num_kv_heads + 2 * batch * num_heads) * head_dim * element_size


def paged_cache(batch: int, num_kv_heads: int, head_dim: int, context: int, block_size: int, dtype, seed: int = 0,
                device="cuda"):
    """Random K/V caches with `batch` contexts of `context` tokens in shuffled blocks, the block table, the lengths."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, lens


def decode_paths(with_cuda_kernels: bool) -> list[tuple[str, int, int | None]]:
    """(path, block size, num_splits) of the decode-attention comparisons this machine can run: ours (Triton, and
    CUDA with the extension) on blocks of 16, flash-attn (blocks of 256) and FlashInfer where they import, SDPA."""
    paths = [("triton", 16, None)] + ([("cuda", 16, None)] if with_cuda_kernels else [])
    paths += [("flash_attn", 256, None)] if flash_attn_with_kvcache is not None else []
    paths += [("flashinfer", 16, None)] if flashinfer is not None else []
    return paths + [("sdpa", 16, None)]


def decode_attention_call(path: str, batch: int, num_heads: int, num_kv_heads: int, head_dim: int, context: int,
                          block_size: int, num_splits: int | None, dtype, device="cuda"):
    """(fn, capturable): one decode-attention call of `path` on a random paged cache (the same for every path)."""
    from coconut_fast import kernels

    k_cache, v_cache, tables, lens = paged_cache(batch, num_kv_heads, head_dim, context, block_size, dtype,
                                                 device=device)
    q = torch.randn(batch, num_heads, head_dim, device=device,
                    generator=torch.Generator(device=device).manual_seed(1)).to(dtype)
    scale = head_dim ** -0.5
    if path in ("triton", "cuda"):
        attend = kernels.paged_decode_attention if path == "triton" else kernels.paged_decode_attention_cuda
        return lambda: attend(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits), True
    if path == "reference":  # reads the context lengths on the host
        return lambda: kernels.paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale), False
    if path == "flash_attn":
        return (lambda: flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=lens, block_table=tables,
                                                softmax_scale=scale), True)
    if path == "flashinfer":  # planned here, outside the timing
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8,
                                                                            device=device), "NHD")
        indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * tables.shape[1]
        last = torch.full((batch,), context - (tables.shape[1] - 1) * block_size, dtype=torch.int32, device=device)
        wrapper.plan(indptr, tables.flatten(), last, num_heads, num_kv_heads, head_dim, block_size,
                     q_data_type=dtype, kv_data_type=dtype, sm_scale=scale)
        return lambda: wrapper.run(q, (k_cache, v_cache)), True

    def sdpa():  # every context has the same length: one batched call after the gather (included)
        k = k_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)  # [B, Hkv, n, D]
        v = v_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
    return sdpa, True


def latent_step_bytes(cm: CoconutModel, batch: int, context: int) -> int:
    """Bytes one latent step must read: every transformer-block weight (not the embeddings or the LM head, which a
    latent step skips) and the live K/V of `batch` contexts of `context` tokens."""
    model, config = cm.model, cm.model.config
    skipped = {model.get_input_embeddings().weight.data_ptr(), model.get_output_embeddings().weight.data_ptr()}
    if hasattr(model, "transformer"):
        skipped.add(model.transformer.wpe.weight.data_ptr())  # a latent step reads one row of it
    seen, weights = set(), 0
    for p in model.parameters():
        if p.data_ptr() in skipped or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        weights += p.numel() * p.element_size()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    element = model.get_input_embeddings().weight.element_size()
    kv = batch * context * config.num_hidden_layers * 2 * kv_heads * head_dim * element
    return weights + kv


def record_loop_inputs(engine: LLM) -> dict[tuple, list[torch.Tensor]]:
    """From now on, the static inputs of every thought loop as loaded for it (before its first step advances them):
    {graph key: [embeds, positions, slot_mapping, context_lens, block_tables]}, the last load of each key."""
    runner = engine.runner.graphs
    loaded = {}
    run = runner.run

    def recording_run(key):
        if key[0] == "thoughts":  # run() follows the load at once: the inputs are the loop's start
            inputs = runner.bodies[key].inputs
            loaded[key] = [t.clone() for t in loop_input_tensors(inputs)]
        run(key)

    runner.run = recording_run
    return loaded


def loop_input_tensors(inputs) -> list[torch.Tensor]:
    m = inputs.meta
    return [inputs.embeds, m.positions, m.slot_mapping, m.context_lens, m.block_tables]


def graph_latent_step_seconds(engine: LLM, key: tuple, loaded: list[torch.Tensor], repeats: int = 20) -> float:
    """Seconds per latent step of the replayed thought-loop graph `key`, its inputs put back to `loaded` (as
    recorded by record_loop_inputs) before each replay, so every replay writes the K/V slots the loop had."""
    runner = engine.runner.graphs
    graph, inputs = runner.graphs[key], runner.bodies[key].inputs
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        for dst, src in zip(loop_input_tensors(inputs), loaded):
            dst.copy_(src)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / key[2]


def answer_logits(cm: CoconutModel, prompts: list[list[int]], answers: list[list[int]], chunk: int = 16):
    """Per prompt (with its latent block), the logits [len(answer), vocab] of the positions that predict its
    `answer` tokens, from CoconutModel's forward (thoughts filled) on prompt + answer, right-padded in chunks."""
    pad = cm.tokenizer.pad_token_id
    with torch.no_grad():
        for i in range(0, len(prompts), chunk):
            pairs = list(zip(prompts[i:i + chunk], answers[i:i + chunk]))
            rows = [p + a[:-1] for p, a in pairs]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=cm.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=cm.device)
            logits = cm(ids, mask, position_ids=torch.arange(width, device=cm.device).expand_as(ids)).logits
            for b, (prompt, answer) in enumerate(pairs):
                yield logits[b, len(prompt) - 1:len(prompt) - 1 + len(answer)].float()


def answer_logit_gaps(cm: CoconutModel, prompts: list[list[int]], answers: list[list[int]],
                      chunk: int = 16) -> list[float]:
    """Per prompt: the smallest gap between the top two logits over the positions of its greedy `answer`."""
    gaps = []
    for logits in answer_logits(cm, prompts, answers, chunk):
        top2 = logits.topk(2, dim=-1).values
        gaps.append(float((top2[:, 0] - top2[:, 1]).min()) if len(logits) else float("inf"))
    return gaps


def compare_answers(answers: list[list[int]], baseline: list[list[int]], gaps: list[float],
                    min_gap: float = 1e-4) -> dict:
    """Rows whose baseline top-2 logit gap is below `min_gap` somewhere are near-ties: counted, not compared."""
    if not len(answers) == len(baseline) == len(gaps):
        raise ValueError(f"answers, baseline and gaps must have one entry per prompt, got {len(answers)}, "
                         f"{len(baseline)}, {len(gaps)}")
    near_ties = [i for i, g in enumerate(gaps) if g < min_gap]
    compared = [i for i, g in enumerate(gaps) if g >= min_gap]
    mismatched = [i for i in compared if answers[i] != baseline[i]]
    return dict(compared=len(compared), ignored_near_ties=len(near_ties), mismatched=mismatched,
                min_gap=min_gap, equal=not mismatched)


def prosqa_prompts(cm: CoconutModel, count: int, num_thoughts: int) -> tuple[list[list[int]], str]:
    """Question prompts with `num_thoughts` latents: the official ProsQA test set when found (COCONUT_PROSQA_TEST
    or ../shared/data/prosqa/prosqa_test.json), else the generator's questions."""
    path = os.environ.get("COCONUT_PROSQA_TEST") or str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                                         / "prosqa" / "prosqa_test.json")
    records, source = None, "generated"
    if Path(path).exists():
        records, source = load_records(path)[:count], path
    if records is None:
        records = generate_prosqa(count, seed=1234)
    cfg = CurriculumConfig(mode="coconut", max_latent_stage=num_thoughts, pad_latent_to_max=True)
    tok = cm.tokenizer
    prompts = [build_eval_example(tokenize_record(r, tok, i), num_thoughts, cfg, cm.latent_ids)["input_ids"]
               for i, r in enumerate(records)]
    return prompts, source


def split_latent_block(prompts: list[list[int]], cm: CoconutModel) -> list[list[int]]:
    """The questions without their `<bot> … <eot>` blocks (the variants append the block themselves)."""
    start = cm.latent_ids.start
    return [p[: p.index(start)] if start in p else p for p in prompts]


def environment(device) -> dict:
    """Device, commit and software versions for a results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return dict(device=name, commit=commit, torch=torch.__version__, torch_cuda=torch.version.cuda,
                triton=triton_version)


def device_slug(name: str) -> str:
    return "-".join(filter(None, "".join(c if c.isalnum() else "-" for c in name.lower()).split("-")))


def write_results(records: list[dict], device, directory: Path = RESULTS_DIR, suffix: str = "",
                  extra: dict | None = None) -> Path:
    """benchmarks/results/<device>-<date><suffix>.json with the environment, `extra` and every record."""
    env = environment(device)
    path = directory / f"{device_slug(env['device'])}-{time.strftime('%Y-%m-%d')}{suffix}.json"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(**env, **(extra or {}), records=records), indent=1, default=str))
    os.replace(tmp, path)
    return path
