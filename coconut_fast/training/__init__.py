"""Training: `TrainConfig` (the official YAML keys and ours), `train`, checkpoints, evaluation, torch.distributed."""
from .config import TrainConfig
from .evaluate import evaluate_generation, evaluate_loss
from .trainer import Trainer, build_model, train

__all__ = ["TrainConfig", "Trainer", "build_model", "evaluate_generation", "evaluate_loss", "train"]
