"""coconut_fast: a fast, faithful engine for Coconut (Chain of Continuous Thought)."""
from .model import CoconutModel, CoconutOutput
from .generation import CoconutGenerateOutput
from .tokens import END_LATENT, LATENT, START_LATENT, LatentIds

__version__ = "0.1.0"
__all__ = [
    "CoconutModel",
    "CoconutOutput",
    "CoconutGenerateOutput",
    "LatentIds",
    "START_LATENT",
    "END_LATENT",
    "LATENT",
]
