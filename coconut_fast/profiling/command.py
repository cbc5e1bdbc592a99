"""`coconut-fast profile-step`: one latent and one decode step of a random-weight model, profiled."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=("gpt2", "llama"), required=True)
    parser.add_argument("--shape", choices=("tiny", "gpt2-124m", "llama-1b"), required=True)
    parser.add_argument("--batch", type=int, default=1, help="requests in lockstep (default 1)")
    parser.add_argument("--kernels", choices=("triton", "cuda", "torch"), default="triton",
                        help="the engine's kernels; on CPU Triton runs under TRITON_INTERPRET=1 (default triton)")
    parser.add_argument("--context", type=int, default=64, help="prompt tokens per request (default 64)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--count-only", action="store_true",
                        help="count the Triton launches of the counted steps without running them (same counts and "
                             "bytes: they read only launch arguments; for big shapes under the interpreter)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the profile here")


def run(args) -> int:
    import torch

    if args.kernels == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # triton fixes interpreted or compiled when it first loads: start again with the interpreter on
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "coconut_fast", "profile-step", *args.argv], env)
    from .step import profile_step

    dtype = getattr(torch, args.dtype) if args.dtype else None
    result = profile_step(args.family, args.shape, args.batch, args.kernels, args.context, dtype,
                          execute_kernels=not args.count_only)
    for key in ("latent", "decode"):
        r = result[key]
        print(f"{key:>6}: {r['launches']} launches ({r['launches_per_layer']:.1f} per layer), "
              f"kernel bytes {r['kernel_bytes'] / 1e6:.2f} MB = {r['bytes_over_floor']:.2f}x the floor "
              f"{r['floor_bytes'] / 1e6:.2f} MB, host {r['host_us']:.0f} us per step")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json_path}")
    return 0
