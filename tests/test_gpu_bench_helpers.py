"""The GPU benchmark's pieces (benchmarks/gpu_bench.py) run small on CPU, so a GPU session measures working code:
every variant gives the reference's tokens, phases are timed, the byte floor counts what a latent step reads, and
results land as a JSON file with the environment."""
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
    path = gpu_bench.write_results([{"kind": "phases", "batch": 1}], "cpu", tmp_path)
    data = json.loads(path.read_text())
    assert path.name.startswith("cpu-") and path.suffix == ".json"
    assert data["device"] == "cpu" and data["torch"] == torch.__version__ and "triton" in data and "commit" in data
    assert data["records"] == [{"kind": "phases", "batch": 1}]
