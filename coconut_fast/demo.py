"""The main job on the embedded default: ProsQA-style data, the local tokenizer and a small GPT-2, all
built on this machine, trained through the Coconut curriculum by the trainer (CoT stage, then latent
stages), evaluated with batched generation, and the fast training path timed against the reference.

"CoT" is the model at the end of stage 0 (it answers with the written steps); "Coconut" is the same
run at its last stage (the first steps replaced by continuous thoughts).
"""
from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import build_training_set, default_tokenizer, generate_prosqa, stage_for_epoch
from .data.prosqa import write_json
from .reference import reference_forward
from .tiny import tiny_model
from .training.config import TrainConfig
from .training.trainer import Trainer


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    train_records: int = 80000
    valid_records: int = 300
    # graph size of the generated questions: reasoning steps and nodes
    min_steps: int = 1
    max_steps: int = 1
    min_nodes: int = 4
    max_nodes: int = 4
    c_thought: int = 1
    max_latent_stage: int = 1
    epochs_per_stage: int = 1
    # 0: every stage trains epochs_per_stage epochs; fewer cut the last stage short (as the official num_epochs does)
    num_epochs: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 200
    family: str = "gpt2"
    hidden: int = 64
    layers: int = 3
    heads: int = 2
    seed: int = 0
    timing_batches: int = 3
    timing_batch_size: int = 32
    # "parallel": train the thoughts by Jacobi iteration (exact when jacobi_iterations >= thoughts)
    latent_mode: str = "sequential"
    jacobi_iterations: int = 1


