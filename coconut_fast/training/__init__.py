"""Training: `TrainConfig` (the official YAML keys and ours), `train`, checkpoints, evaluation, torch.distributed."""
from .config import TrainConfig, TrainingDataError
from .evaluate import evaluate_generation, evaluate_loss
from .run_lock import RunLockedError
from .trainer import Trainer, build_model, train

__all__ = ["RunLockedError", "TrainConfig", "Trainer", "TrainingDataError", "build_model", "evaluate_generation", "evaluate_loss", "train"]
