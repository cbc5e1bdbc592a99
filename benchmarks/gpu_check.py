"""The checks and measurements of `bash benchmarks/gpu_check.sh` on one CUDA GPU (the script builds coconut_fast._C
first, then runs this): the GPU tests, the step profile, the replayed latent step against its byte floor, decode
attention against the field's kernels, the training step against the reference, and the ProsQA-test evaluation.
Writes benchmarks/results/<device>-<date>.json and prints a one-screen summary.

    python benchmarks/gpu_check.py [--deadline EPOCH_SECONDS] [--only SECTION ...]

Without CUDA it says so in one line and exits 2. Exit 1 when a check fails (a test, an answer mismatch, a section
error), else 0. Each section is skipped with a line when the time left is below what it needs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROSQA_TEST = ROOT.parent / "shared" / "data" / "prosqa" / "prosqa_test.json"
BUDGET_S = 6 * 60
NO_CUDA = "gpu_check: no CUDA device here (torch {torch}, CUDA {cuda}); nothing to check"

# pytest runs in parallel processes (the kernel files compile many Triton variants each); the engine files hold
# CPU cases too, so only their GPU cases are selected
TEST_GROUPS = {
    "decode attention": ["tests/test_kernels_decode_attention.py"],
    "prefill attention": ["tests/test_kernels_prefill_attention.py"],
    "kv write, norms, latent feedback": ["tests/test_kernels_kv_write.py", "tests/test_kernels_norms.py",
                                         "tests/test_kernels_latent_feedback.py"],
    "CUDA extension": ["tests/test_cuda_extension.py", "-k", "not compile_with_nvcc"],
    "graphs vs eager, engine vs reference (float32)": ["tests/test_engine_graphs.py", "-k",
                                                       "replayed or uncapturable"],
}
TRAINING_CASES = [(precision, stage, path) for precision in ("float32", "bf16") for stage in (0, 6)
                  for path in ("reference", "fast")]
NEEDS_S = {"tests": 60, "profile_step": 20, "latent_step": 30, "decode_attention": 15, "training": 45, "prosqa": 45}
TESTS_MAX_S = 180  # the measurements after the tests need about as long again
PROMPT_LEN, NUM_THOUGHTS = 256, 6
PROSQA_COUNT, PROSQA_NEW_TOKENS, PROSQA_REFERENCE_COUNT = 500, 32, 16


# ---------------------------------------------------------------- sections
def run_tests(ctx) -> dict:
    began = time.time()
    procs = {name: subprocess.Popen([sys.executable, "-m", "pytest", "-q", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, args in TEST_GROUPS.items()}
    groups, failed = {}, False
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(min(ctx["left"]() - 5, TESTS_MAX_S - (time.time() - began)), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            groups[name] = {"returncode": None, "summary": "timed out", "tail": out[-1500:]}
            failed = True
            continue
        counts = pytest_counts(out)
        groups[name] = {"returncode": proc.returncode, "counts": counts, "summary": summary_of(counts)}
        if proc.returncode != 0:
            groups[name]["tail"] = out[-3000:]
            failed = True
    return {"status": "fail" if failed else "ok", "groups": groups}


def pytest_counts(output: str) -> dict:
    """{"passed": n, "failed": n, ...} from pytest's last summary line."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def summary_of(counts: dict) -> str:
    return ", ".join(f"{n} {word}" for word, n in counts.items()) or "no summary"


def run_profile_step(ctx) -> dict:
    command = [shutil.which("coconut-fast")] if shutil.which("coconut-fast") else [sys.executable, "-m",
                                                                                 "coconut_fast"]
    if subprocess.run([*command, "profile-step", "--help"], capture_output=True, cwd=ROOT).returncode != 0:
        return {"status": "skipped", "reason": "coconut-fast profile-step is not available"}
    profiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 64):
            out = Path(tmp) / f"profile-{batch}.json"
            result = subprocess.run([*command, "profile-step", "--family", "gpt2", "--shape", "gpt2-124m", "--batch",
                                     str(batch), "--kernels", ctx["kernels"], "--context", str(PROMPT_LEN), "--json",
                                     str(out)], capture_output=True, text=True, cwd=ROOT,
                                    timeout=max(ctx["left"]() - 5, 1))
            if result.returncode != 0:
                return {"status": "error", "error": (result.stdout + result.stderr)[-2000:]}
            profiles.append({"batch": batch, **json.loads(out.read_text())})
    return {"status": "ok", "profiles": profiles}


