"""The Coconut training loop: curriculum stage per epoch, AdamW, gradient accumulation, bf16,
DDP / FSDP2, evaluation every epoch, atomic checkpoints and exact resume.

`train(config)` runs what a YAML describes; `train(config, model=..., tokenizer=...,
train_records=..., val_records=...)` runs on objects already in memory.
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..data.collator import CoconutCollator
from ..data.curriculum import build_training_example, build_training_set, icot_scheduled_removal, stage_for_epoch
from ..data.records import check_tokenization, load_records, tokenize_record
from ..io import write_text_atomic
from ..model import OFFICIAL_PREFIX, CoconutModel
from ..switch_head import SWITCH_HEAD_FILE, check_kind
from . import checkpoint as ckpt
from .config import TrainConfig, TrainingDataError
from .distributed import (
    DistContext,
    all_reduce,
    barrier,
    equalize_latent_passes,
    init_distributed,
    is_fsdp,
    no_gradient_sync,
    shard_batches,
    wrap_model,
)
from .evaluate import evaluate_generation, evaluate_loss
from .run_lock import RunLock

logger = logging.getLogger(__name__)

TINY_DEFAULTS = {"hidden": 64, "layers": 2, "heads": 4, "context": 1024}
# official debug runs: at most this many training / validation records, and no checkpoints
DEBUG_TRAIN, DEBUG_VAL = 5000, 32
# loss: the LM loss; switch_loss: the switch head's BCE (empty without a head)
TRAIN_LOG_FIELDS = ("epoch", "stage", "global_step", "loss", "switch_loss", "lr", "samples", "seconds")
EVAL_LOG_FIELDS = ("epoch", "stage", "global_step", "train_loss", "val_loss", "accuracy", "cot_match",
                   "generated_tokens", "num_samples", "mean_thoughts", "switch_accuracy", "switch_mean_thoughts")


# ---------------------------------------------------------------------- model
def _base_model(config: TrainConfig, tokenizer):
    """The HF causal LM and tokenizer named by model_id: a directory, a hub id, or tiny:<family>."""
    source = config.model_source
    if source.startswith("tiny:"):
        from ..data.tokenizer import default_tokenizer
        from ..tiny import tiny_model

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer) if config.tokenizer else default_tokenizer()
        size = {**TINY_DEFAULTS, **config.tiny_size}
        return tiny_model(source.split(":", 1)[1], len(tokenizer), seed=config.seed, **size), tokenizer
    model = AutoModelForCausalLM.from_pretrained(source)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or source)
    return model, tokenizer


def build_model(config: TrainConfig, model=None, tokenizer=None, weights: str | Path | None = None) -> CoconutModel:
    """A CoconutModel from the config (or the given model), with `weights` loaded the official way.

    `weights` may be one of our checkpoint directories, a .safetensors file, an official Coconut
    checkpoint (`base_causallm.*` keys) or a plain causal-LM state dict; a plain state dict loads
    before the latent tokens are added, as the official runner does.
    """
    if isinstance(model, CoconutModel):
        coconut = model
        if tokenizer is not None and tokenizer is not model.tokenizer:
            raise ValueError("tokenizer: pass it inside the CoconutModel, not next to it")
        state = ckpt.read_weights(weights) if weights else None
    else:
        if model is None:
            model, tokenizer = _base_model(config, tokenizer)
        elif not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a CoconutModel or a transformers PreTrainedModel, got {type(model).__name__}")
        elif tokenizer is None:
            raise ValueError("tokenizer is required with an HF model")
        state = ckpt.read_weights(weights) if weights else None
        rows = model.get_input_embeddings().weight.shape[0]
        plain = state is not None and not any(k.startswith(OFFICIAL_PREFIX) for k in state)
        if plain and _embedding_rows(state, model) == rows:
            ckpt.load_model_weights(model, state, str(weights))
            state = None
        coconut = CoconutModel.from_pretrained(model, tokenizer=tokenizer)
    if state is not None:
        if any(k.startswith(OFFICIAL_PREFIX) for k in state):
            coconut.load_official_checkpoint(weights)
        else:
            ckpt.load_model_weights(coconut.model, state, str(weights))
    return coconut


def add_switch_head(coconut: CoconutModel, kind, weights: str | Path | None) -> None:
    """The switch head of `switch_head: kind`; its weights come from a checkpoint directory that has them."""
    kind = check_kind(kind)
    if coconut.switch_head is not None and coconut.switch_head.kind == kind:
        return
    head = coconut.add_switch_head(kind)
    if weights is not None and (Path(weights) / SWITCH_HEAD_FILE).is_file():
        head.load_state_dict(load_file(Path(weights) / SWITCH_HEAD_FILE))


def _embedding_rows(state: dict, model) -> int | None:
    emb = model.get_input_embeddings().weight
    name = next((n for n, p in model.named_parameters() if p is emb), None)
    return state[name].shape[0] if name in state else None


# ---------------------------------------------------------------------- data
def _records(key: str, path, given, limit):
    """The records of `key` (train_path / val_path): given in memory, or read and checked from the file."""
    if given is None and path:
        if not Path(path).is_file():
            raise TrainingDataError(f"{key} {str(path)!r}: no such file")
        try:
            given = load_records(path)
        except ValueError as e:
            raise TrainingDataError(f"{key} {str(path)!r}: {e}") from None
    return given[:limit] if given is not None and limit else given


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_lengths(train_tok, val_tok, curriculum, ids, context: int | None, config: TrainConfig) -> None:
    """Every sequence the run will build fits the model's context: each training record at its longest stage
    (question, latent span, remaining steps, answer) and each validation question with the longest latent span
    and the generated tokens. The first record that does not fit is named."""
    if context is None:
        return
    most_latents = curriculum.max_latent_stage * curriculum.thoughts_per_step + 2
    rng = random.Random(0)
    for rec in train_tok:
        bound = len(rec.question) + most_latents + sum(len(s) for s in rec.steps) + len(rec.answer)
        if bound <= context:
            continue
        for stage in range(curriculum.max_latent_stage + 2):  # the exact lengths of the stages this run can use
            n = len(build_training_example(rec, stage, curriculum, ids, rng)["input_ids"])
            if n > context:
                raise TrainingDataError(
                    f"training record {rec.idx}: {n} tokens at stage {stage} (question {len(rec.question)} tokens) "
                    f"exceed the model's context of {context} positions; shorten or drop the record")
    for rec in val_tok:
        n = len(rec.question) + most_latents + config.generation_tokens
        if n > context:
            raise TrainingDataError(
                f"validation record {rec.idx}: its question ({len(rec.question)} tokens) with the latent span and "
                f"{config.generation_tokens} generated tokens needs {n} positions, more than the model's context of "
                f"{context}; shorten or drop the record, or lower max_new_tokens")


def prune_log(path: Path, global_step: int) -> None:
    """Drop the rows of a CSV log past `global_step` (logged before a crash, after the checkpoint resumed from),
    so the resumed run logs each step once. Rewritten atomically."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kept = [r for r in rows if not (r.get("global_step") or "").isdigit() or int(r["global_step"]) <= global_step]
    if len(kept) == len(rows) or fields is None:
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    write_text_atomic(path, out.getvalue())


