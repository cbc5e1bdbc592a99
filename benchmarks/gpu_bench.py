"""What the GPU benchmarks (test_bench_gpu.py) measure, kept apart so tests/test_gpu_bench_helpers.py can run
every piece small on CPU.

- Model shapes: GPT-2 124M and a 1B Llama (random weights, bf16).
- Variants: the reference (batch 1, full recompute per token), the torch backend (HF cache, batched), and the
  paged engine with Triton kernels, with the CUDA kernels, and with CUDA graphs.
- Phases by differences of three runs: prefill = (0 thoughts, 1 token); thought loop = (k thoughts, 1 token)
  minus prefill; answer = (k thoughts, n tokens) minus (k thoughts, 1 token). No EOS, so every run is full length.
- The byte floor of a latent step: the transformer blocks' weights plus the live K/V bytes, over the copy
  bandwidth measured in the same run.
"""
from __future__ import annotations

import json
import os
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
from coconut_fast.generation import left_pad
from coconut_fast.reference import reference_generate

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
        # the whole batch prefills in one step, so its requests think in lockstep
        engine = LLM(cm, kernels=kernels, cuda_graphs=name == "paged-graphs", max_num_seqs=max(batch, 1),
                     max_num_batched_tokens=max(8192, batch * (prompt_len + 16)),
                     memory_fraction=0.5 if cm.device.type == "cuda" else 0.2)
        return cls(name, cm, engine)

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


def phase_times(variant: Variant, prompts, num_thoughts: int, new_tokens: int, device, repeats: int = 3) -> dict:
    """Seconds per phase (by differences of three runs), samples/s and ms per latent step."""
    prefill = timed(lambda: variant.run(prompts, 0, 1), device, repeats)
    thinking = timed(lambda: variant.run(prompts, num_thoughts, 1), device, repeats)
    total = timed(lambda: variant.run(prompts, num_thoughts, new_tokens), device, repeats)
    loop = max(thinking - prefill, 0.0)
    return dict(prefill_s=prefill, thought_loop_s=loop, answer_s=max(total - thinking, 0.0), total_s=total,
                samples_per_s=len(prompts) / total, latent_step_ms=1e3 * loop / max(num_thoughts, 1))


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: [dst.copy_(src) for _ in range(repeats)], device)
    return 2 * nbytes * repeats / seconds


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


def graph_latent_step_seconds(engine: LLM, batch: int, num_steps: int, device, repeats: int = 20) -> float | None:
    """Seconds per latent step of a replayed thought-loop graph (inputs put back before each replay), or None when
    no graph of that bucket and length was captured."""
    from coconut_fast.engine.cuda_graph import bucket_for

    runner = engine.runner.graphs
    key = ("thoughts", bucket_for(batch), num_steps)
    if runner is None or key not in runner.graphs:
        return None
    inputs = runner.bodies[key].inputs
    saved = inputs.snapshot()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        inputs.restore(saved)
        start.record()
        runner.graphs[key].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    inputs.restore(saved)
    return sorted(times)[len(times) // 2] / num_steps


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


def write_results(records: list[dict], device, directory: Path = RESULTS_DIR) -> Path:
    """benchmarks/results/<device>-<date>.json with the environment and every record."""
    env = environment(device)
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    path = directory / f"{slug}-{time.strftime('%Y-%m-%d')}.json"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(**env, records=records), indent=1))
    os.replace(tmp, path)
    return path
