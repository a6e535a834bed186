"""A latency table's predictions checked against whole-model timings on the device
(:func:`check_latency`): the table's unpruned model pruned uniformly at a few ratios, and trained
pruned checkpoints of its architecture."""
from typing import List, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from ...pruning.dependency import derive_channel_groups
from ...utils.modules import unwrap_model
from .calibrate import uniform_cuts
from .inference import check_images, model_inputs, pruned_copy
from .record import record_inference
from ...latency.table import LatencyTable
from .timers import Timing
from .whole_model import median_ratio, time_interleaved

__all__ = ["check_latency"]


def check_latency(
    model: nn.Module,
    table: LatencyTable,
    ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    timing: Timing = Timing(),
    *,
    trained: Optional[Mapping[str, nn.Module]] = None,
    multiple: int = 8,
    floor: int = 8,
    images: Optional[Sequence[np.ndarray]] = None,
) -> List[dict]:
    """Predicted against measured latency of ``model`` (the table's unpruned model) pruned
    uniformly at each ratio (kept counts rounded to ``multiple``, at least ``floor``), its ROI
    heads fed the unpruned model's proposals on each image, and of ``trained`` models of the
    table's architecture (pruned checkpoints, at their own widths and with their own proposals:
    what a user will see). All are timed whole on ``images`` (default: one noise image; give the
    table's) at the table's input size and reference proposal count, interleaved with ``model``
    itself over ``timing.rounds`` rounds (:func:`~pgp_det.benchmark.latency.whole_model.time_interleaved`;
    ``timing``'s whole-model timer times one model once a round), so that each is also measured
    relative to the unpruned model on the device as it is in that round.

    Returns:
        one row per ratio (``"ratio"``), then per trained model (``"label"``): ``"widths"``,
        ``"predicted_ms"``, ``"measured_ms"`` (median over rounds), ``"error_percent"`` (``100
        (predicted - measured) / measured``), ``"unpruned_ms"`` (``model`` in the same rounds),
        ``"relative"`` (median over rounds of the model's time over the unpruned model's),
        ``"predicted_relative"`` (over the table's unpruned prediction) and
        ``"relative_error_percent"``: the error left when the device runs faster or slower as a
        whole than when it was profiled.
    """
    device, dtype = timing.torch_device, timing.dtype
    timer = timing.whole_model_timer()
    model = unwrap_model(model).to(device).eval()
    images = check_images(images, table.input_size)
    reference = table.reference_proposals
    pinned = [record_inference(model, model_inputs(model, image, device), reference, device, dtype).proposals
              for image in images]
    groups = derive_channel_groups(model, allow_frozen=True)
    copies = [(label, widths, pruned_copy(model, groups, widths, device))
              for label, widths in uniform_cuts(groups, ratios, multiple, floor)]
    others = [(label, unwrap_model(m).to(device).eval()) for label, m in (trained or {}).items()]
    rows = [{**label, "widths": widths} for label, widths, _ in copies]
    rows += [{"label": label, "widths": {name: g.size for name, g in derive_channel_groups(m, allow_frozen=True).items()}}
             for label, m in others]
    jobs = [(model, None)] + [(c, pinned) for _, _, c in copies] + [(m, None) for _, m in others]
    samples = time_interleaved(jobs, table.input_size, timer, timing.rounds, device, dtype, reference, images)
    unpruned_ms = float(np.median(samples[0]))
    full = table.predict(proposals=reference)
    for row, measured in zip(rows, samples[1:]):
        predicted = table.predict(row["widths"], proposals=reference)
        relative = median_ratio(measured, samples[0])
        row.update(predicted_ms=predicted, measured_ms=float(np.median(measured)), unpruned_ms=unpruned_ms,
                   relative=relative, predicted_relative=predicted / full)
        row["error_percent"] = 100.0 * (predicted - row["measured_ms"]) / row["measured_ms"]
        row["relative_error_percent"] = 100.0 * (predicted / full - relative) / relative
    return rows
