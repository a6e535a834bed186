"""The second stage of profiling: every conv and linear layer with a prunable channel group on
an axis, and the ROI pooler, timed alone at many widths.

A copy of the layer (with the norm detectron2's ``Conv2d`` holds) is sliced to each ``(in,
out)`` width of a sampled grid (:func:`grid_widths`) and to every allowed width of each axis with
the other at full width (the steps), and called on random inputs of the shapes recorded in the
whole model (:mod:`pgp_det.benchmark.latency.record`: every call one inference makes, all FPN levels of a
shared head). Layers whose input follows the proposal count are also timed at full width at each
profiled count. Layers with identical settings and shapes (repeated blocks) are timed once
(:class:`LayerTimer`). A timing that the layer's other timings rule out (a device busy with
something else for a moment) is timed again (:func:`retime_outliers`), and with several passes
each timing is the fastest of its passes.
"""
import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling.poolers import ROIPooler
from torch import nn

from ..timing import precision_context
from ...pruning.allocation import allowed_kept_counts
from .record import ModelRecording
from .settings import ProfileSettings
from ...latency.table import LatencyEntry
from .timers import Timer

__all__ = [
    "LayerPlan", "LayerTimer", "LayerTimings", "axis_groups", "grid_widths", "plan_layers", "pooled_group",
    "retime_outliers", "time_layers",
]


def grid_widths(size: int, points: int = 5, multiple: int = 8, floor: int = 8, channel_multiple: int = 1) -> List[int]:
    """At most ``points`` widths of a group of ``size`` channels to time: allowed kept counts
    (:func:`~pgp_det.pruning.allocation.allowed_kept_counts`) nearest to evenly spaced widths
    from the smallest allowed to ``size`` (both included), ascending."""
    allowed = allowed_kept_counts(size, multiple, floor, channel_multiple)
    if len(allowed) <= points:
        return allowed
    low, high = allowed[0], allowed[-1]
    targets = [low + (high - low) * i / (points - 1) for i in range(points)]
    return sorted({min(allowed, key=lambda a: (abs(a - t), a)) for t in targets})


def _slice_norm(norm: nn.Module, full: int, width: int) -> None:
    """Keep the first ``width`` of the ``full`` channels of a norm's tensors, in place."""
    for name, tensor in list(norm.named_parameters(recurse=False)):
        if tensor.dim() >= 1 and tensor.shape[0] == full:
            setattr(norm, name, nn.Parameter(tensor.detach()[:width].clone(), requires_grad=False))
    for name, tensor in list(norm.named_buffers(recurse=False)):
        if tensor is not None and tensor.dim() >= 1 and tensor.shape[0] == full:
            setattr(norm, name, tensor[:width].clone())
    for attribute in ("num_features", "num_channels"):
        if getattr(norm, attribute, None) == full:
            setattr(norm, attribute, width)
    if isinstance(norm, nn.GroupNorm) and width % norm.num_groups:
        norm.num_groups = math.gcd(norm.num_groups, width)


def _sliced_layer(module: nn.Module, in_width: int, out_width: int, expand: int) -> nn.Module:
    """A copy of a conv/linear layer (with the norm detectron2's ``Conv2d`` holds) keeping its
    first ``in_width`` input channels (``expand`` columns each for a linear reading a flattened
    map) and ``out_width`` output channels."""
    layer = copy.deepcopy(module)
    weight = layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        full_out = layer.out_channels
        layer.weight = nn.Parameter(weight[:out_width, :in_width].clone(), requires_grad=False)
        layer.in_channels, layer.out_channels = in_width, out_width
    else:
        full_out = layer.out_features
        layer.weight = nn.Parameter(weight[:out_width, : in_width * expand].clone(), requires_grad=False)
        layer.in_features, layer.out_features = in_width * expand, out_width
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[:out_width].clone(), requires_grad=False)
    norm = getattr(layer, "norm", None)
    if isinstance(norm, nn.Module):
        _slice_norm(norm, full_out, out_width)
    return layer.eval()