def _time_training_steps(cm, batches, reference: bool) -> tuple[float, list[float]]:
    """Seconds for forward+backward over `batches`, and each batch's loss; gradients are discarded."""
    losses, start = [], time.perf_counter()
    for b in batches:
        if reference:
            loss = reference_forward(cm.model, b["input_ids"], cm.latent_ids.latent, b["attention_mask"], b["labels"],
                                     b["position_ids"])[0]
        else:
            loss = cm(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"]).loss
        loss.backward()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    cm.zero_grad(set_to_none=True)
    return seconds, losses


def _eval_row(save_dir: Path, epoch: int) -> dict:
    report = json.loads((save_dir / "eval" / f"epoch_{epoch}.json").read_text())
    return {k: report[k] for k in ("accuracy", "cot_match", "generated_tokens", "num_samples")} | {
        "samples": report["samples"][:2]}


def _epoch_rows(save_dir: Path) -> list[dict]:
    """Per-epoch metrics from the trainer's eval_log.csv (also the epochs of a run resumed here)."""
    with open(save_dir / "eval_log.csv", newline="") as f:
        last = {int(r["epoch"]): r for r in csv.DictReader(f)}  # a repeated epoch: its newest row
    return [{"epoch": e, "stage": int(r["stage"]), "train_loss": float(r["train_loss"]) if r["train_loss"] else None,
             "accuracy": float(r["accuracy"]), "cot_match": float(r["cot_match"]),
             "generated_tokens": float(r["generated_tokens"])} for e, r in sorted(last.items())]


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict:
    if cfg.num_epochs and cfg.num_epochs <= cfg.epochs_per_stage:
        raise ValueError(f"num_epochs ({cfg.num_epochs}) must exceed epochs_per_stage ({cfg.epochs_per_stage}) "
                         "so that a latent stage is trained")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    records = generate_prosqa(cfg.train_records + cfg.valid_records, seed=cfg.seed, min_steps=cfg.min_steps,
                              max_steps=cfg.max_steps, min_nodes=cfg.min_nodes, max_nodes=cfg.max_nodes)
    train, valid = records[: cfg.train_records], records[cfg.train_records :]
    for name, part in (("train", train), ("valid", valid)):
        write_json(part, out / f"prosqa_{name}.json")
    tok = default_tokenizer()
    model = tiny_model(cfg.family, len(tok), seed=cfg.seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                       context=512)
    print(f"data: {len(train)} train / {len(valid)} held-out ProsQA-style questions ({cfg.min_steps}-{cfg.max_steps} "
          f"steps) in {out}; vocabulary {len(tok)}; model: {cfg.family} "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    stages = cfg.max_latent_stage + 1
    config = TrainConfig(
        save_path=str(out), name="train", coconut=True, c_thought=cfg.c_thought, epochs_per_stage=cfg.epochs_per_stage,
        max_latent_stage=cfg.max_latent_stage, pad_latent_to_max=True, model_id=f"tiny:{cfg.family}", seed=cfg.seed,
        batch_size_training=cfg.batch_size, num_epochs=cfg.num_epochs or stages * cfg.epochs_per_stage, lr=cfg.lr, weight_decay=0.01,
        lr_scheduler="cosine", warmup_steps=cfg.warmup_steps, max_grad_norm=1.0, adam_betas=[0.9, 0.98],
        eval_batch_size=64, max_new_tokens=48, val_loss=False, save_only_improve=False,
        latent_mode=cfg.latent_mode, jacobi_iterations=cfg.jacobi_iterations if cfg.latent_mode == "parallel" else None,
    )
    trainer = Trainer(config, model=model, tokenizer=tok, train_records=train, val_records=valid)
    trainer.run()  # resumes an interrupted run in the same directory; a finished one is only reported
    cm = trainer.coconut
    t_train = time.perf_counter() - t_start

    # fast path against the reference: the same training batches of the last stage, forward + backward
    last_stage = stage_for_epoch(trainer.curriculum, config.num_epochs - 1)
    examples = build_training_set(trainer.train_tok, config.num_epochs - 1, trainer.curriculum, cm.latent_ids,
                                  random.Random(cfg.seed))
    size, n = min(cfg.timing_batch_size, len(examples)), len(examples)
    batches = [trainer.collate([examples[(i * size + j) % n] for j in range(size)]) for i in range(cfg.timing_batches)]
    cm.train()
    _time_training_steps(cm, batches[:1], reference=False)  # warm-up
    fast_s, fast_losses = _time_training_steps(cm, batches, reference=False)
    ref_s, ref_losses = _time_training_steps(cm, batches, reference=True)
    cm.eval()
    cm.save_pretrained(out / "model")

    cot_epoch, last_epoch = cfg.epochs_per_stage, config.num_epochs
    results = {
        "config": asdict(cfg),
        "epochs": _epoch_rows(trainer.save_dir),
        "cot": {"epoch": cot_epoch, "stage": 0, **_eval_row(trainer.save_dir, cot_epoch)},
        "coconut": {"epoch": last_epoch, "stage": last_stage, "thoughts": last_stage * cfg.c_thought,
                    **_eval_row(trainer.save_dir, last_epoch)},
        "timing": {"stage": last_stage, "batch_size": size, "batches": cfg.timing_batches,
                   "fast_s": fast_s, "reference_s": ref_s, "fast_losses": fast_losses,
                   "reference_losses": ref_losses},
        "train_seconds": t_train,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _print_summary(results, out)
    return results


def _print_summary(results: dict, out: Path) -> None:
    print(f"\n{'epoch':>5} {'stage':>5} {'train loss':>10} {'accuracy':>8} {'gen tokens':>10}")
    for r in results["epochs"]:  # rows of eval_log.csv: train_loss may be empty there
        loss = f"{r['train_loss']:>10.4f}" if r["train_loss"] is not None else f"{'-':>10}"
        print(f"{r['epoch']:>5} {r['stage']:>5} {loss} {r['accuracy']:>8.1%} {r['generated_tokens']:>10.1f}")
    cot, coconut, t = results["cot"], results["coconut"], results["timing"]
    n = coconut["num_samples"]
    print(f"\nheld-out questions: {n} (two options each: chance is 50%)")
    print(f"{'':<34} {'accuracy':>8} {'generated tokens':>17}")
    print(f"{'CoT (stage 0, written steps)':<34} {cot['accuracy']:>8.1%} {cot['generated_tokens']:>17.1f}")
    label = f"Coconut (stage {coconut['stage']}, {coconut['thoughts']} thought{'s' * (coconut['thoughts'] != 1)})"
    print(f"{label:<34} {coconut['accuracy']:>8.1%} {coconut['generated_tokens']:>17.1f}")
    for s in coconut["samples"][:1]:
        print(f"  e.g. ...{s['text'].splitlines()[0][-60:]!r}\n       generated {s['generated'].strip()!r}, "
              f"expected {s['answer']!r}")
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(t["fast_losses"], t["reference_losses"]))
    print(f"\ntraining forward+backward, stage {t['stage']}, {t['batches']} batches of {t['batch_size']}: "
          f"fast {t['fast_s']:.2f}s, reference {t['reference_s']:.2f}s ({t['reference_s'] / t['fast_s']:.1f}x); "
          f"losses agree to {diff:.1e} relative")
    print(f"trained in {results['train_seconds']:.0f}s, total {results['total_seconds']:.0f}s; model in {out / 'model'}, "
          f"checkpoints and eval JSON in {out / 'train'}, results in {out / 'results.json'}")
