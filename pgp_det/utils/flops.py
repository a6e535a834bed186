"""FLOPs of a Faster R-CNN per module, and the parts (families) a detector is reported in.

FLOPs follow fvcore's convention (the one detectron2's ``FlopCountAnalysis`` uses): one fused
multiply-add counts as one FLOP, and ops without a formula (NMS, sorting, indexing) count zero.
fvcore's counter is used directly on :class:`pgp_det.utils.modules.TensorDetector`, because
detectron2 v0.6's ``detectron2.utils.analysis`` imports caffe2 (via ``detectron2.export``).
Read by both :mod:`pgp_det.pruning.cost` (predicted costs) and :mod:`pgp_det.benchmark.flops`
(reported costs), so it lives below both.
"""
import contextlib
import warnings
from typing import Dict, Tuple

import torch
from fvcore.nn import FlopCountAnalysis

from .modules import TensorDetector

__all__ = ["FAMILIES", "family_of", "full_proposal_budget", "module_flops"]

# Parts a detector is reported in; see :func:`family_of`.
FAMILIES = ("backbone", "fpn", "rpn", "roi_heads")


def family_of(module_name: str) -> str:
    """Map a parameter/module name to a family.

    ``backbone.bottom_up.*`` -> "backbone", other ``backbone.*`` -> "fpn",
    ``proposal_generator.*`` -> "rpn", ``roi_heads.*`` -> "roi_heads", anything else -> "other".
    """
    if module_name == "backbone.bottom_up" or module_name.startswith("backbone.bottom_up."):
        return "backbone"
    if module_name == "backbone" or module_name.startswith("backbone."):
        return "fpn"
    if module_name.split(".", 1)[0] == "proposal_generator":
        return "rpn"
    if module_name.split(".", 1)[0] == "roi_heads":
        return "roi_heads"
    return "other"


@contextlib.contextmanager
def full_proposal_budget(model):
    """Keep every one of the RPN's POST_NMS_TOPK_TEST proposals: NMS threshold 1 removes none,
    and no clipped box counts as empty.

    ROI-head cost grows with the number of proposals, which after NMS depends on image content;
    at the full budget the count is the (deterministic) worst case the config allows. An RPN
    with extreme box deltas (a random-init R50) clips most boxes to zero width; the empty-box
    filter would then leave the ROI heads few proposals and their FLOPs would depend on weights.
    """
    rpn = getattr(model, "proposal_generator", None)
    if rpn is None or not hasattr(rpn, "nms_thresh"):
        yield
        return
    saved = rpn.nms_thresh, getattr(rpn, "min_box_size", None)
    rpn.nms_thresh = 1.0
    if saved[1] is not None:
        rpn.min_box_size = float("-inf")  # a clipped box's sides are >= 0: none is "empty"
    try:
        yield
    finally:
        rpn.nms_thresh = saved[0]
        if saved[1] is not None:
            rpn.min_box_size = saved[1]


def module_flops(model: torch.nn.Module, height: int, width: int) -> Tuple[Dict[str, float], float]:
    """fvcore FLOPs of one inference on a (3, height, width) zero image fed without resizing,
    at the full proposal budget (:func:`full_proposal_budget`).

    Returns:
        (``{module name: FLOPs of the module, its submodules included}``, total FLOPs).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    image = torch.zeros(3, int(height), int(width), dtype=torch.float32, device=device)
    try:
        with torch.no_grad(), full_proposal_budget(model), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            analysis = FlopCountAnalysis(TensorDetector(model), (image,))
            # fvcore warns once per op without a formula; those ops are cheap by design here
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            prefix = "model."  # TensorDetector's attribute holding the detector
            by_module = {
                name[len(prefix):]: flops for name, flops in analysis.by_module().items() if name.startswith(prefix)
            }
            total = analysis.total()
    finally:
        model.train(was_training)
    return by_module, total
