"""Measure what pruning buys: latency, FLOPs, parameters and mAP of detectors, and report them.

``load_checked_model`` lives here because every measurement starts with it: detectron2 only
warns when a checkpoint's tensors do not fit the model, and a benchmark of half-random weights
is worse than no benchmark (the checks themselves are :class:`pgp_det.checkpoint.PrunedCheckpointer`'s).
"""
import torch

from ..checkpoint import load_model
from .timing import (
    STAGES,
    DetectorLatency,
    TimingStats,
    environment_info,
    measure_detector_latency,
    time_callable,
    time_dataset_images,
)

__all__ = [
    "STAGES",
    "DetectorLatency",
    "TimingStats",
    "environment_info",
    "measure_detector_latency",
    "time_callable",
    "time_dataset_images",
    "load_checked_model",
]


def load_checked_model(cfg, weights: str = None) -> torch.nn.Module:
    """:func:`pgp_det.checkpoint.load_model` with ``strict=True``: the model of ``cfg`` (rebuilt to a
    pruned checkpoint's architecture), refusing checkpoints that do not cover it exactly.

    Raises:
        UserInputError: the file is missing, unreadable, or does not match ``cfg``'s model.
    """
    return load_model(cfg, weights, strict=True)
