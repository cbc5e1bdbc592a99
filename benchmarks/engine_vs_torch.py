"""The paged engine against the torch backend on small, host-bound models, in one run: `generate(backend=...)` of
the same batch, 6 thoughts and 32 new tokens (no EOS, so every row writes all of them), timed alternately.

    python benchmarks/engine_vs_torch.py [--threads 1] [--repeats 3] [--out FILE.json]

Models: GPT-2 and Llama with one layer of width 32 (the step is host work), and the demo's Llama (3 layers, width
64); batches 16, 64 and 256 (the demo model at its 100 held-out questions). Writes
benchmarks/results/<machine>-<date>-engine-vs-torch.json (or --out) with the median seconds of each backend and
their ratio.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coconut_fast import CoconutModel  # noqa: E402
from coconut_fast.data import default_tokenizer, generate_prosqa  # noqa: E402
from coconut_fast.generation import engine_for  # noqa: E402
from coconut_fast.prompts import left_pad  # noqa: E402
from coconut_fast.tiny import tiny_model  # noqa: E402

THOUGHTS, NEW_TOKENS, PROMPT_TOKENS = 6, 32, 16
CASES = [("gpt2-1x32", "gpt2", dict(hidden=32, layers=1, heads=4), (16, 64, 256)),
         ("llama-1x32", "llama", dict(hidden=32, layers=1, heads=4), (16, 64, 256)),
         ("demo-llama-3x64", "llama", dict(hidden=64, layers=3, heads=4), (100,))]


def build(family: str, size: dict) -> CoconutModel:
    tokenizer = default_tokenizer(generate_prosqa(64, seed=1, min_steps=1, max_steps=1, min_nodes=4, max_nodes=4,
                                                  wording="terse"))
    model = tiny_model(family, len(tokenizer), seed=0, context=512, **size)
    return CoconutModel.from_pretrained(model, tokenizer=tokenizer)


def prompts(cm: CoconutModel, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    vocab = len(cm.tokenizer) - 3  # not the latent tokens
    rows = [torch.randint(0, vocab, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(batch)]
    return left_pad(rows, cm.tokenizer.pad_token_id)


def seconds(cm, ids, mask, backend: str) -> float:
    start = time.perf_counter()
    out = cm.generate(ids, mask, num_thoughts=THOUGHTS, max_new_tokens=NEW_TOKENS, eos_token_id=[], backend=backend)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + THOUGHTS + 2 + NEW_TOKENS
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--label", default="", help="appended to the default file name (before / after)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, family, size, batches in CASES:
        cm = build(family, size)
        for batch in batches:
            ids, mask = prompts(cm, batch)
            cm.paged_engine = None
            engine_for(cm)  # default options, sized by the first call
            for backend in ("torch", "paged"):  # warm-up: engine built, caches sized
                seconds(cm, ids, mask, backend)
            times = {"torch": [], "paged": []}
            for _ in range(args.repeats):
                for backend in ("torch", "paged"):
                    times[backend].append(seconds(cm, ids, mask, backend))
            row = {"model": name, "batch": batch, **{f"{b}_s": statistics.median(t) for b, t in times.items()},
                   "all_s": times, "kernels": engine_for(cm).runner.kernels.name}
            row["paged_over_torch"] = row["paged_s"] / row["torch_s"]
            rows.append(row)
            print(f"{name:>16} batch {batch:>3}: torch {row['torch_s']:.3f} s, paged {row['paged_s']:.3f} s, "
                  f"paged/torch {row['paged_over_torch']:.2f}", flush=True)
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"cpu-{torch.get_num_threads()}thread-{date}-engine-vs-torch{'-' + args.label if args.label else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date, "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "thoughts": THOUGHTS, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS,
                               "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
