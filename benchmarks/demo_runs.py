"""Run `coconut-fast demo` for each seed and torch thread count, one run at a time, and record them in one JSON.

    python benchmarks/demo_runs.py --out benchmarks/results/<machine>-<date>-demo-runs.json

Each run is a fresh process with the README's command plus `--seed S --threads T`; its wall time covers
everything (imports, data, tokenizer, training, evaluation, answer timing). Run it alone on the machine:
other jobs move wall times several-fold.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def summarize(results: dict, seed: int, threads: int, wall: float) -> dict:
    """The numbers a reader compares: accuracy and generated tokens per stage, answer time, wall time."""
    run = {"seed": seed, "threads": threads, "wall_seconds": wall, "total_seconds": results["total_seconds"],
           "train_seconds": results["train_seconds"], "converged": results["converged"]}
    for key in ("cot", "coconut"):
        row = results[key]
        run[key] = {k: row[k] for k in ("stage", "epoch", "accuracy", "generated_tokens", "num_samples")}
    answers = results["answer_time"]
    if answers:
        run["answer_ms_per_question"] = {backend: {name: answers[backend][name]["ms_per_question"]
                                                   for name in ("cot", "coconut")} for backend in ("torch", "paged")}
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--work", default="runs/demo-runs", help="where the runs write their directories")
    args = parser.parse_args()
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"machine": platform.node(), "processor": platform.processor(), "cores": os.cpu_count(),
              "commit": commit, "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "command": "coconut-fast demo --seed S --threads T", "runs": []}
    for seed in map(int, args.seeds.split(",")):
        for threads in map(int, args.threads.split(",")):
            out = Path(args.work) / f"seed{seed}-threads{threads}"
            if out.exists():
                raise SystemExit(f"{out} exists: the demo would resume it; remove it or pass another --work")
            cmd = [sys.executable, "-m", "coconut_fast", "demo", "--out", str(out), "--seed", str(seed),
                   "--threads", str(threads)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            run = summarize(json.loads((out / "results.json").read_text()), seed, threads, wall)
            record["runs"].append(run)
            print(f"seed {seed} threads {threads}: CoT {run['cot']['accuracy']:.1%}, Coconut "
                  f"{run['coconut']['accuracy']:.1%}, {wall:.0f} s", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=2))
    runs = record["runs"]
    for key in ("cot", "coconut"):
        acc = [r[key]["accuracy"] for r in runs]
        print(f"{key}: accuracy {min(acc):.1%} .. {max(acc):.1%}")
    walls = [r["wall_seconds"] for r in runs]
    print(f"wall time {min(walls):.0f} .. {max(walls):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