class LayerTimer:
    """Times layers and poolers at given widths, once per distinct (settings, shapes, widths);
    ``fresh=True`` times again and keeps the faster (interference only ever adds time)."""

    def __init__(self, timer: Timer, device: torch.device, dtype: str, repeat: int):
        self.timer, self.device, self.dtype, self.repeat = timer, device, dtype, repeat
        self.cache: Dict[tuple, float] = {}

    def _time(self, fn: Callable[[], object]) -> float:
        def run():
            for _ in range(self.repeat):
                fn()

        with torch.no_grad(), precision_context(self.dtype, self.device):
            return float(self.timer(run)) / self.repeat

    def _keep(self, key: tuple, ms: float) -> None:
        self.cache[key] = min(self.cache.get(key, math.inf), ms)

    def layer(self, module: nn.Module, shapes: Sequence[tuple], in_width: int, out_width: int, expand: int,
              fresh: bool = False) -> float:
        activation = type(getattr(module, "activation", None)).__name__
        key = ("layer", repr(module), activation, tuple(shapes), in_width, out_width, expand)
        if fresh or key not in self.cache:
            layer = _sliced_layer(module, in_width, out_width, expand)
            generator = torch.Generator().manual_seed(0)
            inputs = []
            for shape in shapes:
                shape = (shape[0], in_width * expand) + tuple(shape[2:])
                inputs.append(torch.randn(shape, generator=generator).to(self.device))
            self._keep(key, self._time(lambda: [layer(x) for x in inputs]))
        return self.cache[key]

    def pooler(self, module: nn.Module, calls: Sequence[tuple], width: int, per: int = 1, fresh: bool = False) -> float:
        """Milliseconds of the pooler's ``calls`` at ``width`` channels, divided by ``per`` (calls
        gathered over ``per`` images: the mean per inference)."""
        boxes = tuple(id(b) for features, box_lists in calls for b in box_lists)
        shapes = tuple(tuple(f.shape) for features, _ in calls for f in features)
        key = ("pooler", repr(module), shapes, boxes, width, per)
        if fresh or key not in self.cache:
            sliced = [([f[:, :width].contiguous() for f in features], box_lists) for features, box_lists in calls]
            self._keep(key, self._time(lambda: [module(features, box_lists) for features, box_lists in sliced]) / per)
        return self.cache[key]


# how far a timing may break what a layer's work allows before it is timed again: a larger size may
# not cost a fifth less than a smaller one, nor more than twice the size ratio times it (a CPU's
# channel blocks make steps of up to about 1.5x the width ratio: 64 -> 72 channels cost 1.46x)
OUTLIER_SHRINK = 1.25
OUTLIER_GROWTH = 2.0
OUTLIER_PASSES = 3


def retime_outliers(measure: Callable[..., float], lines: Sequence[Sequence[Tuple[int, tuple]]]) -> int:
    """Time again the measurements of one layer that its other measurements rule out. Along each
    line (``[(size, point), ...]``, sizes ascending: channels on one axis or the proposal count,
    the rest fixed; ``measure(*point)`` the time), a size costing more than ``OUTLIER_SHRINK``
    times the next larger one, or the larger one more than ``OUTLIER_GROWTH`` times the size ratio
    times the smaller one: the work grows with the size, about in proportion. A device busy with
    something else for a second can make one timing tens of times too slow; :class:`LayerTimer`
    keeps the faster of the two timings, so a genuine step of the device stays and a spike goes.

    Returns:
        how many timings were repeated.
    """
    repeated = 0
    for _ in range(OUTLIER_PASSES):
        suspects = set()
        for line in lines:
            for (small, a), (large, b) in zip(line, line[1:]):
                ta, tb = measure(*a), measure(*b)
                if ta > OUTLIER_SHRINK * tb or tb > OUTLIER_GROWTH * (large / small) * ta:
                    suspects.update((a, b))
        if not suspects:
            break
        for point in sorted(suspects):
            measure(*point, fresh=True)
        repeated += len(suspects)
    return repeated


