"""`bash benchmarks/gpu_check.sh` on this machine's side: without CUDA one line and exit 2 (nothing built); the
summary and the results file from a made-up result; the tests, training cases and profile flags it names exist."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA path")


@no_cuda_only
@pytest.mark.parametrize("command", [["bash", "benchmarks/gpu_check.sh"], [sys.executable, "benchmarks/gpu_check.py"]])
def test_without_cuda_it_says_so_in_one_line_and_exits_2(command):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ,
                                                                                 "PYTHON": sys.executable})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA "
                                          f"{torch.version.cuda}); nothing to check"]


def fake_result() -> dict:
    """A result as gpu_check.main assembles it, every kind of section outcome present."""
    return {
        "device": "NVIDIA H200", "commit": "0123456789abcdef", "torch": "2.13.0+cu130", "triton": "3.9.0",
        "extension": "loaded", "build": "built in 80 s", "kernels": "cuda", "seconds": 331.0, "verdict": "FAIL",
        "copy_bandwidth_gbs": 4100.0,
        "sections": {
            "tests": {"status": "fail", "groups": {
                "decode attention": {"returncode": 0, "counts": {"passed": 70}, "summary": "70 passed"},
                "CUDA extension": {"returncode": 1, "counts": {"passed": 3, "failed": 1},
                                   "summary": "3 passed, 1 failed",
                                   "tail": "E assert\nFAILED tests/test_cuda_extension.py::test_x - assert"}}},
            "profile_step": {"status": "skipped", "reason": "coconut-fast profile-step is not available"},
            "latent_step": {"status": "ok", "shape": "gpt2-124m", "dtype": "bf16", "kernels": "cuda", "rows": [
                dict(batch=1, loop_steps=5, replay_ms=0.41, floor_ms=0.35, over_floor=1.17, graphs=4, replays=12),
                dict(batch=64, loop_steps=5, replay_ms=0.93, floor_ms=0.71, over_floor=1.31, graphs=4, replays=12)]},
            "decode_attention": {"status": "ok", "batch": 64, "context": 4096, "rows": [
                dict(shape="gpt2", path="triton", block_size=16, us=80.0, method="cuda-graph", gb_per_s=3000.0,
                     of_copy=0.73),
                dict(shape="gpt2", path="sdpa", block_size=16, us=400.0, method="cuda-graph", gb_per_s=600.0,
                     of_copy=0.15)]},
            "training": {"status": "ok", "shape": "gpt2-124m", "batch": 32, "rows": [
                dict(precision=p, stage=s, path=q, samples_per_s=10.0 + s + (q == "fast") * 10.0)
                for p in ("float32", "bf16") for s in (0, 6) for q in ("reference", "fast")]},
            "prosqa": {"status": "ok", "questions": 500, "questions_per_s": {"paged-graphs": 400.0, "torch": 40.0,
                                                                             "reference": 1.5},
                       "engine_vs_torch": dict(compared=497, ignored_near_ties=3, mismatched=[], min_gap=1e-4,
                                               equal=True),
                       "engine_vs_reference": dict(compared=16, ignored_near_ties=0, mismatched=[], min_gap=1e-4,
                                                   equal=True)},
        },
    }


def test_summary_fits_one_screen_and_names_every_section():
    result = fake_result()
    lines = gpu_check.summary_lines(result, Path("benchmarks/results/nvidia-h200-2026-11-29.json"))
    assert len(lines) <= 24 and all(len(line) <= 200 for line in lines)
    text = "\n".join(lines)
    assert lines[0].startswith("coconut_fast GPU check on NVIDIA H200: FAIL in 331 s")
    for name in result["sections"]:
        assert re.search(rf"^  {name}\s", text, re.M), name
    assert "1 failed" in text and "coconut-fast profile-step is not available" in text
    assert "batch 64: 0.930 ms per step, byte floor 0.710 ms (1.31x)" in text
    assert "triton 80 us (3000 GB/s)" in text and "sdpa 400 us" in text
    assert "engine 10.0x the torch backend, 267x the reference" in text and "3 near-ties ignored" in text
    assert "FAILED tests/test_cuda_extension.py::test_x" in text
    assert "bf16 stage 6: reference 16.0, fast 26.0 (1.6x)" in text
    assert text.endswith("benchmarks/results/nvidia-h200-2026-11-29.json")
    result["sections"]["prosqa"] = {"status": "error", "error": "RuntimeError: out of memory\nsecond line"}
    lines = gpu_check.summary_lines(result, None)
    assert lines[-1] == f"  {'prosqa':<18}ERROR   RuntimeError: out of memory second line"  # one line per error


def test_verdict_fails_on_a_failed_or_broken_section():
    sections = {"a": {"status": "ok"}, "b": {"status": "skipped"}}
    assert gpu_check.verdict(sections) == "PASS"
    assert gpu_check.verdict({**sections, "c": {"status": "fail"}}) == "FAIL"
    assert gpu_check.verdict({**sections, "c": {"status": "error"}}) == "FAIL"


def test_results_file_holds_every_section_and_the_measured_rows(tmp_path):
    path = gpu_check.write_report(fake_result(), tmp_path)
    data = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.endswith(".json")
    assert set(data["sections"]) == set(fake_result()["sections"]) and data["verdict"] == "FAIL"
    assert data["torch"] == torch.__version__ and "commit" in data  # this machine's environment, not the fake's
    assert [(r["section"], r.get("batch"), r.get("path")) for r in data["records"]][:4] == [
        ("latent_step", 1, None), ("latent_step", 64, None), ("decode_attention", None, "triton"),
        ("decode_attention", None, "sdpa")]
    assert len(data["records"]) == 4 + 8  # and the eight training cases


def test_pytest_counts_from_the_summary_line():
    out = "....F\nFAILED tests/x.py::t\n1 failed, 70 passed, 12 skipped, 2 deselected in 95.21s (0:01:35)\n"
    assert gpu_check.pytest_counts(out) == {"failed": 1, "passed": 70, "skipped": 12, "deselected": 2}
    assert gpu_check.summary_of(gpu_check.pytest_counts(out)) == "1 failed, 70 passed, 12 skipped, 2 deselected"
    assert gpu_check.pytest_counts("ImportError while loading conftest") == {}


def test_the_tests_and_cases_it_runs_exist():
    for args in gpu_check.TEST_GROUPS.values():
        assert (ROOT / args[0]).exists(), args[0]
        if "-k" in args:  # every name the selection asks for is a test of that file
            source = (ROOT / args[0]).read_text()
            for name in re.findall(r"\w+", args[args.index("-k") + 1]):
                if name not in ("not", "or", "and"):
                    assert re.search(rf"def test_\w*{name}", source), name
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                                "benchmarks/test_bench_training.py"], cwd=ROOT, capture_output=True, text=True).stdout
    for precision, stage, path in gpu_check.TRAINING_CASES:
        assert f"test_train_step[cuda-{precision}-{stage}-{path}]" in collected


def test_profile_step_takes_the_flags_it_is_given():
    result = subprocess.run([sys.executable, "-m", "coconut_fast", "profile-step", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("coconut-fast profile-step is not available: gpu_check skips that part")
    for flag in ("--family", "--shape", "--batch", "--kernels", "--context", "--json"):
        assert flag in result.stdout
    assert "gpt2-124m" in result.stdout
