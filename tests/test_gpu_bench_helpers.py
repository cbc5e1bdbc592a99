"""The GPU benchmark's pieces (benchmarks/gpu_bench.py) run small on CPU, so a GPU run measures working code:
every variant gives the reference's tokens, the engine computes a repeated prompt again, the thought loop's inputs
are recorded as loaded, phases are timed, the byte floor counts what a latent step reads, near-tie answers are
counted rather than compared, and results land as a JSON file with the environment."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_bench  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*CUDA graphs need a CUDA device")]

TINY = {
    "gpt2": dict(family="gpt2", vocab=500, hidden=64, layers=2, heads=4, kv_heads=4, ffn=128, context=128),
    "llama": dict(family="llama", vocab=500, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, context=128),
}


@pytest.mark.parametrize("family", list(TINY))
def test_every_variant_gives_the_reference_tokens(family):
    cm = gpu_bench.build_model(TINY[family], torch.float32, "cpu")
    prompts = gpu_bench.random_prompts(cm, 3, 12)
    assert all(0 <= t < cm.latent_ids.start for p in prompts for t in p)
    answers = {}
    for name in gpu_bench.VARIANTS:
        variant = gpu_bench.Variant.build(name, cm, len(prompts), 12)
        answers[name] = variant.run(prompts, 3, 5)
        assert [len(a) for a in answers[name]] == [5, 5, 5]  # no EOS: full length
    assert all(a == answers["reference"] for a in answers.values()), answers
    assert len({tuple(a) for a in answers["reference"]}) > 1  # the prompts get different answers
    full = [p + [cm.latent_ids.start] + [cm.latent_ids.latent] * 3 + [cm.latent_ids.end] for p in prompts]
    gaps = gpu_bench.answer_logit_gaps(cm, full, answers["reference"], chunk=2)
    for name, got in answers.items():
        compared = gpu_bench.compare_answers(got, answers["reference"], gaps)
        assert compared["equal"] and compared["compared"] + compared["ignored_near_ties"] == 3, (name, compared)


def test_answer_logits_predict_the_greedy_answers():
    """The logits the gaps come from sit at the answer positions, thoughts filled: their argmax is the reference's
    greedy answer, and each gap is the top-2 difference there."""
    cm = gpu_bench.build_model(TINY["llama"], torch.float32, "cpu")
    prompts = gpu_bench.random_prompts(cm, 3, 9, seed=4)
    prompts[1] = prompts[1][:5]  # ragged: the batch is right-padded
    full = [p + [cm.latent_ids.start] + [cm.latent_ids.latent] * 2 + [cm.latent_ids.end] for p in prompts]
    answers = gpu_bench.Variant.build("reference", cm, 3, 9).run(prompts, 2, 4)
    logits = list(gpu_bench.answer_logits(cm, full, answers, chunk=2))
    assert [row.argmax(-1).tolist() for row in logits] == answers
    top2 = [row.topk(2, dim=-1).values for row in logits]
    assert gpu_bench.answer_logit_gaps(cm, full, answers, chunk=3) == pytest.approx(
        [float((t[:, 0] - t[:, 1]).min()) for t in top2], abs=1e-6)  # other chunks: other summation order


def test_compare_answers_counts_near_ties_instead_of_comparing_them():
    baseline = [[1, 2], [3, 4], [5, 6], [7, 8]]
    answers = [[1, 2], [3, 9], [5, 0], [7, 8]]
    result = gpu_bench.compare_answers(answers, baseline, [0.5, 5e-5, 0.2, 1e-4])
    assert result == dict(compared=3, ignored_near_ties=1, mismatched=[2], min_gap=1e-4, equal=False)
    assert gpu_bench.compare_answers(answers[:2], baseline[:2], [0.5, 5e-5])["equal"]
    with pytest.raises(ValueError, match="one entry per prompt"):
        gpu_bench.compare_answers(answers, baseline, [0.5])


def test_the_engine_computes_a_repeated_prompt_again():
    """No prefix caching: the second run of the same prompts computes as many positions as the first, so the
    prefill phase times a real prefill."""
    cm = gpu_bench.build_model(TINY["gpt2"], torch.float32, "cpu")
    prompts = gpu_bench.random_prompts(cm, 2, 40)
    for name in ("paged-triton", "paged-graphs"):
        variant = gpu_bench.Variant.build(name, cm, len(prompts), 40)
        steps = variant.engine.stats.steps
        variant.run(prompts, 0, 1)
        first = sum(s.num_tokens for s in steps)
        variant.run(prompts, 0, 1)
        assert sum(s.num_tokens for s in steps) == 2 * first >= 2 * 2 * 40, name


def test_graph_variants_fit_the_largest_bucket():
    from coconut_fast.engine.cuda_graph import BATCH_BUCKETS, bucket_for

    cm = gpu_bench.build_model(TINY["gpt2"], torch.float32, "cpu")
    assert gpu_bench.engine_batch(500) == BATCH_BUCKETS[-1] and gpu_bench.engine_batch(3) == 3
    variant = gpu_bench.Variant.build("paged-graphs", cm, 500, 10)
    assert bucket_for(variant.engine.sizes["max_num_seqs"]) == BATCH_BUCKETS[-1]
    assert variant.graph_counts() == (0, 0)  # CPU: the static-buffer steps run eagerly, nothing replays


def test_thought_loop_inputs_are_recorded_as_loaded():
    """The recorded inputs are the loop's start: every live row at the position after <bot>, its slot that
    position's place in its block table (a snapshot after the loop would hold positions num_steps further on)."""
    cm = gpu_bench.build_model(TINY["llama"], torch.float32, "cpu")
    prompts = gpu_bench.random_prompts(cm, 3, 11, seed=2)
    variant = gpu_bench.Variant.build("paged-graphs", cm, 3, 11)
    loaded = gpu_bench.record_loop_inputs(variant.engine)
    variant.run(prompts, 5, 2)
    assert list(loaded) == [("thoughts", 4, 4)]  # 3 rows in bucket 4; 5 thoughts: one from the prefill, 4 looped
    embeds, positions, slots, lens, tables = loaded["thoughts", 4, 4]
    block = variant.engine.sizes["block_size"]
    first = 11 + 1  # prompt, then <bot>: the first looped step computes the slot after it
    assert positions[:3].tolist() == [first] * 3 and lens[:3].tolist() == [first + 1] * 3
    assert slots[:3].tolist() == [int(tables[r, first // block]) * block + first % block for r in range(3)]
    assert slots[3] == -1 and embeds[:3].abs().sum() > 0


def test_device_seconds_on_cpu_times_each_call():
    calls = []
    seconds, method = gpu_bench.device_seconds(lambda: calls.append(1), "cpu", launches=7, repeats=3)
    assert method == "wall" and seconds > 0 and len(calls) == 1 + 7 * 3


def test_decode_attention_bytes_counts_kv_queries_and_outputs():
    # GPT-2: 12 heads of 64, batch 64, context 4096, bf16: K and V of every context, q and out
    kv, q_and_out = 2 * 64 * 4096 * 12 * 64 * 2, 2 * 64 * 12 * 64 * 2
    assert gpu_bench.decode_attention_bytes(64, 4096, 12, 12, 64, 2) == kv + q_and_out
    assert gpu_bench.decode_attention_bytes(1, 512, 32, 8, 128, 2) == (2 * 512 * 8 + 2 * 32) * 128 * 2


def test_phase_times_are_consistent():
    cm = gpu_bench.build_model(TINY["gpt2"], torch.float32, "cpu")
    variant = gpu_bench.Variant.build("torch", cm, 2, 10)
    phases = gpu_bench.phase_times(variant, gpu_bench.random_prompts(cm, 2, 10), 3, 4, "cpu", repeats=1)
    assert phases["total_s"] > 0 and phases["prefill_s"] > 0
    assert phases["samples_per_s"] == pytest.approx(2 / phases["total_s"])
    assert phases["latent_step_ms"] == pytest.approx(1e3 * phases["thought_loop_s"] / 3)


@pytest.mark.parametrize("family", list(TINY))
def test_latent_step_bytes_counts_blocks_and_live_kv(family):
    shape = TINY[family]
    cm = gpu_bench.build_model(shape, torch.float32, "cpu")
    H, L, F = shape["hidden"], shape["layers"], shape["ffn"]
    kv_dim = H // shape["heads"] * shape["kv_heads"]
    if family == "gpt2":  # c_attn, c_proj, mlp (with biases), two LayerNorms per block, ln_f
        block = (H * 3 * H + 3 * H) + (H * H + H) + (H * F + F) + (F * H + H) + 4 * H
        weights = L * block + 2 * H
    else:  # q, k, v, o, gate, up, down, two RMSNorms per layer, final norm
        block = H * H + 2 * H * kv_dim + H * H + 3 * H * F + 2 * H
        weights = L * block + H
    kv = 5 * 40 * L * 2 * kv_dim
    assert gpu_bench.latent_step_bytes(cm, 5, 40) == 4 * (weights + kv)


def test_prosqa_prompts_and_their_questions():
    cm = gpu_bench.build_model(TINY["gpt2"], torch.float32, "cpu")
    prompts, source = gpu_bench.prosqa_prompts(cm, 4, 6)
    assert len(prompts) == 4 and source
    ids = cm.latent_ids
    for prompt, question in zip(prompts, gpu_bench.split_latent_block(prompts, cm)):
        assert prompt[len(question):] == [ids.start] + [ids.latent] * 6 + [ids.end]


def test_results_file_names_the_device_and_software(tmp_path):
    path = gpu_bench.write_results([{"kind": "phases", "batch": 1}], "cpu", tmp_path, suffix="-kernels",
                                   extra={"copy_bandwidth_gbs": 1.5})
    data = json.loads(path.read_text())
    assert path.name.startswith("cpu-") and path.name.endswith("-kernels.json")
    assert data["copy_bandwidth_gbs"] == 1.5
    assert gpu_bench.device_slug("NVIDIA H200 (141 GB)") == "nvidia-h200-141-gb"
    assert data["device"] == "cpu" and data["torch"] == torch.__version__ and "triton" in data and "commit" in data
    assert data["records"] == [{"kind": "phases", "batch": 1}]


def test_decode_attention_paths_compute_the_same_attention():
    """The timed comparisons run like with like: on CPU, the paths that run here (Triton in the interpreter, the
    reference, SDPA on the gathered context) give the same output for one random paged cache."""
    outputs = {}
    for path in ("triton", "reference", "sdpa"):
        fn, capturable = gpu_bench.decode_attention_call(path, 2, 4, 2, 16, 40, 16, None, torch.float32, device="cpu")
        outputs[path] = fn().reshape(2, 4, 16)
        assert capturable == (path != "reference")
    torch.testing.assert_close(outputs["triton"], outputs["reference"], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outputs["sdpa"], outputs["reference"], atol=2e-5, rtol=2e-5)
    paths = [p for p, _, _ in gpu_bench.decode_paths(False)]
    assert paths[0] == "triton" and paths[-1] == "sdpa" and "cuda" not in paths
