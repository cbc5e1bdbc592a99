"""The Coconut stage curriculum: which reasoning steps become latent thoughts at each stage.

The token sequences are the same as the official implementation's training and
question-only datasets for every mode. The `icot` mode is the stepwise internalisation baseline
(Deng et al., 2024): the chain of thought loses tokens from its start, removal step by removal step.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..tokens import LatentIds
from .records import TokenizedRecord

MODES = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought", "icot")
IGNORE_INDEX = -100
# Official values for "drop every step": larger than any chain of steps.
_SKIP_ALL = 10000
_SKIP_ALL_NO_COT = 100
# The iCoT code samples smoothing offsets from 0..99 (the tail mass sits on 99).
ICOT_MAX_SMOOTHING_OFFSET = 99


@dataclass
class CurriculumConfig:
    """Curriculum settings.

    mode: "coconut" (markers + latent thoughts), "cot" (full chain of thought),
    "no_cot" (question then answer), "no_thoughts" (steps removed by the curriculum,
    no latents and no markers), "pause_as_thought" (same tokens as coconut; the model
    treats <|latent|> as a plain pause token), "icot" (stepwise internalisation: the stage is
    the removal step, epoch // icot_epochs_per_removal; stage k trains on the question, the
    chain of thought - every step's tokens concatenated - without its first
    k * icot_tokens_per_removal tokens, then the answer; the prompt is the question alone).

    icot_removal_smoothing_lambda: each training example removes o more tokens, P(o) ∝ exp(-λ o)
    (o = 0 .. 99, one draw from the example's rng); None, 0 or inf: no smoothing. Removal stops
    at the chain's end: once a chain is gone its example is question then answer.
    """

    mode: str = "coconut"
    c_thought: int = 1
    epochs_per_stage: int = 1
    max_latent_stage: int = 0
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0
    icot_tokens_per_removal: int = 8
    icot_epochs_per_removal: int = 1
    icot_removal_smoothing_lambda: float | None = 4.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        for name in ("c_thought", "epochs_per_stage", "max_latent_stage", "icot_tokens_per_removal",
                     "icot_epochs_per_removal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("epochs_per_stage", "icot_tokens_per_removal", "icot_epochs_per_removal"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be >= 1, got 0")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        check_smoothing_lambda(self.icot_removal_smoothing_lambda)
        if self.mode == "icot" and self.uniform_prob > 0:
            raise ValueError("uniform_prob draws a Coconut stage; the icot mode has none (set uniform_prob: 0)")

    @property
    def special_markers(self) -> bool:
        """Whether <|start-latent|>/<|end-latent|> surround the latent span."""
        return self.mode in ("coconut", "pause_as_thought")

    @property
    def thoughts_per_step(self) -> int:
        """Latent tokens replacing one step (0 in no_thoughts mode, as the official run forces)."""
        return 0 if self.mode == "no_thoughts" else self.c_thought


def check_smoothing_lambda(value) -> None:
    """icot_removal_smoothing_lambda must be None or a number >= 0 (0 and inf switch smoothing off)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"icot_removal_smoothing_lambda must be None or a number >= 0, got {value!r}")


