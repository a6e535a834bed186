"""Measure a :class:`~pgp_det.latency.table.LatencyTable` on the device a detector will run on,
and check its predictions against whole-model timings of pruned copies and trained checkpoints.

:func:`profile_latency` runs the model once per proposal count on each profiling image (the
deployment's kind of images, stretched to the input size: their proposals set the ROI pooler's
work), recording every layer's input shapes and output sizes (forward hooks) and the RPN's
proposals; then times, for every conv and linear layer with a prunable channel group on an axis
(and the ROI pooler), a copy of the layer sliced to each ``(in, out)`` width of a sampled grid and
to every allowed width of each axis with the other at full width (the steps), called on random
inputs of the recorded shapes (every call one inference makes: all FPN levels of a shared head);
the whole model before and after those (the faster kept; the rest is the difference at full
width; on a CPU also its page faults per inference, see :mod:`~pgp_det.utils.allocator`, and
what cutting each group saves of the time it spends after the group's layers until the next
layer starts, which weighs the element-wise work of each group's channels, see
:func:`element_wise_ms_per_channel`); and
last, timed in turn with it round after round (:func:`time_interleaved`), the whole model at the
other proposal counts and the model pruned uniformly at a few ratios and two copies that each
cut half of the groups (:func:`contrast_cuts`), their ROI heads fed the unpruned model's
proposals, to fit the part of the rest that shrinks with the channels
(:func:`~pgp_det.latency.fit.fit_rest`).
Those enter the table as their shares of the unpruned model's time in the same rounds, so that a
drift of the device's speed while they are timed stays out.
Layers with identical settings and shapes (repeated blocks) are timed once. Every inference runs
at the full proposal budget (:func:`~pgp_det.utils.flops.full_proposal_budget`: every
``POST_NMS_TOPK_TEST`` proposal reaches the ROI heads, the worst case; on real images NMS may
leave fewer).

Times come from a *timer*: ``timer(fn) -> milliseconds`` of one ``fn()`` call (warm-up and
repetitions are the timer's business). :func:`default_timer` is the median of
:func:`~pgp_det.benchmark.timing.time_callable`; tests inject fake ones (e.g. counting FLOPs)
so that no real timing runs.
"""
import copy
import math
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.modeling.poolers import ROIPooler
from torch import nn

from ..latency.fit import fit_rest
from ..latency.table import LatencyEntry, LatencyTable
from ..pruning.allocation import allowed_kept_counts
from ..pruning.cost import uniform_sizes
from ..pruning.dependency import derive_channel_groups
from ..pruning.surgery import hard_prune
from ..utils.allocator import minor_page_faults, page_faults_per_call
from ..utils.flops import full_proposal_budget
from ..utils.modules import unwrap_model
from .timing import _check_dtype, _sync_for, environment_info, image_to_input, precision_context, synthetic_image, time_callable

__all__ = [
    "CALIBRATION_RATIOS", "Clock", "Timer", "check_latency", "contrast_cuts", "default_timer",
    "element_wise_ms_per_channel", "grid_widths", "profile_latency", "time_between_layers", "time_interleaved",
    "time_whole_model", "wall_clock_ms",
]

Timer = Callable[[Callable[[], object]], float]
Clock = Callable[[], float]
_LAYERS = (nn.Conv2d, nn.Linear)
CALIBRATION_RATIOS = (0.2, 0.45, 0.7)  # apart from --check's default ratios, so that the check tests the fit
# what a table's ``activations`` weigh a group's channels by, without and with a clock
ACTIVATION_WEIGHTS = ("elements written", "ms between layers")
CONTRAST_RATIO = 0.5  # the two contrast_cuts copies cut half the groups each, at this ratio


def default_timer(device="cpu", warmup: int = 2, runs: int = 7) -> Timer:
    """Median milliseconds of ``runs`` timed calls after ``warmup`` untimed ones (synchronising
    CUDA around each)."""
    sync = _sync_for(torch.device(device))
    return lambda fn: time_callable(fn, warmup=warmup, runs=runs, sync=sync).median


