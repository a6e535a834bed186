"""The latency model: a detector's latency on one device predicted for any channel widths, from a
lookup table measured on that device (``tools/profile_latency.py``, :mod:`pgp_det.benchmark.latency.profile`).

A :class:`LatencyTable` predicts, in milliseconds of batch-1 inference at one input size,

    latency(widths, n) = fixed(n) - rest_saved(widths) + sum over entries e of  t_e(w_in, w_out) * s_e(n)

* an *entry* is one layer whose cost changes with pruning: a conv or linear layer with a
  prunable channel group on its input or output axis, or the ROI pooler (its cost grows with the
  channels it samples). ``t_e`` is measured on a grid of widths, ``in_widths x out_widths``
  (multiples of ``PRUNING.ROUNDING.MULTIPLE``, a handful per axis, the full width the last), at
  the layer's own input shapes, and interpolated bilinearly between grid points (linearly
  extrapolated below the smallest, never above the full width). An axis without a prunable group
  has one grid point: the layer's width there never changes. Devices compute channels in blocks
  (a CPU's vector holds 16 floats: 40 channels cost what 48 do), which a coarse grid cannot see,
  so every allowed width of each axis is also timed with the other axis at full width (the
  *steps*), and the bilinear value is scaled, per axis, by the step's time over the bilinear
  value at that width (1 at the grid's points).
* ``n`` is the RPN's test-time proposal count (``MODEL.RPN.POST_NMS_TOPK_TEST``). Entries whose
  input depends on it (ROI pooler, box head, box predictor; a C4 model's ``res5``) were also timed
  at full width at each profiled count; ``s_e(n)`` is that time over the time at the reference
  count (the config's, where the grid was measured), interpolated linearly in ``n``.
* ``fixed(n)`` is the rest of the model at full width, measured as the whole model's latency
  minus the entries' full-width times at each profiled count: preprocessing, element-wise ops
  outside the layers (ReLUs, residual sums, FPN's upsampling), anchor generation, proposal
  selection and NMS, box decoding and per-class NMS, post-processing. It may be negative on a GPU,
  where timing a layer alone includes launch and synchronisation overhead that overlaps in the
  whole model.
* ``rest_saved(widths)`` is the part of that rest which shrinks with the channels:

      rest_saved = activation_ms * (1 - A(widths) / A(full)) + layer_overhead * (L(full) - L(widths))

  ``A`` weighs the element-wise work between the layers: ``activations[g]`` per channel of group
  ``g``, times its kept channels. On a CPU ``activations[g]`` is measured in the whole model: the
  time it spends after ``g``'s layers until the next layer starts, less that time in a copy cut
  uniformly in half, per channel cut (a stem's max pooling over a high-resolution map costs far
  more per element than a block's sum at a coarse one); on a GPU, where that cannot be timed
  without synchronising, the activation elements per channel those layers write
  (``metadata["activation_weights"]`` says which). ``L`` is the sum of the conv and
  linear entries' times: a layer inside the whole model costs ``1 + layer_overhead`` times its
  time alone (cold caches, the activation that follows). The two coefficients are fitted, by
  non-negative least squares (:func:`pgp_det.latency.fit.fit_rest`), to whole-model timings of
  pruned copies made while profiling: uniformly pruned ones, and two that each cut half of the
  groups, chosen so that one saves
  mostly element-wise work and the other mostly layer time (uniform copies alone shrink both in
  step and cannot tell the two coefficients apart). Zero: the rest does not shrink. Where the
  copies save less than their layers' own times (a GPU at batch 1, whose kernels run while the
  host is still launching the next ones, so that shorter kernels leave it waiting on the host),
  no non-negative pair fits; then ``activation_ms`` is 0 and ``layer_overhead`` is fitted alone
  in ``[-1, 0)``: a layer's saving shows as ``1 + layer_overhead`` of its time alone, none of it
  at -1.

Tables carry what they were measured with (device name and kind, threads, precision, software
versions, input size) and the architecture they fit (every channel group's name and original
width); :meth:`LatencyTable.check_compatible` refuses a table made for another architecture,
input size or device kind with one line. A table only predicts: it is built valid
(:func:`pgp_det.latency.schema.check_table`), read and written as JSON by :mod:`pgp_det.latency.io`,
merged from several profiles by :mod:`pgp_det.latency.merge`.
"""
import bisect
import copy
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import PruningRequestError, UserInputError
from .page_faults import profiled_with_freed_memory_kept
from .schema import check_table

__all__ = ["LatencyEntry", "LatencyTable"]


