"""A small CPU run of the learned switch: a tiny GPT-2 trained with a switch head on generated ProsQA-style
data (3-6 steps), evaluated with the fixed thought count and with the learned switch; writes one JSON.

    python benchmarks/switch_head_run.py --out benchmarks/results/cpu-switch-head.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from coconut_fast.data import generate_prosqa
from coconut_fast.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    records = generate_prosqa(args.train + args.val, seed=0, min_steps=3, max_steps=6)
    with tempfile.TemporaryDirectory() as tmp:
        # no pad_latent_to_max: at the last stage a question gets one thought per reasoning step (3-6), so the
        # switch has a question-dependent count to learn
        config = TrainConfig.from_dict(dict(
            save_path=tmp, name="switch", coconut=True, c_thought=1, epochs_per_stage=1, max_latent_stage=6,
            pad_latent_to_max=False, uniform_prob=0.0, model_id="tiny:gpt2",
            tiny_size={"hidden": 64, "layers": 2, "heads": 4, "context": 512}, batch_size_training=16,
            num_epochs=args.epochs, lr=1e-3, eval_batch_size=16, max_new_tokens=24, seed=0,
            eval_every_epochs=args.epochs, val_loss=False, switch_head="linear", switch_loss_weight=1.0,
            progress_bars=False, save_only_improve=True))
        t0 = time.perf_counter()
        result = train(config, train_records=records[: args.train], val_records=records[args.train :])
        seconds = time.perf_counter() - t0
    last = result["epochs"][-1]
    steps = [len(r["steps"]) for r in records[args.train :]]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)",
        "torch": torch.__version__, "seconds": round(seconds, 1),
        "data": {"generator": "generate_prosqa(min_steps=3, max_steps=6, seed=0)", "train": args.train,
                 "val": args.val, "val_mean_steps": sum(steps) / len(steps)},
        "model": "tiny:gpt2 hidden 64, 2 layers, 4 heads; linear switch head, switch_loss_weight 1.0",
        "schedule": f"coconut, c_thought 1, max_latent_stage 6, {args.epochs} epochs (1 per stage), lr 1e-3",
        "final_stage": last["stage"],
        "fixed": {"accuracy": last["accuracy"], "mean_thoughts": last["mean_thoughts"]},
        "learned_switch": {"accuracy": last["switch_accuracy"], "mean_thoughts": last["switch_mean_thoughts"],
                           "threshold": 0.5, "max_thoughts": 6},
        "last_step_loss": result["step_losses"][-1],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