def run_latent_step(ctx) -> dict:
    from gpu_bench import (SHAPES, Variant, build_model, graph_latent_step_seconds, latent_step_bytes,
                           random_prompts, record_loop_inputs)

    from coconut_fast.engine.cuda_graph import bucket_for

    cm = build_model(SHAPES["gpt2-124m"], torch.bfloat16, "cuda")
    rows = []
    for batch in (1, 64):
        prompts = random_prompts(cm, batch, PROMPT_LEN)
        variant = Variant.build("paged-graphs", cm, batch, PROMPT_LEN)
        loaded = record_loop_inputs(variant.engine)
        for _ in range(2):  # the first run captures, the second replays
            variant.run(prompts, NUM_THOUGHTS, 1)
        captured, replays = variant.graph_counts()
        key = max((k for k in loaded if k[1] == bucket_for(batch)), key=lambda k: k[2], default=None)
        if key is None or key not in variant.engine.runner.graphs.graphs:
            return {"status": "fail", "error": f"batch {batch}: no thought loop ran on a captured graph "
                                               f"({variant.engine.runner.graphs.eager_reason})"}
        seconds = graph_latent_step_seconds(variant.engine, key, loaded[key])
        floor = latent_step_bytes(cm, batch, PROMPT_LEN + NUM_THOUGHTS) / ctx["bandwidth"]()
        rows.append(dict(batch=batch, loop_steps=key[2], replay_ms=1e3 * seconds, floor_ms=1e3 * floor,
                         over_floor=seconds / floor, graphs=captured, replays=replays))
        release(variant)
    return {"status": "ok" if all(r["replays"] > 0 for r in rows) else "fail", "shape": "gpt2-124m", "dtype": "bf16",
            "kernels": ctx["kernels"], "context": PROMPT_LEN + NUM_THOUGHTS, "rows": rows}


def run_decode_attention(ctx) -> dict:
    from gpu_bench import decode_attention_bytes, decode_attention_call, decode_paths, device_seconds

    from coconut_fast.kernels import cuda_kernels_available

    batch, context, rows = 64, 4096, []
    for shape, (heads, kv_heads, head_dim) in {"gpt2": (12, 12, 64), "llama-8b": (32, 8, 128)}.items():
        for path, block_size, num_splits in decode_paths(cuda_kernels_available()):
            fn, capturable = decode_attention_call(path, batch, heads, kv_heads, head_dim, context, block_size,
                                                   num_splits, torch.bfloat16)
            seconds, method = device_seconds(fn, "cuda", launches=100, capture=capturable)
            moved = decode_attention_bytes(batch, context, heads, kv_heads, head_dim, 2)
            rows.append(dict(shape=shape, path=path, block_size=block_size, us=seconds * 1e6, method=method,
                             gb_per_s=moved / seconds / 1e9, of_copy=moved / seconds / ctx["bandwidth"]()))
            del fn
            torch.cuda.empty_cache()
    return {"status": "ok", "batch": batch, "context": context, "dtype": "bf16", "rows": rows}


def run_training(ctx) -> dict:
    ids = [f"benchmarks/test_bench_training.py::test_train_step[cuda-{p}-{s}-{path}]" for p, s, path in TRAINING_CASES]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "training.json"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", *ids, f"--benchmark-json={report}"], cwd=ROOT,
                                capture_output=True, text=True, timeout=max(ctx["left"]() - 5, 1))
        if not report.exists():
            return {"status": "error", "error": (result.stdout + result.stderr)[-2000:]}
        benchmarks = json.loads(report.read_text())["benchmarks"]
    rows = [dict(precision=b["params"]["precision"], stage=b["params"]["stage"], path=b["params"]["path"],
                 step_s=b["stats"]["mean"], samples_per_s=b["extra_info"]["samples_per_s"],
                 peak_memory_gb=b["extra_info"]["peak_memory_bytes"] / 1e9, loss=b["extra_info"]["loss"])
            for b in benchmarks]
    return {"status": "ok" if result.returncode == 0 else "fail", "shape": "gpt2-124m", "batch": 32, "rows": rows,
            **({} if result.returncode == 0 else {"tail": (result.stdout + result.stderr)[-2000:]})}


