"""GPU throughput: phases per variant, the byte floor of a latent step, ProsQA-test evaluation (CUDA only).

    python -m pytest benchmarks/test_bench_gpu.py --benchmark-only -s
    # records: benchmarks/results/<device>-<date>-throughput.json

Phases (prefill, thought loop, answer) at batch 1, 8, 64, 256 in bf16, on GPT-2-124M- and 1B-Llama-shaped random
models, for the reference, the torch backend and the paged engine (Triton kernels, CUDA kernels, CUDA graphs);
prompts of 256 tokens, 6 thoughts, 16 answer tokens, no EOS, no prefix caching (each repeat prefills its prompts).
Every run is warmed up untimed on the same workload first, so the timed runs capture no graph; the graph variant
must replay graphs in them. Targets (read from the results, not asserted): a graph-replayed latent step <= 1.3x the
byte floor at batch 1 and 64 (GPT-2 shape); ProsQA-test evaluation >= 200x the reference and >= 5x the torch
backend.
"""
import gc

import pytest
import torch

from coconut_fast.kernels import cuda_kernels_available
from coconut_fast.engine.cuda_graph import bucket_for
from gpu_bench import (SHAPES, VARIANTS, Variant, answer_logit_gaps, build_model, compare_answers, copy_bandwidth,
                       graph_latent_step_seconds, latent_step_bytes, phase_times, prosqa_prompts, random_prompts,
                       record_loop_inputs, split_latent_block, timed, write_results)

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
        print(f"\nresults: {write_results(collected, 'cuda', suffix='-throughput')}")


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
    loaded = record_loop_inputs(variant.engine) if variant_name == "paged-graphs" else None
    for thoughts, tokens in ((0, 1), (NUM_THOUGHTS, 1), (NUM_THOUGHTS, NEW_TOKENS)):  # warm-up: the timed runs
        variant.run(prompts, thoughts, tokens)  # compiles kernels and captures every graph they replay
    captured, replays = variant.graph_counts()
    repeats = 1 if variant_name == "reference" else 3
    phases = phase_times(variant, prompts, NUM_THOUGHTS, NEW_TOKENS, "cuda", repeats)
    floor = latent_step_bytes(cm, batch, PROMPT_LEN + NUM_THOUGHTS) / bandwidth
    record = dict(kind="phases", shape=shape, batch=batch, variant=variant_name, dtype="bf16", prompt_len=PROMPT_LEN,
                  num_thoughts=NUM_THOUGHTS, new_tokens=NEW_TOKENS, copy_bandwidth_gbs=bandwidth / 1e9,
                  byte_floor_ms=1e3 * floor, latent_step_over_floor=phases["latent_step_ms"] / 1e3 / floor, **phases)
    if variant_name == "paged-graphs":
        captured_after, replays_after = variant.graph_counts()
        assert captured_after == captured, "graphs were captured inside the timed runs"
        assert replays_after > replays, "the timed runs replayed no graph: they timed the eager engine"
        key = max((k for k in loaded if k[1] == bucket_for(batch)), key=lambda k: k[2])
        replay = graph_latent_step_seconds(variant.engine, key, loaded[key])
        record.update(graph_replays=replays_after - replays, graph_loop_steps=key[2],
                      graph_latent_step_ms=1e3 * replay, graph_step_over_floor=replay / floor)
    records.append(record)
    benchmark.extra_info.update(record)
    benchmark.pedantic(lambda: variant.run(prompts, NUM_THOUGHTS, NEW_TOKENS), rounds=repeats, warmup_rounds=0)
    release(variant)


PROSQA = {"answers": {}}


@pytest.mark.parametrize("variant_name", ["reference", "torch", "paged-graphs"])
def test_prosqa_evaluation(benchmark, models, records, variant_name):
    """500 ProsQA-test questions, 6 thoughts, greedy, float32. The engine runs 256 questions at a time (the largest
    graph bucket), warmed up untimed on the same 500 questions, and must replay graphs in the timed pass."""
    cm = models("gpt2-124m", torch.float32)
    prompts, source = prosqa_prompts(cm, PROSQA_COUNT, NUM_THOUGHTS)
    questions = split_latent_block(prompts, cm)
    variant = Variant.build(variant_name, cm, len(questions), max(map(len, questions)))
    if variant_name != "reference":
        variant.run(questions, NUM_THOUGHTS, PROSQA_NEW_TOKENS)  # warm-up: every graph of the timed pass
    captured, replays = variant.graph_counts()
    answers = []
    seconds = timed(lambda: answers.append(variant.run(questions, NUM_THOUGHTS, PROSQA_NEW_TOKENS)), "cuda")
    PROSQA["answers"][variant_name], PROSQA["prompts"] = answers[-1], prompts
    record = dict(kind="prosqa", variant=variant_name, questions=len(questions), source=source, dtype="fp32",
                  num_thoughts=NUM_THOUGHTS, new_tokens=PROSQA_NEW_TOKENS, seconds=seconds,
                  questions_per_s=len(questions) / seconds)
    if variant_name == "paged-graphs":
        captured_after, replays_after = variant.graph_counts()
        assert captured_after == captured, "graphs were captured inside the timed pass"
        assert replays_after > replays, "the timed pass replayed no graph: it timed the eager engine"
        record.update(graph_replays=replays_after - replays)
    records.append(record)
    benchmark.extra_info.update(record)
    benchmark.pedantic(lambda: None, rounds=1)  # timed above: one full pass is the measurement
    release(variant)


def test_prosqa_answers_are_identical(models, records):
    """Greedy answers of every path against the reference's (or the first path run), rows whose top-2 logit gap
    along the baseline is below 1e-4 counted as near-ties, not compared."""
    answers = PROSQA["answers"]
    if len(answers) < 2:
        pytest.skip("run with the ProsQA evaluation cases")
    baseline_name = "reference" if "reference" in answers else next(iter(answers))
    baseline = answers[baseline_name]
    gaps = answer_logit_gaps(models("gpt2-124m", torch.float32), PROSQA["prompts"], baseline)
    failures = []
    for name, got in answers.items():
        result = compare_answers(got, baseline, gaps)
        records.append(dict(kind="prosqa-equality", variant=name, baseline=baseline_name, **result))
        if not result["equal"]:
            failures.append(f"{name}: {len(result['mismatched'])} of {result['compared']} answers differ from "
                            f"{baseline_name} (near-ties ignored: {result['ignored_near_ties']}), first "
                            f"{result['mismatched'][:5]}")
    assert not failures, "\n".join(failures)
