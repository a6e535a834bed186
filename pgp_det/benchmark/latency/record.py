"""The first stage of profiling: run the model once per proposal count on each image and record
what its layers are called with, so that each layer can then be timed alone on inputs of the same
shapes (:mod:`pgp_det.benchmark.latency.layers`).

Recorded through forward hooks: every conv and linear layer's input shapes and output elements
per channel, every ROI pooler's ``(features, boxes)``, and the RPN's proposals (which the ROI
heads of pruned copies are later fed, so that the pooler's work stays the same across widths).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from detectron2.modeling.poolers import ROIPooler
from torch import nn

from .inference import inference_context

__all__ = ["LAYER_TYPES", "ModelRecording", "RecordedInference", "record_inference", "record_model"]

LAYER_TYPES = (nn.Conv2d, nn.Linear)  # the layers whose widths pruning changes (with the ROI pooler)


@dataclass
class RecordedInference:
    """One batch-1 inference at one proposal count.

    Attributes:
        calls: ``{module name: [positional inputs of each call]}`` for every conv, linear and
            ROI pooler, in call order: a conv/linear's input shape ``(N, C, ...)``, a pooler's
            ``(features, boxes)``.
        elements: ``{conv/linear name: output elements per channel}``, summed over its calls.
        proposals: the RPN's proposals (one ``Instances`` per image), or None without an RPN.
    """

    calls: Dict[str, list]
    elements: Dict[str, int]
    proposals: Optional[list]


def record_inference(model: nn.Module, inputs: List[dict], proposals: int, device, dtype: str) -> RecordedInference:
    """Run one inference of ``inputs`` at ``proposals`` proposals and record it (see
    :class:`RecordedInference`)."""
    calls: Dict[str, list] = {}
    elements: Dict[str, int] = {}
    recorded = []

    def count_output(module, args, output, name):
        elements[name] = elements.get(name, 0) + output.numel() // max(output.shape[1], 1)

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: calls.setdefault(name, []).append(tuple(args[0].shape))))
            handles.append(module.register_forward_hook(
                lambda m, args, output, name=name: count_output(m, args, output, name)))
        elif isinstance(module, ROIPooler):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: calls.setdefault(name, []).append((list(args[0]), list(args[1])))))
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None:
        handles.append(rpn.register_forward_hook(lambda m, args, output: recorded.append(output[0])))
    try:
        with inference_context(model, device, dtype, proposals):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return RecordedInference(calls, elements, recorded[0] if recorded else None)


@dataclass
class ModelRecording:
    """What the model's layers were called with, at every profiled proposal count.

    Attributes:
        counts: the proposal counts (ascending), ``reference`` among them.
        reference: the model's own ``POST_NMS_TOPK_TEST``, where the width grids are timed.
        calls: ``{count: {module name: calls}}`` of the first image (a layer's shapes do not
            change across images of one size).
        pooler_calls: ``{count: {pooler name: calls}}`` of every image, one after the other
            (the boxes, and so the pooler's work, differ from image to image).
        proposals: ``{count: [the RPN's proposals on each image]}``.
        elements: ``{conv/linear name: output elements per channel}`` of the first image at
            the reference count.
    """

    counts: List[int]
    reference: int
    calls: Dict[int, Dict[str, list]]
    pooler_calls: Dict[int, Dict[str, list]]
    proposals: Dict[int, list]
    elements: Dict[str, int]


def record_model(model: nn.Module, inputs: Sequence[List[dict]], counts: Sequence[int], reference: int, device,
                 dtype: str) -> ModelRecording:
    """Record one inference of each image's ``inputs`` at each proposal count of ``counts``."""
    calls, pooler_calls, proposals = {}, {}, {}
    elements: Dict[str, int] = {}
    poolers = [name for name, module in model.named_modules() if isinstance(module, ROIPooler)]
    for n in counts:
        recorded = [record_inference(model, x, n, device, dtype) for x in inputs]
        calls[n] = recorded[0].calls
        pooler_calls[n] = {name: [c for r in recorded for c in r.calls.get(name, [])] for name in poolers}
        proposals[n] = [r.proposals for r in recorded]
        if n == reference:
            elements = recorded[0].elements
    return ModelRecording(list(counts), reference, calls, pooler_calls, proposals, elements)
