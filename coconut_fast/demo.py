"""The main job on the embedded default: ProsQA-style data, the local tokenizer and a small Llama-family
model, all built on this machine, trained through the Coconut curriculum by the trainer (CoT stage, then latent
stages), evaluated with batched generation, the answer-time cost of both models measured, and the
fast training path timed against the reference.

"CoT" is the model at the end of stage 0 (it answers with the written steps), read back from its
checkpoint; "Coconut" is the same run at its last stage (the first steps replaced by continuous
thoughts). A stage whose held-out accuracy stays below `CONVERGED` did not learn the task: the demo
says so instead of comparing the stages.
"""
from __future__ import annotations

import csv
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import build_training_set, default_tokenizer, generate_prosqa, stage_for_epoch
from .data.curriculum import build_eval_example
from .data.prosqa import write_json
from .data.records import tokenize_record
from .engine.layers import select_kernels
from .model import CoconutModel
from .prompts import left_pad
from .reference import reference_forward
from .tiny import tiny_model
from .training.checkpoint import checkpoint_name
from .training.config import TrainConfig
from .training.evaluate import score_sample, up_to_eos
from .training.trainer import Trainer

# held-out accuracy a stage must reach to count as trained; the two-option questions give 50% by chance
CONVERGED = 0.90
ANSWER_BACKENDS = ("torch", "paged")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    train_records: int = 20000
    valid_records: int = 300
    # graph size of the generated questions: reasoning steps and nodes
    min_steps: int = 1
    max_steps: int = 1
    min_nodes: int = 4
    max_nodes: int = 4
    # how facts are written (data.prosqa.WORDINGS): "terse" ("Rex brompus.") is learned in minutes on a CPU
    wording: str = "terse"
    c_thought: int = 1
    max_latent_stage: int = 1
    # CoT and every latent stage but the last train epochs_per_stage epochs, the last stage last_stage_epochs;
    # num_epochs, when set, is the whole run instead (as the official num_epochs cuts the last stage short)
    epochs_per_stage: int = 8
    last_stage_epochs: int = 2
    num_epochs: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    lr_scheduler: str = "constant"
    warmup_steps: int = 100
    family: str = "llama"
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    seed: int = 0
    # torch.set_num_threads for the whole run; 0 keeps torch's default
    threads: int = 0
    timing_batches: int = 3
    timing_batch_size: int = 32
    # answer time: held-out questions generated as one batch by each model, timed answer_repeats times
    answer_questions: int = 100
    answer_repeats: int = 3
    # "parallel": train the thoughts by Jacobi iteration (exact when jacobi_iterations >= thoughts)
    latent_mode: str = "sequential"
    jacobi_iterations: int = 1


def total_epochs(cfg: DemoConfig) -> int:
    """Epochs of the whole curriculum: num_epochs, or full stages before the last and last_stage_epochs of it."""
    return cfg.num_epochs or cfg.max_latent_stage * cfg.epochs_per_stage + cfg.last_stage_epochs


