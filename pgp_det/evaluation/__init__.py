"""Evaluators picked from a dataset's metadata, as detectron2's ``evaluator_type`` intends."""
from .build import build_evaluator
from .voc import VOCDetectionEvaluator, average_precision, match_detections

__all__ = ["build_evaluator", "VOCDetectionEvaluator", "average_precision", "match_detections"]
