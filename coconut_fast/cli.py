"""`coconut-fast` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import importlib
import sys

# Subcommands that live beside their code: each module has `add_arguments(parser)` and `run(args) -> int`.
MODULE_COMMANDS: dict[str, tuple[str, str]] = {}
MODULE_COMMANDS["train"] = ("coconut_fast.training.command", "train (or evaluate) Coconut from a YAML config")
MODULE_COMMANDS["analyze"] = ("coconut_fast.analysis.command", "what the continuous thoughts hold: logit lens, ProsQA frontiers")
MODULE_COMMANDS["profile-step"] = ("coconut_fast.profiling.command",
                                   "launches, bytes against the floor and host time of one engine step")


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))
    return 0


def _generate(args) -> int:
    from .data.prosqa import generate_prosqa, write_json

    records = generate_prosqa(args.n, seed=args.seed, min_steps=args.min_steps, max_steps=args.max_steps,
                              wording=args.wording)
    write_json(records, args.out)
    print(f"wrote {len(records)} ProsQA-style records to {args.out}")
    return 0


def _stats(args) -> int:
    from .data.prosqa import prosqa_statistics
    from .data.records import load_records

    print(json.dumps(prosqa_statistics(load_records(args.path)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coconut-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and evaluate a small Coconut model on generated ProsQA-style data")
    from .demo import DemoConfig

    for f in dataclasses.fields(DemoConfig):
        demo.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                          help=f"default {f.default}")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate-data", help="write a ProsQA-style dataset as official-format JSON")
    gen.add_argument("--n", type=int, required=True, help="number of records")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--min-steps", type=int, default=3)
    gen.add_argument("--max-steps", type=int, default=6)
    gen.add_argument("--wording", choices=("prosqa", "terse"), default="prosqa",
                     help="facts as the official data writes them ('Rex is a brompus.') or tersely ('Rex brompus.')")
    gen.add_argument("--out", required=True, help="output JSON path")
    gen.set_defaults(func=_generate)

    stats = sub.add_parser("stats", help="statistics of a ProsQA-format JSON file")
    stats.add_argument("path")
    stats.set_defaults(func=_stats)

    for name, (module_name, help_text) in MODULE_COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])  # the subcommand's own arguments
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
