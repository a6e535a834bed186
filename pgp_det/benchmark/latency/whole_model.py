"""The whole model timed: alone (:func:`time_whole_model`), several models in turn round after
round so that their ratios hold while the device's speed drifts (:func:`time_interleaved`,
:func:`median_ratio`), and the time spent between the layers, where the element-wise work that
pruning a group shrinks happens (:func:`time_between_layers`).
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .inference import check_images, inference_context, model_inputs
from .timers import Clock, Timer

__all__ = ["median_ratio", "time_between_layers", "time_interleaved", "time_whole_model"]


def time_whole_model(model: nn.Module, input_size: Sequence[int], timer: Timer, device="cpu", dtype: str = "fp32",
                     proposals: Optional[int] = None, images: Optional[Sequence[np.ndarray]] = None,
                     pinned: Optional[Sequence[list]] = None) -> float:
    """Milliseconds of one batch-1 inference of ``model`` (eval mode, on ``device``) at the full
    proposal budget of ``proposals`` (default: the model's), averaged over ``images`` ((H, W, 3)
    BGR at ``input_size``; default one noise image). ``pinned``: per image, the proposals the
    ROI heads get instead of the model's own (:func:`~pgp_det.benchmark.latency.inference.pinned_proposals`)."""
    device = torch.device(device)
    images = check_images(images, input_size)
    total = 0.0
    for i, image in enumerate(images):
        inputs = model_inputs(model, image, device)
        with inference_context(model, device, dtype, proposals, pinned[i] if pinned else None):
            total += float(timer(lambda: model(inputs)))
    return total / len(images)


def time_between_layers(model: nn.Module, out_groups: Mapping[str, Optional[str]], input_size: Sequence[int],
                        clock: Clock, device="cpu", dtype: str = "fp32", proposals: Optional[int] = None,
                        images: Optional[Sequence[np.ndarray]] = None, runs: int = 5) -> Dict[str, float]:
    """``{group: ms}``: the time the whole model spends after the layers whose output channels
    are a group's (``out_groups``: ``{module name: group or None}`` for every conv, linear and ROI
    pooler) until the next of those layers starts, per inference: the element-wise work that
    follows a layer (ReLUs, residual sums, max pooling, FPN's upsampling and sums), which timing
    the layers alone leaves out and which pruning the group shrinks. ``clock`` is read in forward
    hooks around the layers, so it has to show work done when read: the host's clock for a CPU
    (on a CUDA device kernels still run when the hooks fire). Mean over ``images`` of the median
    over ``runs`` inferences after one warm-up, at the full budget of ``proposals`` proposals."""
    device = torch.device(device)
    images = check_images(images, input_size)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    ended: List[Optional[Tuple[Optional[str], float]]] = [None]  # the last layer's group and when it ended
    spent: Dict[str, float] = {}

    def started(*_):
        if ended[0] is not None and ended[0][0] is not None:
            group, at = ended[0]
            spent[group] = spent.get(group, 0.0) + clock() - at
        ended[0] = None

    def finished(name: str):
        ended[0] = (out_groups.get(name), clock())

    handles = []
    for name, module in model.named_modules():
        if name in out_groups:
            handles.append(module.register_forward_pre_hook(started))
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: finished(name)))
    per_image = []
    try:
        for image in images:
            inputs = model_inputs(model, image, device)
            samples = []
            for run in range(runs + 1):
                spent.clear()
                ended[0] = None
                with inference_context(model, device, dtype, proposals):
                    model(inputs)
                if run:
                    samples.append(dict(spent))
            groups = set().union(*samples)
            per_image.append({g: float(np.median([s.get(g, 0.0) for s in samples])) for g in groups})
    finally:
        for handle in handles:
            handle.remove()
    groups = set().union(*per_image)
    return {g: sum(p.get(g, 0.0) for p in per_image) / len(per_image) for g in groups}


def time_interleaved(models: Sequence[Tuple[nn.Module, Optional[Sequence[list]]]], input_size: Sequence[int],
                     timer: Timer, rounds: int = 1, device="cpu", dtype: str = "fp32",
                     proposals: Union[None, int, Sequence[Optional[int]]] = None,
                     images: Optional[Sequence[np.ndarray]] = None) -> List[List[float]]:
    """``samples[m][r]``: milliseconds of model ``m`` in round ``r`` (:func:`time_whole_model`
    with ``timer``; ``models``: ``(model, pinned proposals or None)`` pairs; ``proposals``: one
    count for all, or one per model, so that one model can appear at several counts). Each round
    times every model once, in turn, so all of them see the device in the same state (clocks,
    heat, other processes): their ratios hold when the device's speed drifts between rounds,
    which one model timed after another does not give."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    counts = list(proposals) if isinstance(proposals, Sequence) else [proposals] * len(models)
    if len(counts) != len(models):
        raise ValueError(f"{len(counts)} proposal counts for {len(models)} models")
    samples: List[List[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, (model, pinned) in enumerate(models):
            samples[i].append(time_whole_model(model, input_size, timer, device, dtype, counts[i], images, pinned))
    return samples


def median_ratio(samples: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of one model's time over the reference model's in the same round."""
    return float(np.median([a / b for a, b in zip(samples, reference)]))
