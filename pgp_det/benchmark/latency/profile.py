"""Measure a :class:`~pgp_det.latency.table.LatencyTable` on the device a detector will run on
(:func:`profile_latency`), in stages:

1. record what the layers are called with, running the model once per proposal count on each
   profiling image (:mod:`~pgp_det.benchmark.latency.record`); the images are the deployment's kind,
   stretched to the input size: their proposals set the ROI pooler's work;
2. time the whole model (:mod:`~pgp_det.benchmark.latency.whole_model`), then every conv and linear layer
   with a prunable channel group on an axis, and the ROI pooler, alone at many widths
   (:mod:`~pgp_det.benchmark.latency.layers`), then the whole model again: the faster of the two whole-model
   timings is kept, the rest of the model is the difference at full width (on a CPU also its
   page faults per inference, :mod:`~pgp_det.latency.page_faults`);
3. weigh the element-wise work of each group's channels (:mod:`~pgp_det.benchmark.latency.activations`);
4. time the whole model at the other proposal counts and pruned copies of it in turn with the
   unpruned model, round after round, for the fixed rest at each count and the fit of the rest
   that shrinks with the channels; then the copies a latency target's allocation cuts under that
   fit, and fit again to all copies (:mod:`~pgp_det.benchmark.latency.calibrate`).
"""
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from ..timing import _check_dtype, environment_info
from ...pruning.dependency import derive_channel_groups
from ...utils.allocator import minor_page_faults, page_faults_per_call
from ...utils.modules import unwrap_model
from .activations import element_wise_ms_per_channel, elements_written
from .calibrate import calibration_copies, fit_to_copies, fixed_rest_ms, knapsack_copies, time_shares
from .inference import check_images, model_inputs
from .layers import LayerTimings, time_layers
from .record import record_model
from .settings import ACTIVATION_WEIGHTS, ProfileSettings
from ...latency.table import LatencyTable
from .timers import Timing
from .whole_model import time_whole_model

__all__ = ["default_proposal_counts", "profile_latency"]


def default_proposal_counts(reference: int) -> List[int]:
    """A quarter, a half and all of the reference proposal count."""
    return sorted({max(1, round(reference * f)) for f in (0.25, 0.5, 1.0)})