def wall_clock_ms() -> float:
    """A :data:`Clock` of the host: milliseconds, monotonic (a CPU's own work is done when read)."""
    return time.perf_counter() * 1e3


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


def _check_images(images: Optional[Sequence[np.ndarray]], input_size: Sequence[int]) -> List[np.ndarray]:
    """The images to profile on (default: one noise image), each (H, W, 3) at ``input_size``."""
    height, width = int(input_size[0]), int(input_size[1])
    images = list(images) if images is not None else [synthetic_image(height, width)]
    if not images:
        raise ValueError("no images to profile on")
    for image in images:
        if tuple(image.shape) != (height, width, 3):
            raise ValueError(f"image of shape {tuple(image.shape)} is not ({height}, {width}, 3)")
    return images


def _inputs(model: nn.Module, image: np.ndarray, device: torch.device) -> List[dict]:
    """The batch-1 model input of one (H, W, 3) BGR image."""
    return [image_to_input(image, getattr(model, "input_format", "BGR"), device)]


@contextmanager
def _pinned_proposals(model: nn.Module, proposals: Optional[list]):
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
def _inference(model: nn.Module, device, dtype: str, proposals: Optional[int] = None, pinned: Optional[list] = None):
    """How every inference here runs: no gradients, ``dtype`` on ``device``, the full budget of
    ``proposals`` proposals (:func:`~pgp_det.utils.flops.full_proposal_budget`), and the ROI heads
    fed ``pinned`` proposals when given (:func:`_pinned_proposals`)."""
    with torch.no_grad(), precision_context(dtype, device), full_proposal_budget(model), \
            _proposal_count(model, proposals), _pinned_proposals(model, pinned):
        yield


def _record_calls(model: nn.Module, inputs: List[dict], proposals: int, device, dtype):
    """One inference at ``proposals`` proposals: ``({module name: [positional inputs of each
    call]}, {module name: output elements per channel}, the RPN's proposals)`` for every conv,
    linear and ROI pooler (conv/linear: the input tensor's shape; pooler: its ``(features,
    boxes)``)."""
    calls: Dict[str, list] = {}
    elements: Dict[str, int] = {}
    recorded = []

    def count_output(module, args, output, name):
        elements[name] = elements.get(name, 0) + output.numel() // max(output.shape[1], 1)

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
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
        with _inference(model, device, dtype, proposals):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, elements, (recorded[0] if recorded else None)


def time_whole_model(model: nn.Module, input_size: Sequence[int], timer: Timer, device="cpu", dtype: str = "fp32",
                     proposals: Optional[int] = None, images: Optional[Sequence[np.ndarray]] = None,
                     pinned: Optional[Sequence[list]] = None) -> float:
    """Milliseconds of one batch-1 inference of ``model`` (eval mode, on ``device``) at the full
    proposal budget of ``proposals`` (default: the model's), averaged over ``images`` ((H, W, 3)
    BGR at ``input_size``; default one noise image). ``pinned``: per image, the proposals the
    ROI heads get instead of the model's own (:func:`_pinned_proposals`)."""
    device = torch.device(device)
    images = _check_images(images, input_size)
    total = 0.0
    for i, image in enumerate(images):
        inputs = _inputs(model, image, device)
        with _inference(model, device, dtype, proposals, pinned[i] if pinned else None):
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
    images = _check_images(images, input_size)
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
            inputs = _inputs(model, image, device)
            samples = []
            for run in range(runs + 1):
                spent.clear()
                ended[0] = None
                with _inference(model, device, dtype, proposals):
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