def _axis_position(grid: Sequence[int], width: float) -> Tuple[int, int, float]:
    """``(i, j, t)`` such that ``width = (1 - t) grid[i] + t grid[j]``: the grid segment holding
    ``width`` (the first one below the grid: linear extrapolation); one point: ``(0, 0, 0)``."""
    if len(grid) == 1:
        return 0, 0, 0.0
    j = min(max(bisect.bisect_left(grid, width), 1), len(grid) - 1)
    i = j - 1
    return i, j, (width - grid[i]) / (grid[j] - grid[i])


def _interpolate_1d(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through the points, linearly extrapolated outside them."""
    i, j, t = _axis_position(xs, x)
    return (1.0 - t) * ys[i] + t * ys[j]


@dataclass(frozen=True)
class LatencyEntry:
    """One measured layer of a :class:`LatencyTable`.

    Attributes:
        name: the module's qualified name (``backbone.bottom_up.res3.0.conv1``,
            ``roi_heads.box_pooler``).
        kind: ``"conv"``, ``"linear"`` or ``"roi_pooler"``.
        in_group, out_group: the prunable channel group on the input / output axis, or None
            (the axis keeps its width). The ROI pooler has only ``in_group``: the channels it
            samples.
        in_widths, out_widths: the grid (channels, ascending; the last is the full width).
        ms: ``ms[i][j]`` = milliseconds of the layer's calls in one inference (all FPN levels of
            a shared head) with ``in_widths[i]`` input and ``out_widths[j]`` output channels, at
            the table's reference proposal count.
        proposal_ms: for layers whose input depends on the proposal count: milliseconds at full
            width at each of the table's ``proposal_counts``; None otherwise.
        in_steps, out_steps: ``((width, ms), ...)`` ascending: the layer at every allowed width of
            that axis, the other at full width (empty: not measured, no scaling).
    """

    name: str
    kind: str
    in_group: Optional[str]
    out_group: Optional[str]
    in_widths: Tuple[int, ...]
    out_widths: Tuple[int, ...]
    ms: Tuple[Tuple[float, ...], ...]
    proposal_ms: Optional[Tuple[float, ...]] = None
    in_steps: Tuple[Tuple[int, float], ...] = ()
    out_steps: Tuple[Tuple[int, float], ...] = ()

    def bilinear(self, in_width: float, out_width: float) -> float:
        """Bilinear interpolation of :attr:`ms` at ``(in_width, out_width)`` channels: exact at
        grid points, linear along each axis between them (extrapolated below the grid)."""
        i0, i1, ti = _axis_position(self.in_widths, in_width)
        o0, o1, to = _axis_position(self.out_widths, out_width)
        m = self.ms
        return ((1.0 - ti) * ((1.0 - to) * m[i0][o0] + to * m[i0][o1])
                + ti * ((1.0 - to) * m[i1][o0] + to * m[i1][o1]))

    @staticmethod
    def _step_factor(steps, width: float, smooth: float) -> float:
        if not steps or smooth <= 0:
            return 1.0
        measured = _interpolate_1d([w for w, _ in steps], [ms for _, ms in steps], width)
        return max(measured, 0.0) / smooth

    def at(self, in_width: float, out_width: float) -> float:
        """Milliseconds at ``(in_width, out_width)`` channels: :meth:`bilinear` scaled by each
        axis' step factor (exact at every measured step and grid point)."""
        full_in, full_out = self.in_widths[-1], self.out_widths[-1]
        return (self.bilinear(in_width, out_width)
                * self._step_factor(self.in_steps, in_width, self.bilinear(in_width, full_out))
                * self._step_factor(self.out_steps, out_width, self.bilinear(full_in, out_width)))