def run_prosqa(ctx) -> dict:
    if not PROSQA_TEST.exists():
        return {"status": "skipped", "reason": f"no ProsQA test set at {PROSQA_TEST}"}
    from gpu_bench import (SHAPES, Variant, answer_logit_gaps, build_model, compare_answers, prosqa_prompts,
                           split_latent_block, timed)

    os.environ["COCONUT_PROSQA_TEST"] = str(PROSQA_TEST)
    cm = build_model(SHAPES["gpt2-124m"], torch.float32, "cuda")
    prompts, source = prosqa_prompts(cm, PROSQA_COUNT, NUM_THOUGHTS)
    questions = split_latent_block(prompts, cm)
    answers, rates, replays = {}, {}, None
    for name in ("paged-graphs", "torch", "reference"):
        count = PROSQA_REFERENCE_COUNT if name == "reference" else len(questions)
        variant = Variant.build(name, cm, count, max(map(len, questions)))
        if name != "reference":
            variant.run(questions[:count], NUM_THOUGHTS, PROSQA_NEW_TOKENS)  # warm-up: every graph of the timed pass
        before = variant.graph_counts()
        out = []
        seconds = timed(lambda: out.append(variant.run(questions[:count], NUM_THOUGHTS, PROSQA_NEW_TOKENS)), "cuda")
        if name == "paged-graphs":
            replays = variant.graph_counts()[1] - before[1]
        answers[name], rates[name] = out[-1], count / seconds
        release(variant)
    n = PROSQA_REFERENCE_COUNT
    equal_torch = compare_answers(answers["paged-graphs"], answers["torch"],
                                  answer_logit_gaps(cm, prompts, answers["torch"]))
    equal_reference = compare_answers(answers["paged-graphs"][:n], answers["reference"],
                                      answer_logit_gaps(cm, prompts[:n], answers["reference"]))
    ok = equal_torch["equal"] and equal_reference["equal"] and replays
    return {"status": "ok" if ok else "fail", "source": source, "questions": len(questions), "dtype": "fp32",
            "reference_questions": n, "questions_per_s": rates, "graph_replays": replays,
            "engine_vs_torch": equal_torch, "engine_vs_reference": equal_reference}


SECTIONS = {"tests": run_tests, "profile_step": run_profile_step, "latent_step": run_latent_step,
            "decode_attention": run_decode_attention, "training": run_training, "prosqa": run_prosqa}


def release(variant) -> None:
    variant.engine = None
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- report
def summary_lines(result: dict, path: Path | None) -> list[str]:
    """One screen: a head line per section, indented detail lines under it."""
    lines = [f"coconut_fast GPU check on {result['device']}: {result['verdict']} in {result['seconds']:.0f} s "
             f"(torch {result['torch']}, triton {result['triton']}, commit {str(result['commit'])[:10]})",
             f"  {'build':<26}coconut_fast._C {result['extension']}"]
    for name, section in result["sections"].items():
        status, detail = section["status"], []
        head = f"  {name:<18}{status.upper():<8}"
        if status in ("skipped", "error") or "error" in section:
            head += str(section.get("reason") or section.get("error", "")).replace("\n", " ")[:150]
        elif name == "tests":
            head += "; ".join(f"{group}: {r['summary']}" for group, r in section["groups"].items())[:200]
            failed = [line for r in section["groups"].values() for line in r.get("tail", "").splitlines()
                      if line.startswith(("FAILED", "ERROR"))]
            detail = failed[:3] + ([f"... {len(failed) - 3} more"] if len(failed) > 3 else [])
        elif name == "profile_step":
            head += f"{len(section['profiles'])} profiles recorded (GPT-2 124M, batch 1 and 64)"
        elif name == "latent_step":
            head += f"replayed thought loop, {section['shape']} {section['dtype']}, {section['kernels']} kernels"
            detail = [f"batch {r['batch']}: {r['replay_ms']:.3f} ms per step, byte floor {r['floor_ms']:.3f} ms "
                      f"({r['over_floor']:.2f}x), {r['replays']} replays" for r in section["rows"]]
        elif name == "decode_attention":
            head += f"batch {section['batch']}, context {section['context']}, bf16"
            detail = [f"{shape}: " + ", ".join(f"{r['path']} {r['us']:.0f} us ({r['gb_per_s']:.0f} GB/s)"
                                               for r in section["rows"] if r["shape"] == shape)
                      for shape in dict.fromkeys(r["shape"] for r in section["rows"])]
        elif name.startswith("training"):
            head += f"{section['shape']}, batch {section['batch']}, samples/s"
            by_case = {}
            for r in section["rows"]:
                by_case.setdefault((r["precision"], r["stage"]), {})[r["path"]] = r["samples_per_s"]
            detail = [f"{precision} stage {stage}: " + ", ".join(f"{p} {v:.1f}" for p, v in paths.items())
                      + (f" ({paths['fast'] / paths['reference']:.1f}x)" if {"fast", "reference"} <= set(paths) else "")
                      for (precision, stage), paths in by_case.items()]
        elif name == "prosqa":
            rates = section["questions_per_s"]
            head += f"{section['questions']} questions, questions/s: " + ", ".join(
                f"{k} {v:.2f}" for k, v in rates.items())
            detail = [f"engine {rates['paged-graphs'] / rates['torch']:.1f}x the torch backend, "
                      f"{rates['paged-graphs'] / rates['reference']:.0f}x the reference"]
            for other in ("torch", "reference"):
                c = section[f"engine_vs_{other}"]
                detail.append(f"answers vs {other}: {'equal' if c['equal'] else 'DIFFER'} on {c['compared']}, "
                              f"{c['ignored_near_ties']} near-ties ignored, {len(c['mismatched'])} mismatched")
        lines += [head] + [f"{'':<28}{line}"[:200] for line in detail]
    if path is not None:
        lines.append(f"  {'results':<26}{path}")
    return lines


