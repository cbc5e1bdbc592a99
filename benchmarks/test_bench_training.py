"""Training-step throughput and peak memory: reference vs fast vs parallel latent mode (pytest-benchmark).

    python -m pytest benchmarks/test_bench_training.py --benchmark-only -p no:randomly \\
        --benchmark-json=benchmarks/results/training.json

One step = forward, backward and zeroing the gradients of a curriculum batch of generated
ProsQA-style records at stages 0-6, one latent per stage (c_thought=1, pad_latent_to_max). A sample
has 210-230 tokens with the local tokenizer (CPU shape) and 390-430 with the GPT-2 BPE (CUDA
shape; the official ProsQA validation set: 405). Paths:

- reference: `coconut_fast.reference.reference_forward` (one full pass per latent column, full logits)
- fast: `CoconutModel.forward(..., return_logits=False)` (cached passes, chunked cross-entropy)
- fast_logits: `CoconutModel.forward(...)` (cached passes, full logits)
- parallel: `latent_mode="parallel"` with min(3, stage) Jacobi iterations, `return_logits=False`

Shapes: "cpu": a GPT-2 of 4 layers x 128 with the local tokenizer (float32), batch 8; "cuda": GPT-2
124M (12 x 768, GPT-2 BPE, 50260 rows), batch 32, float32 / pure bf16 weights / bf16 autocast;
skipped without CUDA.

extra_info of every benchmark: samples, tokens, samples_per_s (batch / mean step time), loss,
peak_memory_bytes and peak_memory_method. CUDA: `torch.cuda.max_memory_allocated` during one step
(weights and gradients included). CPU: the peak of the bytes the step itself allocates, from
torch.profiler's allocation events (weights and inputs that exist before the step excluded).
"""
from __future__ import annotations

import random

import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.data import CoconutCollator, CurriculumConfig, build_training_example, default_tokenizer
from coconut_fast.data import generate_prosqa, tokenize_record
from coconut_fast.data.tokenizer import gpt2_tokenizer
from coconut_fast.reference import reference_forward
from coconut_fast.tiny import tiny_model

STAGES = range(7)
PATHS = ("reference", "fast", "fast_logits", "parallel")
JACOBI_ITERATIONS = 3
SHAPES = {
    "cpu": dict(device="cpu", batch=8, size=dict(hidden=128, layers=4, heads=4, context=1024), tokenizer="local",
                precisions=("float32",)),
    "cuda": dict(device="cuda", batch=32, size=dict(hidden=768, layers=12, heads=12, context=1024), tokenizer="gpt2",
                 precisions=("float32", "bf16", "bf16_autocast")),
}
CASES = [(shape, precision) for shape, spec in SHAPES.items() for precision in spec["precisions"]]


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(shape: str, precision: str):
        key = (shape, precision)
        if key not in built:
            spec = SHAPES[shape]
            if spec["device"] == "cuda" and not torch.cuda.is_available():
                pytest.skip("CUDA is not available")
            tok = gpt2_tokenizer() if spec["tokenizer"] == "gpt2" else default_tokenizer()
            model = tiny_model("gpt2", len(tok), seed=0, **spec["size"])  # GPT-2 BPE: 50257 + 3 rows after loading
            model = model.to(spec["device"], torch.bfloat16 if precision == "bf16" else torch.float32)
            cm = CoconutModel.from_pretrained(model, tokenizer=tok).train()
            records = [tokenize_record(r, tok, i) for i, r in enumerate(generate_prosqa(spec["batch"], seed=11))]
            built[key] = cm, records
        return built[key]

    return get


def training_batch(cm, records, stage):
    cfg = CurriculumConfig(mode="coconut", max_latent_stage=6, pad_latent_to_max=True)
    feats = [build_training_example(r, stage, cfg, cm.latent_ids, random.Random(0)) for r in records]
    batch = CoconutCollator(cm.tokenizer.pad_token_id, cm.latent_ids.latent)(feats)
    return {k: v.to(cm.device) for k, v in batch.items() if k != "idx"}


def step_function(cm, batch, path, stage, precision):
    autocast = torch.autocast(cm.device.type, dtype=torch.bfloat16, enabled=precision == "bf16_autocast")
    options = {
        "fast": dict(return_logits=False),
        "fast_logits": {},
        "parallel": dict(return_logits=False, latent_mode="parallel", jacobi_iterations=min(JACOBI_ITERATIONS, stage)),
    }

    def step():
        with autocast:
            if path == "reference":
                loss = reference_forward(cm.model, batch["input_ids"], cm.latent_ids.latent, batch["attention_mask"],
                                         batch["labels"], batch["position_ids"])[0]
            else:
                loss = cm(**batch, **options[path]).loss
        loss.backward()
        cm.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def peak_memory(step, device) -> tuple[int, str]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak, "torch.profiler allocation events (bytes allocated by the step)"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("shape,precision", CASES)