def element_wise_ms_per_channel(model: nn.Module, groups, axes, layer_names: Sequence[str], input_size: Sequence[int],
                                clock: Clock, device="cpu", dtype: str = "fp32", proposals: Optional[int] = None,
                                images: Optional[Sequence[np.ndarray]] = None, multiple: int = 8,
                                floor: int = 8) -> Dict[str, float]:
    """``{group: ms per channel}``: what each channel of a group costs in the element-wise work
    that follows its layers (:func:`time_between_layers`), from the model and a copy of it cut
    uniformly at :data:`CONTRAST_RATIO`: the time saved after each group's layers over the
    channels cut. Measured, not counted: elements differ in what follows them (a stem's max
    pooling, a block's sum and ReLU) and in where they are held (a high-resolution map leaves the
    caches); and the difference leaves out what follows a layer but does not shrink with its
    channels (the hooks' own time, code between modules). Groups the cut leaves whole, and
    savings below zero (noise), weigh nothing."""
    out_groups = {name: axes.get((name, 0), (None, 1))[0] for name in layer_names}
    cut = dict(uniform_sizes(groups, CONTRAST_RATIO, multiple, floor))
    full = time_between_layers(model, out_groups, input_size, clock, device, dtype, proposals, images)
    halved = time_between_layers(_pruned_copy(model, groups, cut, device), out_groups, input_size, clock, device, dtype,
                                 proposals, images)
    return {name: max(full[name] - halved.get(name, 0.0), 0.0) / (groups[name].size - cut[name])
            for name in full if name in cut and cut[name] < groups[name].size}


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


