"""Record the step profiles of the engine (GPT-2 124M and Llama 1B shapes, batch 1 and 64) in one JSON.

    python benchmarks/step_profiles.py --out benchmarks/results/<machine>-<date>-step-profile.json

On a machine without CUDA the Triton kernels run under the interpreter (set here, before triton loads) and
the timed steps stub the model's compute out (see coconut_fast/profiling/step.py).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CASES = [("gpt2", "gpt2-124m", 1), ("gpt2", "gpt2-124m", 64), ("llama", "llama-1b", 1), ("llama", "llama-1b", 64)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kernels", default="triton", choices=("triton", "cuda", "torch"))
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--only", action="append", default=None, metavar="FAMILY:SHAPE:BATCH",
                        help="profile only these cases (repeatable); default: all four")
    parser.add_argument("--count-only", action="store_true",
                        help="count the Triton launches of the counted steps without running them (see profile_step)")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or f"{c[0]}:{c[1]}:{c[2]}" in args.only]
    import transformers
    import triton

    from coconut_fast.profiling import profile_step

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"machine": platform.node(), "processor": platform.processor(), "cores": os.cpu_count(),
              "commit": commit, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "transformers": transformers.__version__, "triton": triton.__version__,
              "note": "CPU: Triton kernels interpreted; host_us with the model's compute stubbed; the machine "
                      "was shared with other jobs, so host times are pessimistic", "profiles": []}
    for family, shape, batch in cases:
        start = time.perf_counter()
        result = profile_step(family, shape, batch, args.kernels, args.context, execute_kernels=not args.count_only)
        result["seconds"] = time.perf_counter() - start
        record["profiles"].append(result)
        print(f"{family} {shape} batch {batch}: latent {result['latent']['launches_per_layer']:.1f} launches/layer, "
              f"{result['latent']['bytes_over_floor']:.2f}x floor, host {result['latent']['host_us']:.0f} us; "
              f"decode {result['decode']['launches_per_layer']:.1f}/layer, {result['decode']['bytes_over_floor']:.2f}x, "
              f"host {result['decode']['host_us']:.0f} us ({result['seconds']:.0f} s)", flush=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