def _tokenize(records, tokenizer):
    if not records:
        return []
    check_tokenization(records[0], tokenizer, 0)  # as the official loader asserts
    return [tokenize_record(r, tokenizer, idx=i) for i, r in enumerate(records)]


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning-rate multiplier after `step` optimizer steps (a pure function, so resume is exact)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    if config.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class CSVLog:
    """Rows appended to a CSV file (header once), flushed after every row."""

    def __init__(self, path: Path, fields: tuple[str, ...]):
        self.path, self.fields = path, fields
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields)
        if new:
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: row.get(k) for k in self.fields})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, config: TrainConfig, model=None, tokenizer=None, train_records=None, val_records=None):
        self.config = config
        self.ctx: DistContext = init_distributed(config.device)
        seed_everything(config.seed)
        # the data first: a missing or malformed file is an error before any directory or model exists
        debug_train, debug_val = (DEBUG_TRAIN, DEBUG_VAL) if config.debug else (None, None)
        self.train_records = None if config.only_eval else _records("train_path", config.train_path, train_records,
                                                                    debug_train)
        if not config.only_eval and not self.train_records:
            raise TrainingDataError("no training data: set train_path (or pass train_records)")
        self.val_records = _records("val_path", config.val_path, val_records, debug_val)
        self.save_dir = config.save_dir
        self.lock = None
        if self.ctx.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock.acquire(self.save_dir)  # one trainer per run directory
        barrier(self.ctx)
        try:
            self._setup(model, tokenizer)
        except BaseException:
            self.close()
            raise

    def _setup(self, model, tokenizer) -> None:
        config = self.config
        # where to start: the newest checkpoint in save_dir (auto-resume), else `resume` epochs skipped
        self.start_epoch, self.start_step, self.global_step = config.resume, 0, 0
        self.best_acc, self.optimizer_stage, self.loss_sums = 0.0, None, [0.0, 0]
        self.resume_dir, weights = None, config.load_model_path
        found = None if config.only_eval else ckpt.latest_checkpoint(self.save_dir)
        if found is not None:
            path, kind = found
            if self.ctx.is_main:
                print(f"found a previous run: resuming from {path} (the `resume` key is ignored)")
            weights = path
            if kind == "full":
                self.resume_dir = path
                self._read_resume_state(ckpt.read_trainer_state(path))
            else:
                self.start_epoch = int(path.name.split("_")[1])
        elif config.resume and not config.load_model_path and self.ctx.is_main:
            print(f"warning: skipping the first {config.resume} epochs without load_model_path")

        self.coconut = build_model(config, model, tokenizer, weights)
        if config.switch_head is not False:  # before the optimizer and the DDP wrap, which must see its weights
            add_switch_head(self.coconut, config.switch_head, weights)
        if config.bf16:
            self.coconut.to(torch.bfloat16)  # the official pure bf16: weights and optimizer in bf16
        self.coconut.to(self.ctx.device)
        self.forward_options = self._forward_options()
        self.model = self.coconut if config.only_eval else wrap_model(self.coconut, self.ctx, config.parallel)
        self.fsdp = is_fsdp(self.model)
        self.tokenizer = self.coconut.tokenizer
        self.ids = self.coconut.latent_ids

        self.train_tok = _tokenize(self.train_records, self.tokenizer)
        self.val_tok = _tokenize(self.val_records, self.tokenizer)
        self.collate = CoconutCollator(self.tokenizer.pad_token_id, self.ids.latent)
        self.curriculum = config.curriculum
        check_lengths(self.train_tok, self.val_tok, self.curriculum, self.ids, context_length(self.coconut.model),
                      config)

        self.optimizer = None
        self.optimizer_builds = 0
        if self.resume_dir is not None and not config.only_eval:
            if (self.resume_dir / ckpt.OPTIMIZER_FILE).is_file():
                self._new_optimizer(self.optimizer_stage)
                ckpt.load_optimizer_state(self.model, self.optimizer, self.resume_dir)
            ckpt.load_rng_state(self.resume_dir, self.ctx.rank)

        log_dir = Path(config.log_dir) if config.log_dir else self.save_dir
        self.train_log = self.eval_log = self.tensorboard = None
        if self.ctx.is_main:
            log_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_dir is not None:  # rows logged after the checkpoint are logged again from it
                for name in ("train_log.csv", "eval_log.csv"):
                    prune_log(log_dir / name, self.global_step)
            if not config.only_eval:
                self.train_log = CSVLog(log_dir / "train_log.csv", TRAIN_LOG_FIELDS)
            self.eval_log = CSVLog(log_dir / "eval_log.csv", EVAL_LOG_FIELDS)
            if config.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError("tensorboard: True needs the tensorboard package (pip install tensorboard)") from e
                self.tensorboard = SummaryWriter(str(log_dir / "tensorboard"))

    def close(self) -> None:
        """Close the logs and give up the run directory (run() does this when it ends)."""
        for log in (getattr(self, "train_log", None), getattr(self, "eval_log", None)):
            if log is not None:
                log.close()
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ setup pieces
    def _read_resume_state(self, state: dict) -> None:
        c = self.config
        self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_acc = state["global_step"], state["best_acc"]
        self.optimizer_stage, self.loss_sums = state["optimizer_stage"], state["epoch_loss_sums"]
        if self.start_step:
            now = {"world_size": self.ctx.world_size, "batch_size_training": c.batch_size_training,
                   "gradient_accumulation_steps": c.gradient_accumulation_steps, "seed": c.seed, "shuffle": c.shuffle}
            changed = [k for k, v in now.items() if state.get(k) != v]
            if changed:
                raise ValueError(f"cannot resume mid-epoch from {self.save_dir}: {', '.join(changed)} changed "
                                 "since the checkpoint (the data order would differ)")

    def _forward_options(self) -> dict:
        """Keyword arguments for CoconutModel.forward from the config; each must be one forward takes."""
        c = self.config
        accepted = set(inspect.signature(CoconutModel.forward).parameters) - {
            "self", "input_ids", "attention_mask", "labels", "position_ids"}
        options, source = {}, {}
        if c.return_logits is not None:
            options["return_logits"], source["return_logits"] = c.return_logits, "return_logits"
        elif "return_logits" in accepted:  # the loop never reads the logits
            options["return_logits"] = False
        if c.latent_mode != "sequential":
            options.update(latent_mode=c.latent_mode, jacobi_iterations=c.jacobi_iterations)
            source.update(latent_mode="latent_mode", jacobi_iterations="jacobi_iterations")
        if c.activation_checkpointing:
            options["gradient_checkpointing"], source["gradient_checkpointing"] = True, "activation_checkpointing"
        if c.switch_head is not False:
            options["switch_loss_weight"], source["switch_loss_weight"] = c.switch_loss_weight, "switch_loss_weight"
        options.update(c.forward_options)
        source.update({k: f"forward_options: {k}" for k in c.forward_options})
        bad = [source.get(k, k) for k in options if k not in accepted]
        if bad:
            raise ValueError(f"{', '.join(bad)}: CoconutModel.forward does not take this option "
                             f"(it takes {', '.join(sorted(accepted)) or 'no extra options'})")
        return options

    def _new_optimizer(self, stage) -> None:
        c = self.config
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                           betas=tuple(float(b) for b in c.adam_betas), eps=c.adam_eps)
        self.optimizer_stage = stage
        self.optimizer_builds += 1

    def _maybe_reset_optimizer(self, stage: int) -> None:
        """Official: with reset_optimizer a new AdamW every epoch; the variant only when the stage changes;
        icot: also at each removal step (icot_reset_optimizer)."""
        c = self.config
        if self.optimizer is None:
            self._new_optimizer(stage)
        elif c.reset_optimizer and (not c.reset_optimizer_at_stage_change or stage != self.optimizer_stage):
            self._new_optimizer(stage)
        elif self._icot_removal_step(stage):
            self._new_optimizer(stage)

    def _icot_removal_step(self, stage: int) -> bool:
        """Whether an icot removal step begins that removes more: as in the iCoT code, no reset once the
        previous step's scheduled removal already covered every training chain."""
        c = self.config
        if c.mode != "icot" or not c.icot_reset_optimizer or stage in (0, self.optimizer_stage):
            return False
        longest_chain = max((sum(len(step) for step in r.steps) for r in self.train_tok), default=0)
        return icot_scheduled_removal(self.curriculum, stage - 1) < longest_chain

    def _autocast(self):
        if self.config.bf16_autocast:
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _trainer_state(self, epoch: int, step_in_epoch: int) -> dict:
        c = self.config
        return {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
                "best_acc": self.best_acc, "optimizer_stage": self.optimizer_stage,
                "epoch_loss_sums": list(self.loss_sums), "world_size": self.ctx.world_size,
                "batch_size_training": c.batch_size_training,
                "gradient_accumulation_steps": c.gradient_accumulation_steps, "seed": c.seed, "shuffle": c.shuffle,
                "mode": c.mode, "config": c.to_dict()}

    def save(self, epoch: int, step_in_epoch: int = 0) -> Path | None:
        if self.config.debug:
            return None
        path = ckpt.save_checkpoint(self.save_dir, ckpt.checkpoint_name(epoch, step_in_epoch), self.coconut,
                                    self.optimizer, self._trainer_state(epoch, step_in_epoch), self.ctx)
        self.checkpoints.append(str(path))
        return path

    def _optimizer_step_count(self) -> int:
        states = list(self.optimizer.state.values()) if self.optimizer is not None else []
        return int(states[0]["step"]) if states else 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        c = self.config
        results = {"save_dir": str(self.save_dir), "epochs": [], "step_losses": [], "stopped_early": False}
        self.checkpoints = []
        steps_per_epoch = 0
        if self.train_tok:
            n_batches = len(shard_batches(len(self.train_tok), c.batch_size_training, 0, self.ctx.world_size, c.seed, 0,
                                          c.shuffle))
            steps_per_epoch = math.ceil(n_batches / c.gradient_accumulation_steps)
        self.total_steps = steps_per_epoch * c.num_epochs
        for epoch in range(self.start_epoch, c.num_epochs):
            stage = stage_for_epoch(self.curriculum, epoch)
            row = {"epoch": epoch + 1, "stage": stage}
            if c.mode == "icot":
                row["icot_removed_tokens"] = icot_scheduled_removal(self.curriculum, stage)  # before smoothing
            if not c.only_eval:
                stopped = self._train_epoch(epoch, stage, row, results)
                if stopped:
                    results["stopped_early"] = True
                    break
            if self.val_records and (c.only_eval or (epoch + 1) % c.eval_every_epochs == 0 or epoch + 1 == c.num_epochs):
                row.update(self._evaluate(epoch, stage, with_loss=c.val_loss and not c.only_eval))
            if not c.only_eval:
                acc = row.get("accuracy")
                improved = acc is not None and acc > self.best_acc
                if improved:
                    self.best_acc = acc
                if not c.save_only_improve or improved:
                    self.save(epoch + 1)
            results["epochs"].append(row)
            if self.eval_log is not None and "accuracy" in row:
                self.eval_log.write({**row, "global_step": self.global_step})
            if c.only_eval:
                break
        results.update(global_step=self.global_step, best_accuracy=self.best_acc, checkpoints=self.checkpoints,
                       world_size=self.ctx.world_size)
        return results

    def _train_epoch(self, epoch: int, stage: int, row: dict, results: dict) -> bool:
        """One epoch from self.start_step; True when stop_after_steps ended the run inside it."""
        c, ctx = self.config, self.ctx
        examples = build_training_set(self.train_tok, epoch, self.curriculum, self.ids, random.Random(c.seed + epoch))
        batches = shard_batches(len(examples), c.batch_size_training, ctx.rank, ctx.world_size, c.seed, epoch, c.shuffle)
        start = self.start_step
        if start == 0:
            self._maybe_reset_optimizer(stage)
            self.loss_sums = [0.0, 0]
        self.start_step = 0
        accum = c.gradient_accumulation_steps
        self.model.train()
        bar = tqdm(total=math.ceil(len(batches) / accum), initial=math.ceil(start / accum),
                   desc=f"epoch {epoch + 1}/{c.num_epochs} stage {stage}", disable=not (ctx.is_main and c.progress_bars),
                   dynamic_ncols=True)
        window, switch_window, samples, t0 = [], [], 0, time.perf_counter()
        for i in range(start, len(batches)):
            batch = self.collate([examples[j] for j in batches[i]])
            batch = {k: v.to(ctx.device) for k, v in batch.items() if k != "idx"}
            if self.fsdp:  # FSDP2 gathers weights per pass: every rank makes as many passes
                batch = equalize_latent_passes(batch, self.ids.latent, self.tokenizer.pad_token_id, ctx)
            last = (i + 1) % accum == 0 or i == len(batches) - 1
            with no_gradient_sync(self.model, skip=not last):
                with self._autocast():
                    out = self.model(**batch, **self.forward_options)
                loss = out.loss
                (loss / accum).backward()  # official: divided by accum also in a short last window
            lm_loss = loss.detach().float()
            if out.switch_loss is not None:  # the LM loss and the BCE are logged apart
                switch_window.append(out.switch_loss.detach().float())
                if "switch_loss_weight" in self.forward_options:
                    lm_loss = lm_loss - c.switch_loss_weight * switch_window[-1]
            window.append(lm_loss)
            samples += len(batches[i])
            if not last:
                continue
            lr = c.lr * lr_factor(c, self.global_step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if c.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            step_loss, n = all_reduce([float(torch.stack(window).mean()), 1.0], ctx)
            step_loss /= n
            window = []
            step_switch = float(torch.stack(switch_window).mean()) if switch_window else None
            switch_window = []
            self.loss_sums = [self.loss_sums[0] + step_loss, self.loss_sums[1] + 1]
            results["step_losses"].append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if self.global_step % c.log_every_steps == 0:
                self._log_train({"epoch": epoch + 1, "stage": stage, "global_step": self.global_step,
                                 "loss": step_loss, "switch_loss": step_switch, "lr": lr, "samples": samples * ctx.world_size,
                                 "seconds": round(time.perf_counter() - t0, 3)})
            stop = c.stop_after_steps and self.global_step >= c.stop_after_steps
            if stop or (c.save_every_steps and self.global_step % c.save_every_steps == 0 and i + 1 < len(batches)):
                self.save(epoch, i + 1)
            if stop:
                bar.close()
                return True
        bar.close()
        row["train_loss"] = self.loss_sums[0] / max(1, self.loss_sums[1])
        row["optimizer_state_step"] = self._optimizer_step_count()
        row["optimizer_builds"] = self.optimizer_builds
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["train_seconds"] = time.perf_counter() - t0
        return False

    def _log_train(self, row: dict) -> None:
        if self.train_log is not None:
            self.train_log.write(row)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", row["loss"], row["global_step"])
            self.tensorboard.add_scalar("train/lr", row["lr"], row["global_step"])
            if row.get("switch_loss") is not None:
                self.tensorboard.add_scalar("train/switch_loss", row["switch_loss"], row["global_step"])

    def _evaluate(self, epoch: int, stage: int, with_loss: bool) -> dict:
        c = self.config
        out, t0 = {}, time.perf_counter()
        lm_options = {k: v for k, v in self.forward_options.items() if k != "switch_loss_weight"}  # val_loss: LM only
        if with_loss:
            out["val_loss"] = evaluate_loss(self.coconut, self.val_tok, stage, self.curriculum, self.collate,
                                            c.batch_size_training, self.ctx, random.Random(c.seed + epoch + 1),
                                            lm_options, self._autocast)
        gen = evaluate_generation(self.coconut, self.val_records, self.val_tok, stage, self.curriculum,
                                  c.eval_batch_size, c.generation_tokens, self.ctx, progress=c.progress_bars)
        out.update({k: gen[k] for k in ("accuracy", "cot_match", "generated_tokens", "num_samples", "mean_thoughts")})
        max_thoughts = c.max_latent_stage * c.c_thought
        if self.coconut.switch_head is not None and c.mode == "coconut" and max_thoughts > 0:
            # the learned switch beside the stage's fixed count: each question thinks until its head says switch
            auto = evaluate_generation(self.coconut, self.val_records, self.val_tok, stage, self.curriculum,
                                       c.eval_batch_size, c.generation_tokens, self.ctx, progress=c.progress_bars,
                                       auto_thoughts=max_thoughts)
            out.update(switch_accuracy=auto["accuracy"], switch_mean_thoughts=auto["mean_thoughts"])
            gen["switch_samples"] = auto["samples"]
        report_calls = {"eval_forward_calls": gen["forward_calls"], "eval_dummy_calls": gen["dummy_calls"],
                        "eval_seconds": time.perf_counter() - t0}
        if self.ctx.is_main:
            name = f"only_eval_stage{stage}.json" if c.only_eval else f"epoch_{epoch + 1}.json"
            path = self.save_dir / "eval" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            report = {"epoch": epoch + 1, "global_step": self.global_step, **out,
                      "samples": gen["samples"]}
            if "switch_samples" in gen:
                report["switch_samples"] = gen["switch_samples"]
            tmp = path.with_name(f".tmp-{name}")
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(path)
            print(f"epoch {epoch + 1} stage {stage}: accuracy {out['accuracy']:.4f}, cot match {out['cot_match']:.4f}, "
                  f"generated tokens {out['generated_tokens']:.1f}"
                  + (f", val loss {out['val_loss']:.4f}" if "val_loss" in out else ""))
            if self.tensorboard is not None:
                for k, v in out.items():
                    self.tensorboard.add_scalar(f"eval/{k}", v, self.global_step)
        return {**out, **report_calls}  # the call counts are this rank's


def train(config: TrainConfig, model=None, tokenizer=None, train_records=None, val_records=None) -> dict:
    """Run training (or `only_eval`) as `config` says; returns per-epoch metrics, step losses, checkpoints."""
    return Trainer(config, model, tokenizer, train_records, val_records).run()