def axis_groups(groups) -> Dict[Tuple[str, int], Tuple[str, int]]:
    """``{(layer, weight dim): (group name, expand)}`` for every prunable group's weight slices."""
    axes = {}
    for group in groups.values():
        if not group.prunable:
            continue
        for s in group.slices:
            if s.tensor == "weight" and s.dim in (0, 1) and s.role in ("filter", "input"):
                axes[(s.module, s.dim)] = (group.name, s.expand)
    return axes


def pooled_group(groups) -> Optional[str]:
    """The prunable group the ROI pooler samples (read through ROIAlign), if exactly one."""
    pooled = [
        g.name for g in groups.values()
        if g.prunable and any(s.path == "roi_align" for sources in g.sources.values() for s in sources)
    ]
    return pooled[0] if len(pooled) == 1 else None


@dataclass
class LayerPlan:
    """What of one layer (or the ROI pooler) is timed, and how.

    Attributes:
        name, kind, in_group, out_group, in_widths, out_widths: those of its
            :class:`~pgp_det.latency.table.LatencyEntry`.
        in_step_widths, out_step_widths: every allowed width of the axis (the other at full
            width); empty on an axis without a channel group.
        by_count: its input follows the proposal count: it is also timed at full width at each
            profiled count.
        measure: ``measure(in_width, out_width, count, fresh=False) -> ms`` (cached by the
            :class:`LayerTimer`; ``fresh``: time again, keep the faster).
        lines: the timings along each axis (and the counts), ``[[(size, (in_width, out_width,
            count)), ...], ...]`` with sizes ascending, that :func:`retime_outliers` compares.
    """

    name: str
    kind: str
    in_group: Optional[str]
    out_group: Optional[str]
    in_widths: List[int]
    out_widths: List[int]
    in_step_widths: List[int]
    out_step_widths: List[int]
    by_count: bool
    measure: Callable[..., float]
    lines: List[List[Tuple[int, tuple]]]

    def points(self) -> List[tuple]:
        """Every ``(in_width, out_width, count)`` to time, once each, in order."""
        return list(dict.fromkeys(point for line in self.lines for _, point in line))

    def entry(self, reference: int, counts: Sequence[int]) -> LatencyEntry:
        """The table's entry, from the timings made (at the ``reference`` proposal count, and at
        each of ``counts`` when :attr:`by_count`)."""
        measure = self.measure
        full_in, full_out = self.in_widths[-1], self.out_widths[-1]
        ms = [[measure(w_in, w_out, reference) for w_out in self.out_widths] for w_in in self.in_widths]
        in_steps = tuple((w, measure(w, full_out, reference)) for w in self.in_step_widths)
        out_steps = tuple((w, measure(full_in, w, reference)) for w in self.out_step_widths)
        proposal_ms = [measure(full_in, full_out, n) for n in counts] if self.by_count else None
        return LatencyEntry(self.name, self.kind, self.in_group, self.out_group, tuple(self.in_widths),
                            tuple(self.out_widths), tuple(tuple(row) for row in ms),
                            None if proposal_ms is None else tuple(proposal_ms), in_steps, out_steps)


