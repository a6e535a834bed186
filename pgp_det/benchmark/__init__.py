"""Measure what pruning buys: latency, FLOPs, parameters and mAP of detectors, and report them.

Every measurement loads its model with :func:`pgp_det.checkpoint.load_model` (strict by default):
detectron2 only warns when a checkpoint's tensors do not fit the model, and a benchmark of
half-random weights is worse than no benchmark.

Modules: :mod:`.timing` (latency), :mod:`.flops` (fvcore counts), :mod:`.report` (tables, plots,
seed summaries), :mod:`.measure` (one model's figures, for ``tools/eval_map_fps.py``),
:mod:`.latency` (the latency profiler, which measures :mod:`pgp_det.latency`'s tables). Training
sweeps (``tools/sweep.py``) are :mod:`pgp_det.engine.sweep`.
"""
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
]