def profile_latency(
    model: nn.Module,
    input_size: Sequence[int],
    settings: ProfileSettings = ProfileSettings(),
    timing: Timing = Timing(),
    *,
    images: Optional[Sequence[np.ndarray]] = None,
    metadata: Optional[Mapping] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> LatencyTable:
    """Measure ``model``'s latency table (see the module docstring).

    Args:
        model: an unpruned detectron2 ``GeneralizedRCNN``; moved to ``timing.device``, eval mode.
        input_size: (height, width) of the image fed without resizing, pixels.
        settings: what is measured (grids, proposal counts, passes, calibration copies).
        timing: where the model runs and what times it (:class:`~pgp_det.benchmark.latency.timers.Timing`).
        images: (H, W, 3) uint8 BGR images at ``input_size`` to profile on; times are means
            over them. Their proposals set the ROI pooler's work (its sampling grid follows the
            boxes' sizes), so images like the deployment's give a truer table. Default: one
            noise image.
        metadata: recorded in the table besides the environment (config, weights, ...).
        progress: called with a line of progress now and then.

    Returns:
        the :class:`~pgp_det.latency.table.LatencyTable`; ``metadata["profile_seconds"]`` says
        how long it took.
    """
    started = time.perf_counter()
    device, dtype = timing.torch_device, timing.dtype
    _check_dtype(dtype, device)
    settings.check()
    images = check_images(images, input_size)
    say = progress or (lambda line: None)
    timer = timing.layer_timer()
    model = unwrap_model(model).to(device).eval()
    groups = derive_channel_groups(model, allow_frozen=True)
    reference = int(model.proposal_generator.post_nms_topk[False])
    counts = sorted(set(int(n) for n in (settings.proposal_counts or default_proposal_counts(reference))) | {reference})

    recording = record_model(model, [model_inputs(model, image, device) for image in images], counts, reference,
                             device, dtype)
    before = time_whole_model(model, input_size, timer, device, dtype, reference, images)
    layers = time_layers(model, groups, recording, settings, timer, device, dtype, len(images), say)
    if timing.clock is not None:
        activations = element_wise_ms_per_channel(model, groups, recording, input_size, settings, timing, images)
    else:
        activations = elements_written(groups, recording)
    info = _environment_metadata(timing, settings, len(images), layers)
    info.update(metadata or {})

    # the whole model at the reference count before and right after its layers, the faster kept
    # (the rest is the difference): a thousand layer timings can leave the process slower at the
    # model for a while (measured: 5-8% on a CPU, its heap strewn with blocks of every size), as
    # other work on the device can; the other counts and the calibration copies as shares of it,
    # timed in the same rounds, so that a drift of the device's speed while they are timed one
    # after another does not enter
    after = time_whole_model(model, input_size, timer, device, dtype, reference, images)
    whole = min(before, after)
    info.update(whole_ms_before_layers=before, whole_ms_after_layers=after)
    say(f"whole model before the layer timings {before:.3f} ms, after them {after:.3f} ms: the faster kept")
    if device.type == "cpu" and minor_page_faults() is not None:
        info["page_faults_per_inference"] = time_whole_model(model, input_size, page_faults_per_call, device, dtype,
                                                             reference, images)
    sizes = {name: g.size for name, g in groups.items()}
    activations = {k: float(v) for k, v in activations.items() if v > 0}
    layers_only = LatencyTable(sizes, input_size, layers.entries, counts, [0.0] * len(counts), reference, info,
                               activations=activations)
    copies = calibration_copies(model, groups, layers_only, settings, device)
    shares = time_shares(model, copies, recording, input_size, timing, images)
    cuts = [(c.label, c.widths) for c in copies]
    del copies  # the pruned models: not needed past their timings
    fixed = fixed_rest_ms(layers.entries, counts, shares, whole, say)
    table = LatencyTable(sizes, input_size, layers.entries, counts, fixed, reference, info, activations=activations)
    if cuts:
        table = fit_to_copies(table, cuts, shares.of_copies, whole, groups)
        # then the cuts a latency target makes under that fit, timed and fitted with the others
        copies = knapsack_copies(model, groups, table, settings, device)
        if copies:
            shaped = time_shares(model, copies, recording, input_size, timing, images, other_counts=False)
            cuts += [(c.label, c.widths) for c in copies]
            del copies
            table = fit_to_copies(table, cuts, shares.of_copies + shaped.of_copies, whole, groups)
        hidden = (f" (only {1.0 + table.layer_overhead:.0%} of the layers' own savings show in the whole model: "
                  f"the device hides the rest)") if table.layer_overhead < 0 else ""
        say(f"rest shrinking with the channels: {table.activation_ms:.3f} ms of element-wise work, "
            f"layer overhead {table.layer_overhead:.3f}{hidden}")
    table.metadata["profile_seconds"] = time.perf_counter() - started
    return table


def _environment_metadata(timing: Timing, settings: ProfileSettings, image_count: int,
                          layers: LayerTimings) -> Dict[str, object]:
    """What a table records of the device, the software and how it was profiled."""
    environment = environment_info(timing.torch_device)
    return {
        "device_name": environment["device_name"],
        "device_kind": timing.torch_device.type,
        "num_threads": environment["num_threads"],
        "precision": timing.dtype,
        "torch": environment["torch"],
        "torchvision": environment["torchvision"],
        "detectron2": environment["detectron2"],
        "cuda": environment["cuda"],
        "environment": environment,
        "grid_points": settings.points,
        "channel_multiple": settings.multiple,
        "min_channels": settings.floor,
        "layer_repeat": settings.layer_repeat,
        "images": image_count,
        "layer_passes": settings.passes,
        "activation_weights": ACTIVATION_WEIGHTS[timing.clock is not None],
        "distinct_layer_timings": layers.distinct,
        "repeated_layer_timings": layers.repeated,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