def plan_layers(model: nn.Module, groups, recording: ModelRecording, settings: ProfileSettings, layers: LayerTimer,
                image_count: int) -> List[LayerPlan]:
    """One :class:`LayerPlan` per layer the whole model called at the reference count (in call
    order) that a prunable group's pruning changes, and per ROI pooler when exactly one group is
    pooled; ``image_count``: the images ``recording`` pooled over."""
    counts, reference = recording.counts, recording.reference
    calls, pooler_calls = recording.calls, recording.pooler_calls
    axes, pooled = axis_groups(groups), pooled_group(groups)
    steps = {name: allowed_kept_counts(g.size, settings.multiple, settings.floor, g.channel_multiple)
             for name, g in groups.items() if g.prunable}
    grids = {name: grid_widths(g.size, settings.points, settings.multiple, settings.floor, g.channel_multiple)
             for name, g in groups.items() if g.prunable}
    modules = dict(model.named_modules())
    plans = []
    for name in calls[reference]:
        module = modules[name]
        if isinstance(module, ROIPooler):
            if pooled is None:
                continue
            in_group, out_group = pooled, None
            in_widths, out_widths = grids[pooled], [groups[pooled].size]

            def measure(w_in, w_out, n, fresh=False, module=module, name=name):
                return layers.pooler(module, pooler_calls[n][name], w_in, per=image_count, fresh=fresh)
            kind = "roi_pooler"
        else:
            in_group, expand = axes.get((name, 1), (None, 1))
            out_group, _ = axes.get((name, 0), (None, 1))
            if in_group is None and out_group is None:
                continue  # nothing pruning changes: part of the fixed rest
            conv = isinstance(module, nn.Conv2d)
            full_in = (module.in_channels if conv else module.in_features // expand)
            full_out = module.out_channels if conv else module.out_features
            in_widths = grids[in_group] if in_group else [full_in]
            out_widths = grids[out_group] if out_group else [full_out]

            def measure(w_in, w_out, n, fresh=False, module=module, name=name, expand=expand):
                return layers.layer(module, calls[n][name], w_in, w_out, expand, fresh)
            kind = "conv" if conv else "linear"
        in_step_widths = steps[in_group] if in_group else []
        out_step_widths = steps[out_group] if out_group else []
        full_in, full_out = in_widths[-1], out_widths[-1]
        by_count = len(set(_signature(calls[n].get(name)) for n in counts)) > 1  # its input follows the count
        lines = ([[(w_out, (w_in, w_out, reference)) for w_out in out_widths] for w_in in in_widths]
                 + [[(w_in, (w_in, w_out, reference)) for w_in in in_widths] for w_out in out_widths]
                 + [[(w, (w, full_out, reference)) for w in in_step_widths],
                    [(w, (full_in, w, reference)) for w in out_step_widths],
                    [(n, (full_in, full_out, n)) for n in counts] if by_count else []])
        plans.append(LayerPlan(name, kind, in_group, out_group, in_widths, out_widths, in_step_widths,
                               out_step_widths, by_count, measure, lines))
    return plans


@dataclass
class LayerTimings:
    """What :func:`time_layers` measured.

    Attributes:
        entries: the table's entries, in the order the whole model calls the layers.
        distinct: distinct timings made (repeated blocks share theirs).
        repeated: timings made again because the layer's other timings ruled them out.
    """

    entries: List[LatencyEntry]
    distinct: int
    repeated: int


def time_layers(model: nn.Module, groups, recording: ModelRecording, settings: ProfileSettings, timer: Timer,
                device: torch.device, dtype: str, image_count: int,
                say: Callable[[str], None] = lambda line: None) -> LayerTimings:
    """Time every layer :func:`plan_layers` plans with ``timer``, ``settings.passes`` times;
    ``say`` is told each layer's full-width time."""
    layers = LayerTimer(timer, device, dtype, settings.layer_repeat)
    plans = plan_layers(model, groups, recording, settings, layers, image_count)
    # every layer's timings once per pass, pass after pass (a layer's timing is the fastest of
    # its passes): a device slowed for a while by something else spoils a few layers' prices in
    # one pass, not the same layers in every pass
    repeated = 0
    for p in range(settings.passes):
        for plan in plans:
            for point in plan.points():
                plan.measure(*point, fresh=p > 0)
            repeated += retime_outliers(plan.measure, plan.lines)
        if settings.passes > 1:
            say(f"layer timings: pass {p + 1} of {settings.passes}")
    entries = []
    for plan in plans:
        entries.append(plan.entry(recording.reference, recording.counts))
        say(f"{plan.name}: {len(plan.in_widths)} x {len(plan.out_widths)} widths, "
            f"{entries[-1].ms[-1][-1]:.3f} ms at full width")
    return LayerTimings(entries, len(layers.cache), repeated)


def _signature(calls) -> tuple:
    """What of a module's recorded calls the proposal count can change: shapes, box counts."""
    if not calls:
        return ()
    if isinstance(calls[0][0], list):  # a pooler: (features, boxes)
        return tuple(len(b) for _, box_lists in calls for b in box_lists)
    return tuple(calls)