def verdict(sections: dict) -> str:
    return "FAIL" if any(s["status"] in ("fail", "error") for s in sections.values()) else "PASS"


def write_report(result: dict, directory: Path | None = None) -> Path:
    from gpu_bench import RESULTS_DIR, write_results

    records = [dict(section=name, **row) for name, section in result["sections"].items()
               for row in section.get("rows", [])]
    extra = {k: v for k, v in result.items() if k not in ("device", "commit", "torch", "triton")}
    return write_results(records, "cuda" if torch.cuda.is_available() else "cpu", directory or RESULTS_DIR,
                         extra=extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the whole check began")
    parser.add_argument("--deadline", type=float, default=None,
                        help="epoch seconds to finish by (default: 6 minutes after --started)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--preflight", action="store_true", help="only check for CUDA (exit 2 without it)")
    parser.add_argument("--build-status", default="not built by this run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda))
        return 2
    if args.preflight:
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_bench import copy_bandwidth, environment

    from coconut_fast.kernels import cuda_kernels_available

    start = args.started or time.time()
    deadline = args.deadline or start + BUDGET_S
    bandwidth = []

    def measured_bandwidth() -> float:  # once, when a section first needs it
        if not bandwidth:
            bandwidth.append(copy_bandwidth("cuda"))
        return bandwidth[0]

    ctx = {"left": lambda: deadline - time.time(), "kernels": "cuda" if cuda_kernels_available() else "triton",
           "bandwidth": measured_bandwidth}
    env = environment("cuda")
    result = {**env, "extension": "loaded" if cuda_kernels_available() else f"missing ({args.build_status})",
              "build": args.build_status, "kernels": ctx["kernels"], "sections": {}}
    for name in args.only:
        if ctx["left"]() < NEEDS_S[name]:
            result["sections"][name] = {"status": "skipped", "reason": f"{ctx['left']():.0f} s left of the budget, "
                                                                      f"needs about {NEEDS_S[name]} s"}
            continue
        began = time.time()
        try:
            result["sections"][name] = SECTIONS[name](ctx)
        except Exception as error:  # one section's failure must not hide the others' results
            result["sections"][name] = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        result["sections"][name]["seconds"] = round(time.time() - began, 1)
        print(f"gpu_check: {name} {result['sections'][name]['status']} ({time.time() - began:.0f} s)", flush=True)
    result["copy_bandwidth_gbs"] = bandwidth[0] / 1e9 if bandwidth else None
    result["seconds"], result["verdict"] = time.time() - start, verdict(result["sections"])
    path = write_report(result)
    print("\n".join(summary_lines(result, path)))
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
