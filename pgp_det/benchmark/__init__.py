"""Measure what pruning buys: latency, FLOPs, parameters and mAP of detectors, and report them.

``load_checked_model`` lives here because every measurement starts with it: detectron2 only
warns when a checkpoint's tensors do not fit the model, and a benchmark of half-random weights
is worse than no benchmark.
"""
import contextlib
import logging

import torch

from ..checkpoint import load_model
from ..errors import UserInputError
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
    "checkpoint_mismatches",
    "load_checked_model",
]


def _read_state_dict(path: str) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older checkpoints may pickle more than tensors; the file is the user's own
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise UserInputError(f"cannot read checkpoint '{path}': {type(e).__name__}: {e}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserInputError(f"checkpoint '{path}' holds no state dict (expected a dict with a 'model' entry)")
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def checkpoint_mismatches(model: torch.nn.Module, path: str) -> list:
    """Describe how the checkpoint at ``path`` disagrees with ``model``; empty when it fits.

    Counts tensors whose shapes differ and model parameters the checkpoint lacks. detectron2
    ``.pkl`` checkpoints (Caffe2 names, renamed on load) are not checked.
    """
    if path.endswith(".pkl"):
        return []
    state = _read_state_dict(path)
    model_state = model.state_dict()
    shape_diffs = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in state.items()
        if k in model_state and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(model_state[k].shape)
    ]
    missing = [k for k, _ in model.named_parameters() if k not in state]
    problems = []
    if shape_diffs:
        problems.append(f"{len(shape_diffs)} tensors differ in shape (first: {shape_diffs[0]})")
    if missing:
        problems.append(f"{len(missing)} model parameters are missing (first: {missing[0]})")
    return problems


@contextlib.contextmanager
def _quiet_checkpoint_warnings():
    # the one-line error below replaces detectron2's per-tensor "skip loading" warnings
    loggers = [logging.getLogger(n) for n in ("fvcore.common.checkpoint", "detectron2.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_checked_model(cfg, weights: str = None) -> torch.nn.Module:
    """:func:`pgp_det.checkpoint.load_model`, failing when the checkpoint does not fit the model.

    The comparison is against the model ``load_model`` returns, so architectures it rebuilds from
    the checkpoint (physically pruned ones) are compared as built.

    Raises:
        UserInputError: the file is missing, unreadable, or does not match ``cfg``'s model.
    """
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    with _quiet_checkpoint_warnings():
        model = load_model(cfg, weights)
    if weights and "://" not in weights:
        problems = checkpoint_mismatches(model, weights)
        if problems:
            raise UserInputError(
                f"checkpoint '{weights}' does not match the model of its config: {'; '.join(problems)}"
            )
    return model
