"""What each channel of a group costs in the element-wise work that follows its layers (ReLUs,
residual sums, max pooling, FPN's upsampling and sums): the weights of a table's
``activations``, which say how much of that work pruning a group removes
(:meth:`~pgp_det.latency.table.LatencyTable.activation_fraction`).

On a CPU they are timed in the whole model (:func:`element_wise_ms_per_channel`); on a CUDA
device, where hooks cannot time that work without synchronising it, they are the activation
elements the group's layers write (:func:`elements_written`).
"""
from typing import Dict, Sequence

import numpy as np
from torch import nn

from ...pruning.cost import uniform_sizes
from .inference import pruned_copy
from .layers import axis_groups
from .record import ModelRecording
from .settings import CONTRAST_RATIO, ProfileSettings
from .timers import Timing
from .whole_model import time_between_layers

__all__ = ["element_wise_ms_per_channel", "elements_written"]


def elements_written(groups, recording: ModelRecording) -> Dict[str, int]:
    """``{group: activation elements per channel}`` that the layers whose output channels are the
    group's write in one inference (the first image, at the reference proposal count)."""
    axes = axis_groups(groups)
    counts: Dict[str, int] = {}
    for name in recording.calls[recording.reference]:
        group, _ = axes.get((name, 0), (None, 1))
        if group is not None:
            counts[group] = counts.get(group, 0) + recording.elements.get(name, 0)
    return counts


def element_wise_ms_per_channel(model: nn.Module, groups, recording: ModelRecording, input_size: Sequence[int],
                                settings: ProfileSettings, timing: Timing,
                                images: Sequence[np.ndarray]) -> Dict[str, float]:
    """``{group: ms per channel}``: what each channel of a group costs in the element-wise work
    that follows its layers (:func:`~pgp_det.benchmark.latency.whole_model.time_between_layers` with
    ``timing.clock``, at the reference proposal count), from the model and a copy of it cut
    uniformly at :data:`~pgp_det.benchmark.latency.settings.CONTRAST_RATIO`: the time saved after each
    group's layers over the channels cut. Measured, not counted: elements differ in what follows
    them (a stem's max pooling, a block's sum and ReLU) and in where they are held (a
    high-resolution map leaves the caches); and the difference leaves out what follows a layer
    but does not shrink with its channels (the hooks' own time, code between modules). Groups the
    cut leaves whole, and savings below zero (noise), weigh nothing."""
    axes = axis_groups(groups)
    out_groups = {name: axes.get((name, 0), (None, 1))[0] for name in recording.calls[recording.reference]}
    cut = dict(uniform_sizes(groups, CONTRAST_RATIO, settings.multiple, settings.floor))
    device, dtype, reference = timing.torch_device, timing.dtype, recording.reference
    full = time_between_layers(model, out_groups, input_size, timing.clock, device, dtype, reference, images)
    halved = time_between_layers(pruned_copy(model, groups, cut, device), out_groups, input_size, timing.clock, device,
                                 dtype, reference, images)
    return {name: max(full[name] - halved.get(name, 0.0), 0.0) / (groups[name].size - cut[name])
            for name in full if name in cut and cut[name] < groups[name].size}
