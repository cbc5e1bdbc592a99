"""The Coconut stage curriculum: which reasoning steps become latent thoughts at each stage.

The token sequences are the same as the official implementation's training and
question-only datasets for every mode.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..tokens import LatentIds
from .records import TokenizedRecord

MODES = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought")
IGNORE_INDEX = -100
# Official values for "drop every step": larger than any chain of steps.
_SKIP_ALL = 10000
_SKIP_ALL_NO_COT = 100


@dataclass
class CurriculumConfig:
    """Curriculum settings.

    mode: "coconut" (markers + latent thoughts), "cot" (full chain of thought),
    "no_cot" (question then answer), "no_thoughts" (steps removed by the curriculum,
    no latents and no markers), "pause_as_thought" (same tokens as coconut; the model
    treats <|latent|> as a plain pause token).
    """

    mode: str = "coconut"
    c_thought: int = 1
    epochs_per_stage: int = 1
    max_latent_stage: int = 0
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        for name in ("c_thought", "epochs_per_stage", "max_latent_stage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.epochs_per_stage == 0:
            raise ValueError("epochs_per_stage must be >= 1, got 0")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")

    @property
    def special_markers(self) -> bool:
        """Whether <|start-latent|>/<|end-latent|> surround the latent span."""
        return self.mode in ("coconut", "pause_as_thought")

    @property
    def thoughts_per_step(self) -> int:
        """Latent tokens replacing one step (0 in no_thoughts mode, as the official run forces)."""
        return 0 if self.mode == "no_thoughts" else self.c_thought


def stage_for_epoch(cfg: CurriculumConfig, epoch: int) -> int:
    """Scheduled stage of an epoch (0-based); cot and no_cot always train at stage 0."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if cfg.mode in ("cot", "no_cot"):
        return 0
    return epoch // cfg.epochs_per_stage


def _check_stage(stage: int) -> None:
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")


def _markers(cfg: CurriculumConfig, ids: LatentIds, n_latent: int) -> list[int]:
    if cfg.special_markers:
        return [ids.start] + [ids.latent] * n_latent + [ids.end]
    return [ids.latent] * n_latent


def build_training_example(
    rec: TokenizedRecord, stage: int, cfg: CurriculumConfig, ids: LatentIds, rng: random.Random
) -> dict:
    """One training sequence: question, latent span, remaining steps, answer; loss on the last two.

    In cot mode the stage is always 0, also when uniform_prob draws another one.
    """
    _check_stage(stage)
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
    tokens = prefix + [t for step in rec.steps[n_skip:] for t in step] + rec.answer
    return {
        "input_ids": tokens,
        "labels": [IGNORE_INDEX] * len(prefix) + tokens[len(prefix):],
        "attention_mask": [1] * len(tokens),
        "position_ids": list(range(len(tokens))),
        "idx": rec.idx,
    }


def build_eval_example(rec: TokenizedRecord, stage: int, cfg: CurriculumConfig, ids: LatentIds) -> dict:
    """Question-only prompt with the stage's latent span, for generation."""
    _check_stage(stage)
    if cfg.mode in ("cot", "no_cot"):
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
