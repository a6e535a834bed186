"""Training: detectron2's trainer with pgp_det's evaluators (and, when enabled, pruning)."""
from .trainer import Trainer

__all__ = ["Trainer"]