def _check_config(cfg: DemoConfig) -> None:
    if cfg.max_latent_stage < 1:
        raise ValueError(f"max_latent_stage must be >= 1 (a latent stage to compare with CoT), "
                         f"got {cfg.max_latent_stage}")
    if cfg.epochs_per_stage < 1:
        raise ValueError(f"epochs_per_stage must be >= 1, got {cfg.epochs_per_stage}")
    if not cfg.num_epochs and not 1 <= cfg.last_stage_epochs <= cfg.epochs_per_stage:
        raise ValueError(f"last_stage_epochs must be in 1..epochs_per_stage ({cfg.epochs_per_stage}), so that no "
                         f"epoch goes past the last stage, got {cfg.last_stage_epochs}")
    before_last = cfg.max_latent_stage * cfg.epochs_per_stage
    if cfg.num_epochs and not before_last < cfg.num_epochs <= before_last + cfg.epochs_per_stage:
        raise ValueError(f"num_epochs ({cfg.num_epochs}) must exceed max_latent_stage x epochs_per_stage "
                         f"({cfg.max_latent_stage} x {cfg.epochs_per_stage}), so that the last latent stage is "
                         f"trained, and be at most {before_last + cfg.epochs_per_stage}, so that no epoch goes past it")
    for name in ("threads", "answer_questions"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.answer_repeats < 1:
        raise ValueError(f"answer_repeats must be >= 1, got {cfg.answer_repeats}")


def _time_training_steps(cm, batches, reference: bool, options: dict) -> tuple[float, list[float]]:
    """Seconds for forward+backward over `batches`, and each batch's loss; gradients are discarded.

    `options` are the trainer's forward options (latent mode) for the fast path."""
    losses, start = [], time.perf_counter()
    for b in batches:
        if reference:
            loss = reference_forward(cm.model, b["input_ids"], cm.latent_ids.latent, b["attention_mask"], b["labels"],
                                     b["position_ids"])[0]
        else:
            loss = cm(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"], **options).loss
        loss.backward()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    cm.zero_grad(set_to_none=True)
    return seconds, losses


def _time_answers(cm: CoconutModel, records: list[dict], stage: int, curriculum, backend: str, repeats: int,
                  max_new_tokens: int) -> dict:
    """Generate answers to `records` as one batch at `stage`: a warm-up, then `repeats` timed runs."""
    tok = cm.tokenizer
    prompts = [build_eval_example(tokenize_record(r, tok, i), stage, curriculum, cm.latent_ids)["input_ids"]
               for i, r in enumerate(records)]
    input_ids, mask = left_pad(prompts, tok.pad_token_id, cm.device)
    was_training = cm.training
    cm.eval()
    seconds = []
    with torch.no_grad():
        for run in range(repeats + 1):  # run 0 warms up (and builds the paged engine)
            start = time.perf_counter()
            sequences = cm.generate(input_ids, mask, max_new_tokens=max_new_tokens, backend=backend)
            if run:
                seconds.append(time.perf_counter() - start)
    cm.train(was_training)
    new = sequences[:, input_ids.shape[1]:].tolist()
    scored = [score_sample(tok, prompt, up_to_eos(row, tok.eos_token_id), record, i, cm.latent_ids.latent)
              for i, (prompt, row, record) in enumerate(zip(prompts, new, records))]
    return {"ms_per_question": 1000 * statistics.median(seconds) / len(records), "seconds": seconds,
            "generated_tokens": statistics.fmean(s["generated_tokens"] for s in scored),
            "accuracy": statistics.fmean(s["correct"] for s in scored)}


def answer_time(models: dict[str, tuple[CoconutModel, int]], records: list[dict], curriculum, repeats: int,
                max_new_tokens: int) -> dict:
    """Per backend and model (name -> (model, stage)): the time to answer the same questions."""
    out: dict = {"questions": len(records), "repeats": repeats, "max_new_tokens": max_new_tokens,
                 "paged_kernels": select_kernels("auto").name}
    for backend in ANSWER_BACKENDS:
        out[backend] = {name: _time_answers(cm, records, stage, curriculum, backend, repeats, max_new_tokens)
                        for name, (cm, stage) in models.items()}
    return out


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
    _check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    records = generate_prosqa(cfg.train_records + cfg.valid_records, seed=cfg.seed, min_steps=cfg.min_steps,
                              max_steps=cfg.max_steps, min_nodes=cfg.min_nodes, max_nodes=cfg.max_nodes,
                              wording=cfg.wording)
    train, valid = records[: cfg.train_records], records[cfg.train_records :]
    for name, part in (("train", train), ("valid", valid)):
        write_json(part, out / f"prosqa_{name}.json")
    tok = default_tokenizer()
    model = tiny_model(cfg.family, len(tok), seed=cfg.seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                       context=512)
    print(f"data: {len(train)} train / {len(valid)} held-out ProsQA-style questions ({cfg.min_steps}-{cfg.max_steps} "
          f"steps, {cfg.wording} wording, e.g. {valid[0]['question']!r}) in {out}; vocabulary {len(tok)}; "
          f"model: {cfg.family} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"torch threads {torch.get_num_threads()}")

    config = TrainConfig(
        save_path=str(out), name="train", coconut=True, c_thought=cfg.c_thought, epochs_per_stage=cfg.epochs_per_stage,
        max_latent_stage=cfg.max_latent_stage, pad_latent_to_max=True, model_id=f"tiny:{cfg.family}", seed=cfg.seed,
        batch_size_training=cfg.batch_size, num_epochs=total_epochs(cfg), lr=cfg.lr,
        weight_decay=0.01, lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, max_grad_norm=1.0,
        adam_betas=[0.9, 0.98], eval_batch_size=100, max_new_tokens=48, val_loss=False, save_only_improve=False,
        latent_mode=cfg.latent_mode, jacobi_iterations=cfg.jacobi_iterations if cfg.latent_mode == "parallel" else None,
    )
    trainer = Trainer(config, model=model, tokenizer=tok, train_records=train, val_records=valid)
    trainer.run()  # resumes an interrupted run in the same directory; a finished one is only reported
    cm = trainer.coconut
    t_train = time.perf_counter() - t_start

    cot_epoch, last_epoch = cfg.epochs_per_stage, config.num_epochs
    last_stage = stage_for_epoch(trainer.curriculum, last_epoch - 1)
    thoughts = last_stage * cfg.c_thought
    cot = {"epoch": cot_epoch, "stage": 0, **_eval_row(trainer.save_dir, cot_epoch)}
    coconut = {"epoch": last_epoch, "stage": last_stage, "thoughts": thoughts,
               **_eval_row(trainer.save_dir, last_epoch)}
    converged = {"cot": cot["accuracy"] >= CONVERGED, "coconut": coconut["accuracy"] >= CONVERGED}

    answers = None
    if all(converged.values()):  # speed only matters for models that answer right
        cot_model = CoconutModel.from_pretrained(trainer.save_dir / checkpoint_name(cot_epoch)).to(cm.device)
        answers = answer_time({"cot": (cot_model, 0), "coconut": (cm, last_stage)},
                              valid[: cfg.answer_questions or len(valid)], trainer.curriculum, cfg.answer_repeats,
                              config.generation_tokens)

    # fast path against the reference: the same training batches of the last stage, forward + backward
    examples = build_training_set(trainer.train_tok, config.num_epochs - 1, trainer.curriculum, cm.latent_ids,
                                  random.Random(cfg.seed))
    size, n = min(cfg.timing_batch_size, len(examples)), len(examples)
    batches = [trainer.collate([examples[(i * size + j) % n] for j in range(size)]) for i in range(cfg.timing_batches)]
    cm.train()
    options = trainer.forward_options
    _time_training_steps(cm, batches[:1], False, options)  # warm-up
    fast_s, fast_losses = _time_training_steps(cm, batches, False, options)
    ref_s, ref_losses = _time_training_steps(cm, batches, True, options)
    cm.eval()
    cm.save_pretrained(out / "model")

    results = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "epochs": _epoch_rows(trainer.save_dir),
        "cot": cot,
        "coconut": coconut,
        "converged": converged,
        "answer_time": answers,
        "timing": {"stage": last_stage, "latent_mode": options.get("latent_mode", "sequential"),
                   "batch_size": size, "batches": cfg.timing_batches,
                   "fast_s": fast_s, "reference_s": ref_s, "fast_losses": fast_losses,
                   "reference_losses": ref_losses},
        "train_seconds": t_train,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _print_summary(results, out)
    return results


def not_converged_message(results: dict) -> str:
    """What to tell the user when a stage stayed below CONVERGED held-out accuracy ('' when none did)."""
    lines = []
    for key, name in (("cot", "CoT"), ("coconut", "Coconut")):
        row = results[key]
        if not results["converged"][key]:
            lines.append(f"{name} (stage {row['stage']}) did not converge: {row['accuracy']:.1%} held-out accuracy "
                         f"after epoch {row['epoch']}, below {CONVERGED:.0%} (chance is 50%).")
    if not lines:
        return ""
    return "\n".join(lines + [
        "The stages are not compared: a model that has not learned the task says nothing about the thoughts.",
        "Try more epochs (--epochs-per-stage, --last-stage-epochs) or data (--train-records), another --seed, "
        "or a larger --lr."])


def _print_summary(results: dict, out: Path) -> None:
    print(f"\n{'epoch':>5} {'stage':>5} {'train loss':>10} {'accuracy':>8} {'gen tokens':>10}")
    for r in results["epochs"]:  # rows of eval_log.csv: train_loss may be empty there
        loss = f"{r['train_loss']:>10.4f}" if r["train_loss"] is not None else f"{'-':>10}"
        print(f"{r['epoch']:>5} {r['stage']:>5} {loss} {r['accuracy']:>8.1%} {r['generated_tokens']:>10.1f}")
    cot, coconut, t = results["cot"], results["coconut"], results["timing"]
    print(f"\nheld-out questions: {coconut['num_samples']} (two options each: chance is 50%)")
    message = not_converged_message(results)
    if message:
        print(message)
    else:
        _print_comparison(cot, coconut, results["answer_time"])
    # absolute: a trained model's losses are near 0, where float32 rounding is a large fraction of them
    diff = max(abs(a - b) for a, b in zip(t["fast_losses"], t["reference_losses"]))
    mean = statistics.fmean(t["reference_losses"])
    mode = f" ({t['latent_mode']} thoughts)" if t["latent_mode"] != "sequential" else ""
    print(f"\ntraining forward+backward, stage {t['stage']}{mode}, {t['batches']} batches of {t['batch_size']}: "
          f"fast {t['fast_s']:.2f}s, reference {t['reference_s']:.2f}s ({t['reference_s'] / t['fast_s']:.1f}x); "
          f"losses (mean {mean:.1e}) agree within {diff:.1e}")
    threads = results["threads"]
    print(f"{threads} thread{'s' * (threads != 1)}; trained in {results['train_seconds']:.0f}s, total "
          f"{results['total_seconds']:.0f}s; model in {out / 'model'}, checkpoints and eval JSON in {out / 'train'}, "
          f"results in {out / 'results.json'}")


def _print_comparison(cot: dict, coconut: dict, answers: dict) -> None:
    label = f"Coconut (stage {coconut['stage']}, {coconut['thoughts']} thought{'s' * (coconut['thoughts'] != 1)})"
    print(f"{'':<34} {'accuracy':>8} {'generated tokens':>17}")
    print(f"{'CoT (stage 0, written steps)':<34} {cot['accuracy']:>8.1%} {cot['generated_tokens']:>17.1f}")
    print(f"{label:<34} {coconut['accuracy']:>8.1%} {coconut['generated_tokens']:>17.1f}")
    for s in coconut["samples"][:1]:
        print(f"  e.g. ...{s['text'].splitlines()[0][-60:]!r}\n       generated {s['generated'].strip()!r}, "
              f"expected {s['answer']!r}")
    print(f"\nanswer time: {answers['questions']} held-out questions as one batch, greedy, median of "
          f"{answers['repeats']} runs after a warm-up")
    print(f"{'backend':<8} {'CoT ms/question':>16} {'Coconut ms/question':>20} {'CoT / Coconut':>14}")
    for backend in ANSWER_BACKENDS:
        a, b = answers[backend]["cot"]["ms_per_question"], answers[backend]["coconut"]["ms_per_question"]
        print(f"{backend:<8} {a:>16.2f} {b:>20.2f} {a / b:>13.2f}x")
    print(f"(torch: the HF model with one KV cache; paged: the paged engine, built for GPUs, here with its "
          f"{answers['paged_kernels']} kernels)")
