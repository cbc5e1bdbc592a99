"""GPU throughput: phases per variant, the byte floor of a latent step, ProsQA-test evaluation (CUDA only).

    python -m pytest benchmarks/test_bench_gpu.py --benchmark-only      # writes benchmarks/results/<device>-<date>.json

Phases (prefill, thought loop, answer) at batch 1, 8, 64, 256 in bf16, on GPT-2-124M- and 1B-Llama-shaped random
models, for the reference, the torch backend and the paged engine (Triton kernels, CUDA kernels, CUDA graphs);
prompts of 256 tokens, 6 thoughts, 16 answer tokens, no EOS. Targets (read from the results, not asserted): a
graph-replayed latent step <= 1.3x the byte floor at batch 1 and 64 (GPT-2 shape); ProsQA-test evaluation >= 200x
the reference and >= 5x the torch backend.
"""
import gc

import pytest
import torch

from coconut_fast.kernels import cuda_kernels_available
from gpu_bench import (SHAPES, VARIANTS, Variant, build_model, copy_bandwidth, graph_latent_step_seconds,
                       latent_step_bytes, phase_times, prosqa_prompts, random_prompts, split_latent_block, timed,
                       write_results)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU benchmarks need CUDA")

BATCHES = (1, 8, 64, 256)
PROMPT_LEN, NUM_THOUGHTS, NEW_TOKENS = 256, 6, 16
REFERENCE_MAX_BATCH = 8  # batch-1 full recompute: larger batches only multiply its time
PROSQA_COUNT, PROSQA_NEW_TOKENS = 500, 32


@pytest.fixture(scope="module")
def records():
    collected = []
    yield collected
    if collected:
        print(f"\nresults: {write_results(collected, 'cuda')}")


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(shape: str, dtype=torch.bfloat16):
        if (shape, dtype) not in built:
            built[shape, dtype] = build_model(SHAPES[shape], dtype, "cuda")
        return built[shape, dtype]

    return get


@pytest.fixture(scope="module")
def bandwidth():
    return copy_bandwidth("cuda")


def release(variant):
    variant.engine = None
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("variant_name", VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_phases(benchmark, models, records, bandwidth, shape, batch, variant_name):
    if variant_name == "reference" and batch > REFERENCE_MAX_BATCH:
        pytest.skip(f"the reference runs one prompt at a time; measured up to batch {REFERENCE_MAX_BATCH}")
    if variant_name == "paged-cuda" and not cuda_kernels_available():
        pytest.skip("coconut_fast._C is not built")
    cm = models(shape)
    prompts = random_prompts(cm, batch, PROMPT_LEN)
    variant = Variant.build(variant_name, cm, batch, PROMPT_LEN)
    variant.run(prompts, NUM_THOUGHTS, NEW_TOKENS)  # warm-up: compiles kernels, captures graphs
    repeats = 1 if variant_name == "reference" else 3
    phases = phase_times(variant, prompts, NUM_THOUGHTS, NEW_TOKENS, "cuda", repeats)
    floor = latent_step_bytes(cm, batch, PROMPT_LEN + NUM_THOUGHTS) / bandwidth
    record = dict(kind="phases", shape=shape, batch=batch, variant=variant_name, dtype="bf16", prompt_len=PROMPT_LEN,
                  num_thoughts=NUM_THOUGHTS, new_tokens=NEW_TOKENS, copy_bandwidth_gbs=bandwidth / 1e9,
                  byte_floor_ms=1e3 * floor, latent_step_over_floor=phases["latent_step_ms"] / 1e3 / floor, **phases)
    if variant_name == "paged-graphs":
        replay = graph_latent_step_seconds(variant.engine, batch, NUM_THOUGHTS - 1, "cuda")
        if replay is not None:
            record.update(graph_latent_step_ms=1e3 * replay, graph_step_over_floor=replay / floor)
    records.append(record)
    benchmark.extra_info.update(record)
    benchmark.pedantic(lambda: variant.run(prompts, NUM_THOUGHTS, NEW_TOKENS), rounds=repeats, warmup_rounds=0)
    release(variant)


PROSQA_ANSWERS = {}


@pytest.mark.parametrize("variant_name", ["reference", "torch", "paged-graphs"])
def test_prosqa_evaluation(benchmark, models, records, variant_name):
    """500 ProsQA-test questions, 6 thoughts, greedy, float32 (so every variant must give the same tokens)."""
    cm = models("gpt2-124m", torch.float32)
    prompts, source = prosqa_prompts(cm, PROSQA_COUNT, NUM_THOUGHTS)
    questions = split_latent_block(prompts, cm)
    variant = Variant.build(variant_name, cm, len(questions), max(map(len, questions)))
    if variant_name != "reference":
        variant.run(questions[:8], NUM_THOUGHTS, 2)  # warm-up
    answers = []
    seconds = timed(lambda: answers.append(variant.run(questions, NUM_THOUGHTS, PROSQA_NEW_TOKENS)), "cuda")
    PROSQA_ANSWERS[variant_name] = answers[-1]
    record = dict(kind="prosqa", variant=variant_name, questions=len(questions), source=source, dtype="fp32",
                  num_thoughts=NUM_THOUGHTS, new_tokens=PROSQA_NEW_TOKENS, seconds=seconds,
                  questions_per_s=len(questions) / seconds)
    records.append(record)
    benchmark.extra_info.update(record)
    benchmark.pedantic(lambda: None, rounds=1)  # timed above: one full pass is the measurement
    release(variant)


def test_prosqa_answers_are_identical():
    if len(PROSQA_ANSWERS) < 2:
        pytest.skip("run with the ProsQA evaluation cases")
    reference = PROSQA_ANSWERS.get("reference") or next(iter(PROSQA_ANSWERS.values()))
    for name, answers in PROSQA_ANSWERS.items():
        mismatched = [i for i, (a, b) in enumerate(zip(answers, reference)) if a != b]
        assert not mismatched, f"{name}: {len(mismatched)} answers differ from the reference, first {mismatched[:5]}"
