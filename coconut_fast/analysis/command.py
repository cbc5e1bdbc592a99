"""`coconut-fast analyze --model DIR --data FILE.json`: what a trained model's thoughts hold."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a CoconutModel.save_pretrained directory")
    parser.add_argument("--data", required=True, help="records in the official JSON format (ProsQA for the graph analysis)")
    parser.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")
    parser.add_argument("--num-thoughts", type=int, default=6, help="continuous thoughts per question (default 6)")
    parser.add_argument("--top-k", type=int, default=5, help="tokens shown per thought by the logit lens (default 5)")
    parser.add_argument("--max-records", type=int, default=None, help="analyze only the first N records")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-step-tokens", type=int, default=48,
                        help="token budget of the language step read after k thoughts (default 48)")
    parser.add_argument("--switch", action=argparse.BooleanOptionalAction, default=True,
                        help="decode the next language step after k = 0..N thoughts (default on)")
    parser.add_argument("--switch-threshold", type=float, default=0.5,
                        help="with a switch head in the model: p(switch) that ends the thoughts, for the fixed vs "
                             "learned comparison (default 0.5)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="answer budget of the fixed vs learned switch comparison (default 64)")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="write PNG plots (needs matplotlib; default on)")
    parser.add_argument("--max-heatmaps", type=int, default=10, help="per-question heat maps to draw (default 10)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _load(args):
    import torch

    from ..data.records import load_records
    from ..model import CoconutModel

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: not a CoconutModel.save_pretrained directory (no config.json)")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    if args.max_records is not None and args.max_records < 1:
        raise ValueError(f"--max-records must be >= 1, got {args.max_records}")
    if args.max_heatmaps < 0:
        raise ValueError(f"--max-heatmaps must be >= 0, got {args.max_heatmaps}")
    records = load_records(args.data)[: args.max_records]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CoconutModel.from_pretrained(model_dir)
    model.model.to(device).eval()
    return model, records


def run(args) -> int:
    from .analyze import analyze
    from .report import summary_lines, write_report
    from .switch import fixed_vs_learned

    try:
        if args.plots:
            from .plots import require_matplotlib

            require_matplotlib()  # before the analysis, not after it
        model, records = _load(args)
        report = analyze(model, records, num_thoughts=args.num_thoughts, top_k=args.top_k,
                         batch_size=args.batch_size, max_step_tokens=args.max_step_tokens,
                         switch=args.switch, progress=args.progress)
        if model.switch_head is not None:  # fixed padding against the learned switch, full answers
            report["learned_switch"] = fixed_vs_learned(model, records, args.num_thoughts, args.batch_size,
                                                        args.max_new_tokens, args.switch_threshold)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"coconut-fast analyze: error: {e}", file=sys.stderr)
        return 2
    report = {"model": str(args.model), "data": str(args.data), **report}
    print("\n".join(summary_lines(report)))
    print(f"wrote {write_report(report, args.out)}")
    if args.plots:
        from .plots import write_plots

        paths = write_plots(report, args.out, args.max_heatmaps)
        if paths:
            print(f"wrote {len(paths)} plots under {Path(args.out) / 'plots'}")
        else:
            print("no plots: the records have no ProsQA graph")
    return 0


__all__ = ["add_arguments", "run"]