class LatencyTable:
    """Latency of one detector architecture on one device, predicted for any channel widths (see
    the module docstring). Example::

        table = load_table("table.json")  # pgp_det.latency.io
        table.check_compatible(derive_channel_groups(model), (800, 1333), "cuda")
        table.predict({"backbone.fpn.out": 128})  # ms with FPN outputs halved

    Attributes:
        groups: ``{group name: original width}`` of every channel group: the architecture.
        input_size: (height, width) of the image the model was timed on, pixels.
        entries: the measured layers.
        proposal_counts: proposal counts profiled (ascending); ``fixed_ms`` holds the rest of
            the model at each.
        reference_proposals: the count the grids were measured at (one of ``proposal_counts``).
        metadata: ``device_name``, ``device_kind`` (``cpu``/``cuda``), ``num_threads``,
            ``precision`` (``fp32``/``fp16``), ``torch``/``torchvision``/``detectron2`` versions,
            and whatever else the profiler recorded (seconds it took, timing settings, checks, page
            faults: :mod:`pgp_det.latency.page_faults`).
        source: the file it was loaded from ("" when built in memory).
        proposals: the proposal count :meth:`predict` uses when none is given (default: the
            reference; :meth:`with_proposals` makes a copy with another).
        activations: ``{group name: weight per channel of the element-wise work that follows
            its layers}`` in one inference (ms between layers, or the elements they write: see the
            module docstring), relative: only ``A(widths) / A(full)`` uses them; groups not named
            have none.
        activation_ms, layer_overhead: the coefficients of ``rest_saved`` (module docstring):
            ms of element-wise work at full width, and the in-model overhead per ms of layer time
            (``>= -1``; negative where the device hides part of the layers' time).
    """

    def __init__(self, groups: Mapping[str, int], input_size: Sequence[int], entries: Sequence[LatencyEntry],
                 proposal_counts: Sequence[int], fixed_ms: Sequence[float], reference_proposals: int,
                 metadata: Optional[Mapping[str, Any]] = None, source: str = "",
                 activations: Optional[Mapping[str, float]] = None, activation_ms: float = 0.0,
                 layer_overhead: float = 0.0):
        self.groups: Dict[str, int] = {str(k): int(v) for k, v in groups.items()}
        self.input_size: Tuple[int, int] = (int(input_size[0]), int(input_size[1]))
        self.entries: Tuple[LatencyEntry, ...] = tuple(entries)
        self.proposal_counts: Tuple[int, ...] = tuple(int(n) for n in proposal_counts)
        self.fixed_ms: Tuple[float, ...] = tuple(float(v) for v in fixed_ms)
        self.reference_proposals = int(reference_proposals)
        self.metadata: Dict[str, Any] = dict(metadata or {})
        self.source = source
        self.proposals = self.reference_proposals
        self.activations: Dict[str, float] = {str(k): float(v) for k, v in (activations or {}).items()}
        self.activation_ms = float(activation_ms)
        self.layer_overhead = float(layer_overhead)
        check_table(self)  # from a file or in memory: a table that exists is a consistent one

    def check_compatible(self, model_groups: Mapping[str, Any], input_size: Sequence[int],
                         device_kind: Optional[str] = None) -> None:
        """Refuse to predict for a model this table was not made for.

        Args:
            model_groups: ``{group name: ChannelGroup or width}`` of the model at its *original*
                widths (e.g. :func:`~pgp_det.pruning.dependency.derive_channel_groups` before
                pruning).
            input_size: (height, width) the latency is wanted at.
            device_kind: ``"cpu"`` or ``"cuda"``, the kind of device the model will run on;
                None or ``""``: any.

        Raises:
            UserInputError: one line naming the first difference (architecture, input size or
                device kind) and the fix.
        """
        where = f"latency table {self.source}" if self.source else "the latency table"
        fix = "profile this model with tools/profile_latency.py"
        widths = {name: int(getattr(g, "size", g)) for name, g in model_groups.items()}
        missing = [name for name in self.groups if name not in widths]
        extra = [name for name in widths if name not in self.groups]
        if missing or extra:
            what = (f"it has channel group {missing[0]}, which this model lacks" if missing
                    else f"this model has channel group {extra[0]}, which the table lacks")
            raise UserInputError(f"{where} was made for another architecture: {what}; {fix}")
        for name, width in self.groups.items():
            if widths[name] != width:
                raise UserInputError(
                    f"{where} was made for another architecture: channel group {name} has {width} channels there and "
                    f"{widths[name]} in this model; {fix}"
                )
        height, width = (int(v) for v in input_size)
        if (height, width) != self.input_size:
            raise UserInputError(
                f"{where} was measured at {self.input_size[0]}x{self.input_size[1]}, not at the {height}x{width} asked "
                f"for; ask for {self.input_size[0]}x{self.input_size[1]} or profile at {height}x{width}"
            )
        if device_kind and device_kind != self.device_kind:
            raise UserInputError(
                f"{where} was measured on a {self.device_kind} device ({self.metadata.get('device_name', '?')}), "
                f"not on {device_kind}; profile on the {device_kind} device the model will run on"
            )

    # -- prediction -------------------------------------------------------------------------------

    @property
    def device_kind(self) -> str:
        return self.metadata["device_kind"]

    def with_proposals(self, proposals: int) -> "LatencyTable":
        """A copy whose :meth:`predict` uses ``proposals`` (RPN ``POST_NMS_TOPK_TEST``) by default."""
        if isinstance(proposals, bool) or not isinstance(proposals, numbers.Integral) or proposals < 1:
            raise PruningRequestError(f"proposal count must be an integer >= 1, got {proposals!r}")
        result = copy.copy(self)
        result.proposals = int(proposals)
        return result

    def _widths(self, widths: Optional[Mapping[str, int]]) -> Dict[str, int]:
        result = dict(self.groups)
        for name, kept in (widths or {}).items():
            if name not in self.groups:
                known = ", ".join(list(self.groups)[:4])
                raise PruningRequestError(f"unknown channel group {name!r} (groups are named like {known}, ...)")
            if isinstance(kept, bool) or not isinstance(kept, numbers.Integral) or not 1 <= kept <= self.groups[name]:
                raise PruningRequestError(
                    f"{name}: cannot predict the latency of {kept!r} channels; use an integer in 1..{self.groups[name]}"
                )
            result[name] = int(kept)
        return result

    def _scales(self, proposals: int) -> Tuple[float, List[float]]:
        """``(fixed(n), [s_e(n) per entry])``."""
        counts = self.proposal_counts
        reference = counts.index(self.reference_proposals)
        fixed = _interpolate_1d(counts, self.fixed_ms, proposals)
        scales = []
        for e in self.entries:
            if e.proposal_ms is None or e.proposal_ms[reference] <= 0:
                scales.append(1.0)
            else:
                scales.append(max(_interpolate_1d(counts, e.proposal_ms, proposals), 0.0) / e.proposal_ms[reference])
        return fixed, scales

    def _entry_times(self, kept: Mapping[str, int], scales: Sequence[float]) -> Dict[str, float]:
        result = {}
        for e, scale in zip(self.entries, scales):
            w_in = kept[e.in_group] if e.in_group else e.in_widths[0]
            w_out = kept[e.out_group] if e.out_group else e.out_widths[0]
            result[e.name] = max(e.at(w_in, w_out), 0.0) * scale
        return result

    def layer_sum(self, times: Mapping[str, float]) -> float:
        """``L``: the conv and linear entries' milliseconds."""
        return sum(times[e.name] for e in self.entries if e.kind != "roi_pooler")

    def activation_fraction(self, widths: Optional[Mapping[str, int]] = None) -> float:
        """``A(widths) / A(full)``: the fraction of the element-wise work kept (1 without activations)."""
        kept = self._widths(widths)
        full = sum(count * self.groups[name] for name, count in self.activations.items())
        if full <= 0:
            return 1.0
        return sum(count * kept[name] for name, count in self.activations.items()) / full

    def breakdown(self, widths: Optional[Mapping[str, int]] = None, proposals: Optional[int] = None) -> Dict[str, float]:
        """``{"fixed": ms, "rest_saved": -ms, entry name: ms, ...}`` at ``widths`` (see
        :meth:`predict`); the values sum to the prediction."""
        kept = self._widths(widths)
        fixed, scales = self._scales(self.proposals if proposals is None else proposals)
        times = self._entry_times(kept, scales)
        saved = self.activation_ms * (1.0 - self.activation_fraction(kept))
        if self.layer_overhead:  # the full-width times are needed only then (the knapsack predicts often)
            layers_saved = self.layer_sum(self._entry_times(self.groups, scales)) - self.layer_sum(times)
            saved += self.layer_overhead * max(layers_saved, 0.0)
        return {"fixed": fixed, "rest_saved": -saved, **times}

    def predict(self, widths: Optional[Mapping[str, int]] = None, proposals: Optional[int] = None) -> float:
        """Predicted milliseconds of one batch-1 inference at the table's input size.

        Args:
            widths: ``{group: channels kept}``; groups not named keep their original width.
            proposals: RPN ``POST_NMS_TOPK_TEST``; default :attr:`proposals` (the reference
                count unless :meth:`with_proposals` changed it). Outside the profiled counts the
                proposal-dependent parts are extrapolated linearly.

        Raises:
            PruningRequestError: an unknown group, or a width outside ``1 .. original``.
        """
        return sum(self.breakdown(widths, proposals).values())

    @property
    def full_ms(self) -> float:
        """Predicted latency of the unpruned model (at :attr:`proposals`)."""
        return self.predict()

    def describe(self) -> str:
        """One line: device, kind, precision, threads (freed memory kept or not), input size."""
        m = self.metadata
        kept = ", freed memory kept" if profiled_with_freed_memory_kept(m) else ""
        return (f"{m.get('device_name', '?')} ({self.device_kind}, {m.get('precision', '?')}, "
                f"{m.get('num_threads', '?')} threads{kept}) at {self.input_size[0]}x{self.input_size[1]}")
