"""`coconut-fast train CONFIG.yaml`: the training subcommand (also under torchrun)."""
from __future__ import annotations

import os
import sys

import yaml

from .config import TrainConfig


def add_arguments(parser) -> None:
    parser.add_argument("config", help="training YAML (the official Coconut keys and ours)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (value read as YAML); repeatable")


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    config = TrainConfig.from_yaml(path)
    if not overrides:
        return config
    values = config.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(value)
    return TrainConfig.from_dict(values)


def run(args) -> int:
    import torch.distributed as dist

    from .config import TrainingDataError
    from .run_lock import RunLockedError
    from .trainer import train

    try:
        config = load_config(args.config, args.overrides)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"coconut-fast train: error: {e}", file=sys.stderr)
        return 2
    try:
        results = train(config)
    except (TrainingDataError, RunLockedError) as e:  # what the user must change, said in one line
        print(f"coconut-fast train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0 and results["epochs"]:
        last = results["epochs"][-1]
        shown = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        print("last epoch:", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    return 0


__all__ = ["add_arguments", "run", "load_config"]
