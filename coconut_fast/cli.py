"""`coconut-fast` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import importlib
import os
import sys
from pathlib import Path

# Subcommands that live beside their code: each module has `add_arguments(parser)` and `run(args) -> int`.
MODULE_COMMANDS: dict[str, tuple[str, str]] = {}
MODULE_COMMANDS["train"] = ("coconut_fast.training.command", "train (or evaluate) Coconut from a YAML config")
MODULE_COMMANDS["analyze"] = ("coconut_fast.analysis.command", "what the continuous thoughts hold: logit lens, ProsQA frontiers")
MODULE_COMMANDS["profile-step"] = ("coconut_fast.profiling.command",
                                   "launches, bytes against the floor and host time of one engine step")


class CommandError(Exception):
    """A mistake in a command's arguments or files: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (what is wrong, and where the help is)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def writable_directory(path: str, option: str) -> None:
    """`path` is a directory, or can be made one, that this process can write."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CommandError(f"{option} {path}: exists and is not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"{option} {path}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: the directory is not writable")


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    writable_directory(args.out or DemoConfig.out, "--out")
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))
    return 0


def _generate(args) -> int:
    from .data.prosqa import generate_prosqa, write_json

    if Path(args.out).is_dir():
        raise CommandError(f"--out {args.out}: is a directory; give the JSON file to write")
    writable_directory(str(Path(args.out).parent), "--out")
    records = generate_prosqa(args.n, seed=args.seed, min_steps=args.min_steps, max_steps=args.max_steps,
                              wording=args.wording)
    write_json(records, args.out)
    print(f"wrote {len(records)} ProsQA-style records to {args.out}")
    return 0


def _stats(args) -> int:
    from .data.prosqa import prosqa_statistics
    from .data.records import load_records

    if not Path(args.path).is_file():
        raise CommandError(f"{args.path}: no such file")
    try:
        records = load_records(args.path)
    except (ValueError, UnicodeDecodeError) as e:
        raise CommandError(f"{args.path}: not a ProsQA-format JSON list of records ({e})") from None
    print(json.dumps(prosqa_statistics(records), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="coconut-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and evaluate a small Coconut model on generated ProsQA-style data")
    from .demo import DemoConfig

    for f in dataclasses.fields(DemoConfig):
        demo.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                          help=f"default {f.default}")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate-data", help="write a ProsQA-style dataset as official-format JSON")
    gen.add_argument("--n", type=positive_int, required=True, help="number of records")
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
    try:
        return args.func(args)
    except CommandError as e:
        print(f"coconut-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
