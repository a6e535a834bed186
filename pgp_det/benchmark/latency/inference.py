"""How every inference of the profiler runs: the images checked and turned into model inputs,
batch 1 without gradients at the full proposal budget of a chosen count, the ROI heads
optionally fed another model's proposals, and pruned copies of a model to time.

Every inference runs at the full proposal budget
(:func:`~pgp_det.utils.flops.full_proposal_budget`: every ``POST_NMS_TOPK_TEST`` proposal
reaches the ROI heads, the worst case; on real images NMS may leave fewer).
"""
import copy
from contextlib import contextmanager
from typing import List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..timing import image_to_input, precision_context, synthetic_image
from ...pruning.dependency import derive_channel_groups
from ...pruning.surgery import hard_prune
from ...utils.flops import full_proposal_budget

__all__ = ["check_images", "inference_context", "model_inputs", "pinned_proposals", "pruned_copy"]


@contextmanager
def _proposal_count(model: nn.Module, proposals: Optional[int]):
    """The RPN keeps ``proposals`` proposals at test time (``POST_NMS_TOPK_TEST``) inside the block."""
    rpn = getattr(model, "proposal_generator", None)
    if proposals is None or rpn is None or not hasattr(rpn, "post_nms_topk"):
        yield
        return
    saved = rpn.post_nms_topk[False]
    rpn.post_nms_topk[False] = int(proposals)
    try:
        yield
    finally:
        rpn.post_nms_topk[False] = saved


def check_images(images: Optional[Sequence[np.ndarray]], input_size: Sequence[int]) -> List[np.ndarray]:
    """The images to profile on (default: one noise image), each (H, W, 3) at ``input_size``."""
    height, width = int(input_size[0]), int(input_size[1])
    images = list(images) if images is not None else [synthetic_image(height, width)]
    if not images:
        raise ValueError("no images to profile on")
    for image in images:
        if tuple(image.shape) != (height, width, 3):
            raise ValueError(f"image of shape {tuple(image.shape)} is not ({height}, {width}, 3)")
    return images


def model_inputs(model: nn.Module, image: np.ndarray, device: torch.device) -> List[dict]:
    """The batch-1 model input of one (H, W, 3) BGR image."""
    return [image_to_input(image, getattr(model, "input_format", "BGR"), device)]


@contextmanager
def pinned_proposals(model: nn.Module, proposals: Optional[list]):
    """Inside the block the RPN runs as usual but hands ``proposals`` (another model's, recorded
    on the same image) to the ROI heads: the ROI pooler's work (its sampling grid follows the
    boxes' sizes) stays the same across widths. None: no change."""
    rpn = getattr(model, "proposal_generator", None)
    if proposals is None or rpn is None:
        yield
        return
    handle = rpn.register_forward_hook(lambda module, args, output: (proposals, output[1]))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def inference_context(model: nn.Module, device, dtype: str, proposals: Optional[int] = None,
                      pinned: Optional[list] = None):
    """How every inference here runs: no gradients, ``dtype`` on ``device``, the full budget of
    ``proposals`` proposals (:func:`~pgp_det.utils.flops.full_proposal_budget`), and the ROI heads
    fed ``pinned`` proposals when given (:func:`pinned_proposals`)."""
    with torch.no_grad(), precision_context(dtype, device), full_proposal_budget(model), \
            _proposal_count(model, proposals), pinned_proposals(model, pinned):
        yield


def pruned_copy(model: nn.Module, groups, widths: Mapping[str, int], device) -> nn.Module:
    """A copy of ``model`` whose groups keep their first ``widths[name]`` channels (latency does
    not depend on which), on ``device`` in eval mode."""
    pruned = copy.deepcopy(model)
    removals = {name: list(range(kept, groups[name].size)) for name, kept in widths.items() if kept < groups[name].size}
    if removals:
        hard_prune(pruned, removals, allow_frozen=True, groups=derive_channel_groups(pruned, allow_frozen=True))
    return pruned.to(device).eval()
