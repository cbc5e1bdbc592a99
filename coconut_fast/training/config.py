"""`TrainConfig`: the training run's settings, read from the official Coconut YAML keys plus our own.

The official configuration files (args/*.yaml of the Coconut repository) load unchanged except for
their paths. Unknown keys are an error that names them.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.curriculum import CurriculumConfig, check_smoothing_lambda

# Mode flags (the official ones, then icot) and the curriculum mode each selects.
MODE_FLAGS = {"coconut": "coconut", "cot": "cot", "no_thoughts": "no_thoughts", "no_cot": "no_cot",
              "special_token": "pause_as_thought", "icot": "icot"}
PARALLEL = ("ddp", "fsdp2")
LR_SCHEDULERS = ("constant", "linear", "cosine")
LATENT_MODES = ("sequential", "parallel")
SWITCH_HEADS = (False, True, "linear", "mlp")
TINY_SIZE_KEYS = ("hidden", "layers", "heads", "context")


class TrainingDataError(ValueError):
    """A data file or record the run cannot use (missing, malformed, longer than the model's context)."""


@dataclass
class TrainConfig:
    """Every key of a training YAML: the official keys first (official files set them all; the defaults
    here are ours), then ours."""

    # -- official keys
    project: str = "coconut"  # the official wandb project; accepted, not used (logs go to CSV / TensorBoard)
    save_path: str = "runs"
    name: str = "coconut"
    local: bool = False  # with local_path: load the model from that directory instead of model_id
    local_path: str | None = None
    only_eval: bool = False
    coconut: bool = False
    special_token: bool = False
    cot: bool = False
    no_thoughts: bool = False
    no_cot: bool = False
    grpo: bool = False  # official GRPO switch: must stay False here
    c_thought: int = 1
    epochs_per_stage: int = 1
    max_latent_stage: int = 0
    pad_latent_to_max: bool = False
    save_only_improve: bool = False
    uniform_prob: float = 0.0
    model_id: str = "tiny:gpt2"  # an HF directory or hub id, or tiny:<gpt2|llama|qwen2|qwen3|mistral>
    load_model_path: str | None = None
    seed: int = 0
    resume: int = 0
    bf16: bool = False
    train_path: str | None = None
    val_path: str | None = None
    reset_optimizer: bool = False
    batch_size_training: int = 32
    debug: bool = False  # official: at most 5000 training / 32 validation records, no checkpoints
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    # -- our keys
    reset_optimizer_at_stage_change: bool = False  # with reset_optimizer: rebuild only when the stage changes
    icot: bool = False  # stepwise internalisation of the chain of thought (iCoT baseline)
    icot_tokens_per_removal: int = 8  # chain-of-thought tokens removed from its start at each removal step
    icot_epochs_per_removal: int = 1  # epochs between removal steps
    icot_removal_smoothing_lambda: float | None = 4.0  # P(o extra tokens) ∝ exp(-λ o); None / 0: off
    icot_reset_optimizer: bool = True  # a new AdamW at each removal step that still shortens a chain
    switch_head: bool | str = False  # learned switch to language: "linear", "mlp" (True: linear), False: none
    switch_loss_weight: float = 1.0  # loss = LM loss + weight * the switch head's BCE (with switch_head)
    tokenizer: str | None = None  # tokenizer directory; default: the model's (local BPE for tiny:*)
    tiny_size: dict = field(default_factory=dict)  # hidden / layers / heads / context of a tiny:* model
    parallel: str = "ddp"  # "ddp" or "fsdp2" under torchrun
    device: str = "auto"  # "auto", "cpu" or "cuda"
    bf16_autocast: bool = False  # mixed precision: float32 weights, bf16 autocast forward
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 0.0  # 0: no clipping (official)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    shuffle: bool = True
    eval_batch_size: int = 16
    max_new_tokens: int | None = None  # default: 64 when "gsm" is in val_path, else 128 (official)
    eval_every_epochs: int = 1
    val_loss: bool = True
    save_every_steps: int = 0  # also checkpoint every n optimizer steps inside an epoch (0: epoch ends only)
    stop_after_steps: int = 0  # stop with a checkpoint after n optimizer steps in total (0: never)
    log_dir: str | None = None  # CSV (and TensorBoard) logs; default: the run directory
    log_every_steps: int = 1
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    progress_bars: bool = True  # tqdm bars for training and evaluation (rank 0)
    # -- CoconutModel.forward options, passed through
    return_logits: bool | None = None  # None: False (chunked cross-entropy, no full logits) when forward has it
    latent_mode: str = "sequential"  # "parallel": Jacobi refinement of all thoughts at once
    jacobi_iterations: int | None = None  # iterations of latent_mode "parallel" (exact when >= thoughts)
    activation_checkpointing: bool = False  # recompute every decoder layer in backward
    forward_options: dict = field(default_factory=dict)  # any other keyword arguments of CoconutModel.forward

    def __post_init__(self) -> None:
        self._coerce()
        self._validate()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        if not isinstance(values, dict):
            raise ValueError(f"a training config must be a mapping of keys to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(map(str, unknown))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
        try:
            return cls.from_dict(values or {})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived settings
    @property
    def mode(self) -> str:
        """Curriculum mode. No flag set trains latent tokens as plain tokens, as the official runner does."""
        chosen = [flag for flag in MODE_FLAGS if getattr(self, flag)]
        return MODE_FLAGS[chosen[0]] if chosen else "pause_as_thought"

    @property
    def curriculum(self) -> CurriculumConfig:
        return CurriculumConfig(
            mode=self.mode, c_thought=self.c_thought, epochs_per_stage=self.epochs_per_stage,
            max_latent_stage=self.max_latent_stage, pad_latent_to_max=self.pad_latent_to_max,
            uniform_prob=self.uniform_prob, icot_tokens_per_removal=self.icot_tokens_per_removal,
            icot_epochs_per_removal=self.icot_epochs_per_removal,
            icot_removal_smoothing_lambda=self.icot_removal_smoothing_lambda,
        )

    @property
    def save_dir(self) -> Path:
        return Path(self.save_path) / self.name

    @property
    def model_source(self) -> str:
        """Where the model comes from: `local_path` when `local` is set, else `model_id`."""
        return self.local_path if self.local and self.local_path else self.model_id

    @property
    def generation_tokens(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 64 if self.val_path and "gsm" in str(self.val_path) else 128

    # ------------------------------------------------------------------ checks
    def _coerce(self) -> None:
        """YAML 1.1 reads '1e-4' as a string and 'None' as a string; accept both like the official code."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == "None" and f.name in ("load_model_path", "local_path", "tokenizer", "train_path", "val_path",
                                              "log_dir", "max_new_tokens", "icot_removal_smoothing_lambda"):
                setattr(self, f.name, None)
            elif f.type in ("float", "float | None") and isinstance(value, str):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {value!r}") from None
            elif f.type in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))

    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value) and f.name != "icot_removal_smoothing_lambda":
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            expected = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list}.get(f.type)
            if f.type in ("str | None", "int | None", "bool | None", "float | None"):
                expected = {"str | None": str, "int | None": int, "bool | None": bool, "float | None": float}[f.type]
                if value is not None and (not isinstance(value, expected)
                                          or (expected is not bool and isinstance(value, bool))):
                    raise ValueError(f"{f.name} must be {f.type.split(' ')[0]} or None, got {value!r}")
                continue
            if expected is None:
                continue
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            if not isinstance(value, expected):
                raise ValueError(f"{f.name} must be {f.type}, got {value!r}")
        chosen = [flag for flag in MODE_FLAGS if getattr(self, flag)]
        if len(chosen) > 1:
            raise ValueError(f"mode flags {' and '.join(chosen)} are both set; set at most one of "
                             f"{', '.join(MODE_FLAGS)}")
        if self.grpo:
            raise ValueError("grpo: True is not supported by this trainer (GRPO fine-tuning); set grpo: False")
        for name in ("c_thought", "max_latent_stage", "resume", "warmup_steps", "save_every_steps",
                     "stop_after_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epochs_per_stage", "batch_size_training", "gradient_accumulation_steps", "num_epochs",
                     "eval_batch_size", "eval_every_epochs", "log_every_steps", "icot_tokens_per_removal",
                     "icot_epochs_per_removal"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.only_eval and self.resume >= self.num_epochs:
            raise ValueError(f"only_eval evaluates the stage of epoch `resume` ({self.resume}), which must be "
                             f"< num_epochs ({self.num_epochs})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        check_smoothing_lambda(self.icot_removal_smoothing_lambda)
        if self.icot and self.uniform_prob > 0:
            raise ValueError("uniform_prob draws a Coconut stage; icot: True has none (set uniform_prob: 0)")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {self.latent_mode!r}")
        if self.latent_mode == "parallel" and (self.jacobi_iterations is None or self.jacobi_iterations < 0):
            raise ValueError("latent_mode: parallel needs jacobi_iterations, an integer >= 0")
        if self.latent_mode == "sequential" and self.jacobi_iterations is not None:
            raise ValueError("jacobi_iterations applies to latent_mode: parallel only")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.bf16 and self.bf16_autocast:
            raise ValueError("bf16 (pure bfloat16 weights) and bf16_autocast (mixed precision) exclude each other")
        if self.reset_optimizer_at_stage_change and not self.reset_optimizer:
            raise ValueError("reset_optimizer_at_stage_change needs reset_optimizer: True")
        if len(self.adam_betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not (isinstance(self.switch_head, bool) or self.switch_head in SWITCH_HEADS[2:]):
            raise ValueError(f"switch_head must be False, True (linear), 'linear' or 'mlp', got {self.switch_head!r}")
        if self.switch_loss_weight < 0:
            raise ValueError(f"switch_loss_weight must be >= 0, got {self.switch_loss_weight}")
        bad = sorted(set(self.tiny_size) - set(TINY_SIZE_KEYS))
        if bad:
            raise ValueError(f"tiny_size has unknown key(s) {', '.join(bad)}; expected some of {TINY_SIZE_KEYS}")