def stage_for_epoch(cfg: CurriculumConfig, epoch: int) -> int:
    """Scheduled stage of an epoch (0-based); cot and no_cot always train at stage 0; icot's stage is
    the removal step."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if cfg.mode in ("cot", "no_cot"):
        return 0
    if cfg.mode == "icot":
        return epoch // cfg.icot_epochs_per_removal
    return epoch // cfg.epochs_per_stage


def icot_scheduled_removal(cfg: CurriculumConfig, stage: int) -> int:
    """Chain-of-thought tokens the icot removal step `stage` removes before smoothing."""
    _check_stage(stage)
    return stage * cfg.icot_tokens_per_removal


def icot_smoothing_offset(lam: float | None, rng: random.Random) -> int:
    """Extra tokens to remove: o with P(o) ∝ exp(-lam * o), o <= 99; 0 without a draw when lam is off."""
    if not lam or math.isinf(lam):
        return 0
    u = 1.0 - rng.random()  # in (0, 1]: P(-log(u) / lam >= k) = exp(-lam * k), a geometric law
    return min(int(-math.log(u) / lam), ICOT_MAX_SMOOTHING_OFFSET)


def _check_stage(stage: int) -> None:
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")


def _markers(cfg: CurriculumConfig, ids: LatentIds, n_latent: int) -> list[int]:
    if cfg.special_markers:
        return [ids.start] + [ids.latent] * n_latent + [ids.end]
    return [ids.latent] * n_latent


def _training_dict(prefix: list[int], target: list[int], idx: int) -> dict:
    tokens = prefix + target
    return {
        "input_ids": tokens,
        "labels": [IGNORE_INDEX] * len(prefix) + target,
        "attention_mask": [1] * len(tokens),
        "position_ids": list(range(len(tokens))),
        "idx": idx,
    }


def _icot_training_example(rec: TokenizedRecord, stage: int, cfg: CurriculumConfig, rng: random.Random) -> dict:
    chain = [t for step in rec.steps for t in step]
    removed = icot_scheduled_removal(cfg, stage) + icot_smoothing_offset(cfg.icot_removal_smoothing_lambda, rng)
    return _training_dict(list(rec.question), chain[min(removed, len(chain)):] + rec.answer, rec.idx)


def build_training_example(
    rec: TokenizedRecord, stage: int, cfg: CurriculumConfig, ids: LatentIds, rng: random.Random
) -> dict:
    """One training sequence: question, latent span, remaining steps, answer; loss on the last two.

    In cot mode the stage is always 0, also when uniform_prob draws another one. In icot mode:
    question, the chain without its removed tokens, answer (rng draws only the smoothing offset).
    """
    _check_stage(stage)
    if cfg.mode == "icot":
        return _icot_training_example(rec, stage, cfg, rng)
    # One draw per sample even when uniform_prob is 0, so the random stream matches the official run.
    if rng.random() < cfg.uniform_prob:
        stage = rng.choice(list(range(len(rec.steps) + 1)))
    if cfg.mode == "cot":
        stage = 0
    if stage > cfg.max_latent_stage:
        n_skip = _SKIP_ALL
        n_latent = cfg.max_latent_stage if cfg.pad_latent_to_max else min(len(rec.steps), cfg.max_latent_stage)
    else:
        n_skip, n_latent = stage, stage
    if cfg.mode == "no_cot":
        n_skip, n_latent = _SKIP_ALL_NO_COT, 0
    n_latent *= cfg.thoughts_per_step
    prefix = rec.question + _markers(cfg, ids, n_latent)
    return _training_dict(prefix, [t for step in rec.steps[n_skip:] for t in step] + rec.answer, rec.idx)


def build_eval_example(rec: TokenizedRecord, stage: int, cfg: CurriculumConfig, ids: LatentIds) -> dict:
    """Question-only prompt with the stage's latent span, for generation (icot: the question alone)."""
    _check_stage(stage)
    if cfg.mode in ("cot", "no_cot", "icot"):
        stage = 0
    max_stage = cfg.max_latent_stage if cfg.pad_latent_to_max else min(cfg.max_latent_stage, len(rec.steps))
    k = min(max_stage, stage) * cfg.thoughts_per_step
    tokens = rec.question + _markers(cfg, ids, k)
    return {
        "input_ids": tokens,
        "attention_mask": [1] * len(tokens),
        "position_ids": list(range(len(tokens))),
        "idx": rec.idx,
    }


def build_training_set(
    records: list[TokenizedRecord], epoch: int, cfg: CurriculumConfig, ids: LatentIds, rng: random.Random
) -> list[dict]:
    """Training examples of an epoch, in record order (shuffling is the data loader's job)."""
    stage = stage_for_epoch(cfg, epoch)
    return [build_training_example(rec, stage, cfg, ids, rng) for rec in records]


def build_eval_set(records: list[TokenizedRecord], epoch: int, cfg: CurriculumConfig, ids: LatentIds) -> list[dict]:
    """Question-only examples at the epoch's scheduled stage, in record order."""
    stage = stage_for_epoch(cfg, epoch)
    return [build_eval_example(rec, stage, cfg, ids) for rec in records]
