"""A first run on the embedded default: ProsQA-style data, the local tokenizer and a small GPT-2, all
built on this machine. Trains briefly through the curriculum (CoT, then latent stages), checks the
fast forward against the reference, and evaluates with batched Coconut generation.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .data import (
    CoconutCollator,
    CurriculumConfig,
    answer_matches,
    build_eval_example,
    build_training_example,
    default_tokenizer,
    generate_prosqa,
    stage_for_epoch,
    tokenize_record,
)
from .data.prosqa import write_json
from .generation import left_pad
from .model import CoconutModel
from .reference import reference_forward
from .tiny import tiny_model


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    train_records: int = 1000
    valid_records: int = 64
    max_latent_stage: int = 2
    epochs_per_stage: int = 2
    c_thought: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    seed: int = 0


def _batches(examples, batch_size, collate):
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size])


def evaluate(cm: CoconutModel, records, tokenized, stage, cfg: CurriculumConfig, batch_size=32):
    """Accuracy (official metric), mean generated tokens, and the generated texts at `stage`."""
    cm.model.eval()
    tok = cm.tokenizer
    correct, n_tokens, texts = 0, 0, []
    for i in range(0, len(records), batch_size):
        prompts = [build_eval_example(r, stage, cfg, cm.latent_ids)["input_ids"] for r in tokenized[i : i + batch_size]]
        out = cm.generate(*left_pad(prompts, tok.pad_token_id), max_new_tokens=64, return_dict_in_generate=True)
        for b, rec in enumerate(records[i : i + batch_size]):
            new = out.sequences[b, out.prompt_length :].tolist()
            new = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
            n_tokens += len(new)
            texts.append(tok.decode(new, skip_special_tokens=True))
            correct += answer_matches(tok.decode(prompts[b] + new, skip_special_tokens=True), rec["answer"])
    return correct / len(records), n_tokens / len(records), texts


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    records = generate_prosqa(cfg.train_records + cfg.valid_records, seed=cfg.seed)
    train, valid = records[: cfg.train_records], records[cfg.train_records :]
    for name, part in (("train", train), ("valid", valid)):
        write_json(part, out / f"prosqa_{name}.json")
    tok = default_tokenizer()
    model = tiny_model("gpt2", len(tok), seed=cfg.seed, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, context=1024)
    cm = CoconutModel.from_pretrained(model, tokenizer=tok)
    train_tok = [tokenize_record(r, tok, idx=i) for i, r in enumerate(train)]
    valid_tok = [tokenize_record(r, tok, idx=i) for i, r in enumerate(valid)]
    curriculum = CurriculumConfig(
        mode="coconut", c_thought=cfg.c_thought, epochs_per_stage=cfg.epochs_per_stage,
        max_latent_stage=cfg.max_latent_stage,
    )
    collate = CoconutCollator(tok.pad_token_id, cm.latent_ids.latent)
    print(f"data: {len(train)} train / {len(valid)} valid ProsQA-style records in {out}; vocabulary {len(tok)}; "
          f"model: GPT-2 {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    results = {"stages": []}
    num_epochs = (cfg.max_latent_stage + 1) * cfg.epochs_per_stage
    optimizer = torch.optim.AdamW(cm.parameters(), lr=cfg.lr)
    for epoch in range(num_epochs):
        stage = stage_for_epoch(curriculum, epoch)
        order = list(range(len(train_tok)))
        rng.shuffle(order)
        examples = [build_training_example(train_tok[i], stage, curriculum, cm.latent_ids, rng) for i in order]
        cm.model.train()
        losses = []
        bar = tqdm(list(_batches(examples, cfg.batch_size, collate)), desc=f"epoch {epoch + 1}/{num_epochs} stage {stage}")
        for batch in bar:
            loss = cm(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc, gen, texts = evaluate(cm, valid, valid_tok, stage, curriculum)
        results["stages"].append({"epoch": epoch + 1, "stage": stage, "train_loss": sum(losses) / len(losses), "accuracy": acc, "generated_tokens": gen})

    # fast path against the reference on one latent batch of the last stage
    cm.model.eval()
    batch = collate(examples[: cfg.batch_size])
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
    t0 = time.perf_counter()
    fast = cm(*args).loss
    fast.backward()
    t1 = time.perf_counter()
    cm.zero_grad()
    ref, _, _ = reference_forward(cm.model, batch["input_ids"], cm.latent_ids.latent, *args[1:])
    ref.backward()
    t2 = time.perf_counter()
    cm.zero_grad()
    results["parity"] = {"fast_loss": fast.item(), "reference_loss": ref.item(),
                         "fast_s": t1 - t0, "reference_s": t2 - t1}
    cm.save_pretrained(out / "model")
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\n{'epoch':>5} {'stage':>5} {'thoughts':>8} {'train loss':>10} {'accuracy':>8} {'gen tokens':>10}")
    for r in results["stages"]:
        print(f"{r['epoch']:>5} {r['stage']:>5} {r['stage'] * cfg.c_thought:>8} {r['train_loss']:>10.3f} "
              f"{r['accuracy']:>8.2%} {r['generated_tokens']:>10.1f}")
    print(f"\nlast stage, {stage * cfg.c_thought} thoughts per question; two validation questions:")
    for rec, text in list(zip(valid, texts))[:2]:
        print(f"  ...{rec['question'][-40:]!r}\n    generated {text.strip()!r}\n    expected  {rec['answer']!r}")
    p = results["parity"]
    print(f"\nforward+backward on {cfg.batch_size} sequences at stage {stage}: fast {p['fast_s']:.2f}s, "
          f"reference {p['reference_s']:.2f}s; loss {p['fast_loss']:.6f} vs {p['reference_loss']:.6f}")
    print(f"model saved to {out / 'model'}; results in {out / 'results.json'}")
    return results