def _median_ratio(samples: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of one model's time over the reference model's in the same round."""
    return float(np.median([a / b for a, b in zip(samples, reference)]))


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


class _LayerTimer:
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


def _retime_outliers(measure: Callable[..., float], lines: Sequence[Sequence[Tuple[int, tuple]]]) -> int:
    """Time again the measurements of one layer that its other measurements rule out. Along each
    line (``[(size, point), ...]``, sizes ascending: channels on one axis or the proposal count,
    the rest fixed; ``measure(*point)`` the time), a size costing more than ``OUTLIER_SHRINK``
    times the next larger one, or the larger one more than ``OUTLIER_GROWTH`` times the size ratio
    times the smaller one: the work grows with the size, about in proportion. A device busy with
    something else for a second can make one timing tens of times too slow; :class:`_LayerTimer`
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


def _axis_groups(groups) -> Dict[Tuple[str, int], Tuple[str, int]]:
    """``{(layer, weight dim): (group name, expand)}`` for every prunable group's weight slices."""
    axes = {}
    for group in groups.values():
        if not group.prunable:
            continue
        for s in group.slices:
            if s.tensor == "weight" and s.dim in (0, 1) and s.role in ("filter", "input"):
                axes[(s.module, s.dim)] = (group.name, s.expand)
    return axes


def _pooled_group(groups) -> Optional[str]:
    """The prunable group the ROI pooler samples (read through ROIAlign), if exactly one."""
    pooled = [
        g.name for g in groups.values()
        if g.prunable and any(s.path == "roi_align" for sources in g.sources.values() for s in sources)
    ]
    return pooled[0] if len(pooled) == 1 else None


def default_proposal_counts(reference: int) -> List[int]:
    """A quarter, a half and all of the reference proposal count."""
    return sorted({max(1, round(reference * f)) for f in (0.25, 0.5, 1.0)})


def profile_latency(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    device="cpu",
    dtype: str = "fp32",
    timer: Optional[Timer] = None,
    points: int = 5,
    multiple: int = 8,
    floor: int = 8,
    proposal_counts: Optional[Sequence[int]] = None,
    layer_repeat: int = 1,
    passes: int = 1,
    images: Optional[Sequence[np.ndarray]] = None,
    calibration_ratios: Sequence[float] = CALIBRATION_RATIOS,
    contrast: bool = True,
    whole_timer: Optional[Timer] = None,
    rounds: int = 1,
    clock: Optional[Clock] = None,
    metadata: Optional[Mapping] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> LatencyTable:
    """Measure ``model``'s latency table on ``device`` (see the module docstring).

    Args:
        model: an unpruned detectron2 ``GeneralizedRCNN``; moved to ``device``, eval mode.
        input_size: (height, width) of the image fed without resizing, pixels.
        dtype: ``"fp32"``, or ``"fp16"`` (CUDA autocast, CUDA only).
        timer: ``fn -> ms``; default :func:`default_timer`.
        points: grid widths per axis (at most; :func:`grid_widths`), >= 2.
        multiple, floor: the widths pruning may produce (``PRUNING.CHANNEL_MULTIPLE``,
            ``MIN_CHANNELS``): the grid is sampled from them.
        proposal_counts: RPN ``POST_NMS_TOPK_TEST`` values to time the proposal-dependent parts
            at; the model's own is always added (the grid's reference). Default:
            :func:`default_proposal_counts`.
        layer_repeat: a layer's calls are repeated this many times per timed sample (and the
            time divided): more than 1 on a GPU hides the per-sample synchronisation.
        passes: every layer timing is made this many times, in passes through all the layers,
            and the fastest kept: on a device that other work slows down for seconds at a time,
            more than 1 keeps those seconds out of the layers' relative prices.
        images: (H, W, 3) uint8 BGR images at ``input_size`` to profile on; times are means
            over them. Their proposals set the ROI pooler's work (its sampling grid follows the
            boxes' sizes), so images like the deployment's give a truer table. Default: one
            noise image.
        calibration_ratios: uniform pruning ratios of the copies whose whole-model timings fit
            the part of the rest that shrinks with the channels (:func:`~pgp_det.latency.fit.fit_rest`);
            empty: no fit (the rest stays fixed).
        contrast: with ``calibration_ratios``, also time the two :func:`contrast_cuts` copies,
            which keep the fit's two parts apart.
        whole_timer, rounds: the unpruned model at the other proposal counts and the
            calibration copies are timed against the unpruned model at the reference count in
            ``rounds`` interleaved rounds (:func:`time_interleaved`), each once a round with
            ``whole_timer`` (default ``timer``), and enter the table as shares of its time.
        clock: what the element-wise work a group's pruning shrinks is weighed by (the table's
            ``activations``): with a clock (:func:`wall_clock_ms` on a CPU), what cutting the
            group saves of the time the whole model spends after its layers
            (:func:`element_wise_ms_per_channel`); without, the activation elements the group's
            layers write (on a CUDA device, where hooks cannot time that work without
            synchronising it).
        metadata: recorded in the table besides the environment (config, weights, ...).
        progress: called with a line of progress now and then.

    Returns:
        the :class:`LatencyTable`; ``metadata["profile_seconds"]`` says how long it took.
    """
    started = time.perf_counter()
    device = torch.device(device)
    _check_dtype(dtype, device)
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    images = _check_images(images, input_size)
    say = progress or (lambda line: None)
    timer = timer or default_timer(device)
    model = unwrap_model(model).to(device).eval()
    groups = derive_channel_groups(model, allow_frozen=True)
    axes = _axis_groups(groups)
    pooled = _pooled_group(groups)
    reference = int(model.proposal_generator.post_nms_topk[False])
    counts = sorted(set(int(n) for n in (proposal_counts or default_proposal_counts(reference))) | {reference})
    inputs = [_inputs(model, image, device) for image in images]

    # per proposal count: the first image's layer calls (shapes do not change across images of one
    # size), every image's pooler calls, and every image's proposals
    calls, pooler_calls, proposals = {}, {}, {}
    elements: Dict[str, int] = {}
    for n in counts:
        recorded = [_record_calls(model, x, n, device, dtype) for x in inputs]
        calls[n] = recorded[0][0]
        pooler_calls[n] = {name: [c for r in recorded for c in r[0].get(name, [])]
                           for name, module in model.named_modules() if isinstance(module, ROIPooler)}
        proposals[n] = [r[2] for r in recorded]
        if n == reference:
            elements = recorded[0][1]
    steps = {name: allowed_kept_counts(g.size, multiple, floor, g.channel_multiple)
             for name, g in groups.items() if g.prunable}
    grids = {name: grid_widths(g.size, points, multiple, floor, g.channel_multiple)
             for name, g in groups.items() if g.prunable}
    before = time_whole_model(model, input_size, timer, device, dtype, reference, images)
    layers = _LayerTimer(timer, device, dtype, layer_repeat)
    modules = dict(model.named_modules())
    activations: Dict[str, float] = {}
    plans = []
    for name in calls[reference]:
        module = modules[name]
        if isinstance(module, ROIPooler):
            if pooled is None:
                continue
            in_group, out_group, expand = pooled, None, 1
            in_widths, out_widths = grids[pooled], [groups[pooled].size]

            def measure(w_in, w_out, n, fresh=False, module=module, name=name):
                return layers.pooler(module, pooler_calls[n][name], w_in, per=len(images), fresh=fresh)
            kind = "roi_pooler"
        else:
            in_group, expand = axes.get((name, 1), (None, 1))
            out_group, _ = axes.get((name, 0), (None, 1))
            if out_group is not None:
                activations[out_group] = activations.get(out_group, 0) + elements.get(name, 0)
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
        plans.append((name, kind, in_group, out_group, in_widths, out_widths, in_step_widths, out_step_widths,
                      by_count, measure, lines))

    # every layer's timings once per pass, pass after pass (a layer's timing is the fastest of
    # its passes): a device slowed for a while by something else spoils a few layers' prices in
    # one pass, not the same layers in every pass
    repeated = 0
    for p in range(passes):
        for *_, measure, lines in plans:
            for point in dict.fromkeys(point for line in lines for _, point in line):
                measure(*point, fresh=p > 0)
            repeated += _retime_outliers(measure, lines)
        if passes > 1:
            say(f"layer timings: pass {p + 1} of {passes}")
    entries: List[LatencyEntry] = []
    for (name, kind, in_group, out_group, in_widths, out_widths, in_step_widths, out_step_widths, by_count, measure,
         _) in plans:
        full_in, full_out = in_widths[-1], out_widths[-1]
        ms = [[measure(w_in, w_out, reference) for w_out in out_widths] for w_in in in_widths]
        in_steps = tuple((w, measure(w, full_out, reference)) for w in in_step_widths)
        out_steps = tuple((w, measure(full_in, w, reference)) for w in out_step_widths)
        proposal_ms = [measure(full_in, full_out, n) for n in counts] if by_count else None
        entries.append(LatencyEntry(name, kind, in_group, out_group, tuple(in_widths), tuple(out_widths),
                                    tuple(tuple(row) for row in ms), None if proposal_ms is None else tuple(proposal_ms),
                                    in_steps, out_steps))
        say(f"{name}: {len(in_widths)} x {len(out_widths)} widths, {ms[-1][-1]:.3f} ms at full width")

    if clock is not None:
        activations = element_wise_ms_per_channel(model, groups, axes, list(calls[reference]), input_size, clock,
                                                  device, dtype, reference, images, multiple, floor)
    environment = environment_info(device)
    info = {
        "device_name": environment["device_name"],
        "device_kind": device.type,
        "num_threads": environment["num_threads"],
        "precision": dtype,
        "torch": environment["torch"],
        "torchvision": environment["torchvision"],
        "detectron2": environment["detectron2"],
        "cuda": environment["cuda"],
        "environment": environment,
        "grid_points": points,
        "channel_multiple": multiple,
        "min_channels": floor,
        "layer_repeat": layer_repeat,
        "images": len(images),
        "layer_passes": passes,
        "activation_weights": ACTIVATION_WEIGHTS[clock is not None],
        "distinct_layer_timings": len(layers.cache),
        "repeated_layer_timings": repeated,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
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
    others = [n for n in counts if n != reference]
    sizes = {name: g.size for name, g in groups.items()}
    activations = {k: float(v) for k, v in activations.items() if v > 0}
    copies = []
    if calibration_ratios:
        cuts = _uniform_cuts(groups, calibration_ratios, multiple, floor)
        if contrast:
            layers_only = LatencyTable(sizes, input_size, entries, counts, [0.0] * len(counts), reference, info,
                                       activations=activations)
            halves = contrast_cuts(layers_only, dict(uniform_sizes(groups, CONTRAST_RATIO, multiple, floor)))
            cuts += [({"ratio": CONTRAST_RATIO, **label}, widths) for label, widths in halves]
        copies = [(label, widths, _pruned_copy(model, groups, widths, device)) for label, widths in cuts]
    unpruned, at_others, at_copies = [whole], [], []
    if others or copies:
        jobs = [(model, None)] * (1 + len(others)) + [(c, proposals[reference]) for _, _, c in copies]
        samples = time_interleaved(jobs, input_size, whole_timer or timer, rounds, device, dtype,
                                   [reference] + others + [reference] * len(copies), images)
        unpruned, at_others, at_copies = samples[0], samples[1:1 + len(others)], samples[1 + len(others):]
    shares = {reference: 1.0, **{n: _median_ratio(s, unpruned) for n, s in zip(others, at_others)}}
    fixed = []
    for j, n in enumerate(counts):
        layers_ms = sum(e.ms[-1][-1] if e.proposal_ms is None else e.proposal_ms[j] for e in entries)
        fixed.append(shares[n] * whole - layers_ms)
        say(f"whole model at {n} proposals: {shares[n] * whole:.3f} ms ({layers_ms:.3f} ms in the measured layers)")
    table = LatencyTable(sizes, input_size, entries, counts, fixed, reference, info, activations=activations)
    if copies:
        # the copies' ROI heads get the unpruned model's proposals (a copy pruned without training
        # proposes other boxes, and the pooler's work follows their sizes); each enters the fit as
        # its share of the unpruned model's time in the same rounds, times the time above
        rows = [{**label, "widths": widths, "relative": _median_ratio(measured, unpruned)}
                for (label, widths, _), measured in zip(copies, at_copies)]
        del copies
        table = fit_rest(table, [(row["widths"], row["relative"] * whole) for row in rows])
        table.metadata["calibration"] = [
            {**row, "measured_ms": row["relative"] * whole,
             "widths": {name: kept for name, kept in row["widths"].items() if kept < groups[name].size}}
            for row in rows]
        hidden = (f" (only {1.0 + table.layer_overhead:.0%} of the layers' own savings show in the whole model: "
                  f"the device hides the rest)") if table.layer_overhead < 0 else ""
        say(f"rest shrinking with the channels: {table.activation_ms:.3f} ms of element-wise work, "
            f"layer overhead {table.layer_overhead:.3f}{hidden}")
    table.metadata["profile_seconds"] = time.perf_counter() - started
    return table


def _pruned_copy(model: nn.Module, groups, widths: Mapping[str, int], device) -> nn.Module:
    """A copy of ``model`` whose groups keep their first ``widths[name]`` channels (latency does
    not depend on which), on ``device`` in eval mode."""
    pruned = copy.deepcopy(model)
    removals = {name: list(range(kept, groups[name].size)) for name, kept in widths.items() if kept < groups[name].size}
    if removals:
        hard_prune(pruned, removals, allow_frozen=True, groups=derive_channel_groups(pruned, allow_frozen=True))
    return pruned.to(device).eval()


def _uniform_cuts(groups, ratios: Sequence[float], multiple: int, floor: int) -> List[Tuple[dict, Dict[str, int]]]:
    """``[({"ratio": ratio}, widths)]``: every prunable group, frozen ones too, cut uniformly at
    each ratio (it keeps ``kept_count(size, ratio, multiple, floor)`` channels)."""
    return [({"ratio": float(ratio)}, dict(uniform_sizes(groups, float(ratio), multiple, floor))) for ratio in ratios]


def contrast_cuts(table: LatencyTable, uniform_cut: Mapping[str, int]) -> List[Tuple[dict, Dict[str, int]]]:
    """Two calibration cuts that tell the rest's two parts apart: ``[(label, widths)]``, each
    cutting half of the groups as ``uniform_cut`` (``{group: kept}``) does; none when ``table``
    counts no activations or fewer than two groups are cut.

    Uniformly pruned copies shrink the element-wise work between the layers and the layers' own
    times nearly in step, so their timings alone cannot say which of the two the rest follows:
    profiles of one device then flip between ``activation_ms`` and ``layer_overhead``. Here each
    group is ranked by the element-wise work its cut alone removes (share of all, by the
    table's ``activations``) over the layer time it saves (ms, ``table``'s entries); one copy
    cuts the half with the most element-wise work per layer time, the other copy the rest.
    """
    cut = {name: kept for name, kept in uniform_cut.items() if kept < table.groups[name]}
    if not table.activations or len(cut) < 2:
        return []
    full = table.predict()

    def element_wise_per_layer_ms(name: str) -> float:
        elements = 1.0 - table.activation_fraction({name: cut[name]})
        return elements / max(full - table.predict({name: cut[name]}), 1e-9)

    ranked = sorted(cut, key=element_wise_per_layer_ms, reverse=True)
    half = len(ranked) // 2
    return [({"half": "element-wise"}, {name: cut[name] for name in ranked[:half]}),
            ({"half": "layers"}, {name: cut[name] for name in ranked[half:]})]


def _signature(calls) -> tuple:
    """What of a module's recorded calls the proposal count can change: shapes, box counts."""
    if not calls:
        return ()
    if isinstance(calls[0][0], list):  # a pooler: (features, boxes)
        return tuple(len(b) for _, box_lists in calls for b in box_lists)
    return tuple(calls)


def check_latency(
    model: nn.Module,
    table: LatencyTable,
    ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    *,
    trained: Optional[Mapping[str, nn.Module]] = None,
    device="cpu",
    dtype: str = "fp32",
    timer: Optional[Timer] = None,
    rounds: int = 1,
    multiple: int = 8,
    floor: int = 8,
    images: Optional[Sequence[np.ndarray]] = None,
) -> List[dict]:
    """Predicted against measured latency of ``model`` (the table's unpruned model) pruned
    uniformly at each ratio, its ROI heads fed the unpruned model's proposals on each image, and
    of ``trained`` models of the table's architecture (pruned checkpoints, at their own widths and
    with their own proposals: what a user will see). All are timed whole on ``images`` (default:
    one noise image; give the table's) at the table's input size and reference proposal count,
    interleaved with ``model`` itself over ``rounds`` rounds (:func:`time_interleaved`; ``timer``
    times one model once a round), so that each is also measured relative to the unpruned model
    on the device as it is in that round.

    Returns:
        one row per ratio (``"ratio"``), then per trained model (``"label"``): ``"widths"``,
        ``"predicted_ms"``, ``"measured_ms"`` (median over rounds), ``"error_percent"`` (``100
        (predicted - measured) / measured``), ``"unpruned_ms"`` (``model`` in the same rounds),
        ``"relative"`` (median over rounds of the model's time over the unpruned model's),
        ``"predicted_relative"`` (over the table's unpruned prediction) and
        ``"relative_error_percent"``: the error left when the device runs faster or slower as a
        whole than when it was profiled.
    """
    device = torch.device(device)
    timer = timer or default_timer(device)
    model = unwrap_model(model).to(device).eval()
    images = _check_images(images, table.input_size)
    reference = table.reference_proposals
    pinned = [_record_calls(model, _inputs(model, image, device), reference, device, dtype)[2] for image in images]
    groups = derive_channel_groups(model, allow_frozen=True)
    copies = [(label, widths, _pruned_copy(model, groups, widths, device))
              for label, widths in _uniform_cuts(groups, ratios, multiple, floor)]
    others = [(label, unwrap_model(m).to(device).eval()) for label, m in (trained or {}).items()]
    rows = [{**label, "widths": widths} for label, widths, _ in copies]
    rows += [{"label": label, "widths": {name: g.size for name, g in derive_channel_groups(m, allow_frozen=True).items()}}
             for label, m in others]
    jobs = [(model, None)] + [(c, pinned) for _, _, c in copies] + [(m, None) for _, m in others]
    samples = time_interleaved(jobs, table.input_size, timer, rounds, device, dtype, reference, images)
    unpruned_ms = float(np.median(samples[0]))
    full = table.predict(proposals=reference)
    for row, measured in zip(rows, samples[1:]):
        predicted = table.predict(row["widths"], proposals=reference)
        relative = _median_ratio(measured, samples[0])
        row.update(predicted_ms=predicted, measured_ms=float(np.median(measured)), unpruned_ms=unpruned_ms,
                   relative=relative, predicted_relative=predicted / full)
        row["error_percent"] = 100.0 * (predicted - row["measured_ms"]) / row["measured_ms"]
        row["relative_error_percent"] = 100.0 * (predicted / full - relative) / relative
    return rows