def test_train_step(benchmark, models, shape, precision, stage, path):
    cm, records = models(shape, precision)
    batch = training_batch(cm, records, stage)
    step = step_function(cm, batch, path, stage, precision)
    sync = torch.cuda.synchronize if cm.device.type == "cuda" else (lambda: None)

    def timed():
        loss = step()
        sync()
        return loss

    try:
        peak, method = peak_memory(step, cm.device)
        loss = benchmark.pedantic(timed, rounds=3, warmup_rounds=1)
    except torch.OutOfMemoryError:
        benchmark.extra_info["out_of_memory"] = True
        pytest.skip(f"{path} at stage {stage} ran out of memory")
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        samples=len(records), tokens=int(batch["attention_mask"].sum()), samples_per_s=len(records) / mean,
        loss=float(loss), peak_memory_bytes=int(peak), peak_memory_method=method, device=str(cm.device),
        precision=precision, jacobi_iterations=min(JACOBI_ITERATIONS, stage) if path == "parallel" else None,
    )


# ---------------------------------------------------------------- parallel mode: accuracy proxy
GAP_STAGES = 3  # latent stages of the short curriculum (3 latents at the end)
GAP_TRAIN, GAP_VALID, GAP_BATCH, GAP_COT_EPOCHS = 256, 64, 16, 2


def curriculum_batches(cm, records, stage, shuffle_seed):
    cfg = CurriculumConfig(mode="coconut", max_latent_stage=GAP_STAGES, pad_latent_to_max=True)
    collate = CoconutCollator(cm.tokenizer.pad_token_id, cm.latent_ids.latent)
    order = list(range(len(records)))
    random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), GAP_BATCH):
        rows = order[i : i + GAP_BATCH]
        feats = [build_training_example(records[j], stage, cfg, cm.latent_ids, random.Random(j)) for j in rows]
        yield {k: v for k, v in collate(feats).items() if k != "idx"}


def train_stages(cm, records, stages, options_for_stage, lr=2e-3):
    for epoch, stage in enumerate(stages):
        optimizer = torch.optim.AdamW(cm.parameters(), lr=lr)  # a fresh optimizer per stage, as the official runs
        for batch in curriculum_batches(cm, records, stage, epoch):
            cm(**batch, **options_for_stage(stage)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def validation_loss(cm, records, stage, **options) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in curriculum_batches(cm, records, stage, 0):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(cm(**batch, return_logits=False, **options).loss) * n
            count += n
    return total / count


def thought_error(cm, records, stage, iterations) -> float:
    """Relative L2 distance of the parallel mode's thoughts from the exact ones, over all latent slots."""
    batch = next(curriculum_batches(cm, records, stage, 0))
    latent = batch["input_ids"] == cm.latent_ids.latent
    with torch.no_grad():
        exact = cm(**batch).inputs_embeds[latent]
        approx = cm(**batch, latent_mode="parallel", jacobi_iterations=iterations).inputs_embeds[latent]
    return float((approx - exact).norm() / exact.norm())


def test_parallel_mode_loss_gap(benchmark):
    """Demo-shaped GPT-2 (4 x 128) on generated ProsQA: CoT epochs, then latent stages 1..3 trained
    sequentially (A) or in parallel mode with one Jacobi iteration (B). Validation loss at stage 3:
    A under every iteration count (the gap of the approximation on a sequentially trained model),
    B under its own training mode. Timed: one parallel-mode training step of B (T=1, stage 3)."""
    torch.manual_seed(0)
    tok = default_tokenizer()
    records = [tokenize_record(r, tok, i) for i, r in enumerate(generate_prosqa(GAP_TRAIN + GAP_VALID, seed=5))]
    train, valid = records[:GAP_TRAIN], records[GAP_TRAIN:]
    cm = CoconutModel.from_pretrained(tiny_model("gpt2", len(tok), seed=0, hidden=128, layers=4, heads=4, context=1024),
                                      tokenizer=tok).train()
    train_stages(cm, train, [0] * GAP_COT_EPOCHS, lambda stage: {})
    cot_state = {k: v.clone() for k, v in cm.state_dict().items()}
    latent_stages = list(range(1, GAP_STAGES + 1))
    train_stages(cm, train, latent_stages, lambda stage: dict(return_logits=False))
    cm.eval()
    sequential = validation_loss(cm, valid, GAP_STAGES)
    gaps = {t: validation_loss(cm, valid, GAP_STAGES, latent_mode="parallel", jacobi_iterations=t) - sequential
            for t in range(GAP_STAGES + 1)}
    errors = {t: thought_error(cm, valid, GAP_STAGES, t) for t in range(GAP_STAGES + 1)}
    cm.load_state_dict(cot_state)
    cm.train()
    parallel_options = dict(return_logits=False, latent_mode="parallel", jacobi_iterations=1)
    train_stages(cm, train, latent_stages, lambda stage: parallel_options)
    cm.eval()
    parallel_trained = validation_loss(cm, valid, GAP_STAGES, latent_mode="parallel", jacobi_iterations=1)
    cm.train()
    batch = next(curriculum_batches(cm, valid, GAP_STAGES, 0))

    def step():
        cm(**batch, **parallel_options).loss.backward()
        cm.zero_grad(set_to_none=True)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        latents=GAP_STAGES, sequential_validation_loss=sequential,
        loss_gap_of_sequential_model_by_iterations={str(t): g for t, g in gaps.items()},
        thought_relative_error_by_iterations={str(t): e for t, e in errors.items()},
        parallel_trained_validation_loss_T1=parallel_trained,
        samples_per_s_parallel_T1=GAP_BATCH / benchmark.stats.stats.mean,
    )
