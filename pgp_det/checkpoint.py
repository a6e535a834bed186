"""Checkpoints of (possibly pruned) detectors: save atomically, rebuild the saved architecture on load."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from .errors import UserInputError


def load_model(cfg, weights: str = None) -> torch.nn.Module:
    """Build ``cfg``'s model, load ``weights`` (default ``cfg.MODEL.WEIGHTS``) and return it in eval mode.

    Raises:
        UserInputError: the weights file does not exist.
    """
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UserInputError(f"weights file '{weights}' does not exist")
    model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    return model.eval()
