"""The latency model: a detector's latency on one device predicted for any channel widths, from a
lookup table measured on that device (``tools/profile_latency.py``).

A :class:`LatencyTable` predicts, in milliseconds of batch-1 inference at one input size,

    latency(widths, n) = fixed(n) - rest_saved(widths) + sum over entries e of  t_e(w_in, w_out) * s_e(n)

* an *entry* is one layer whose cost changes with pruning: a conv or linear layer with a
  prunable channel group on its input or output axis, or the ROI pooler (its cost grows with the
  channels it samples). ``t_e`` is measured on a grid of widths, ``in_widths x out_widths``
  (multiples of ``PRUNING.CHANNEL_MULTIPLE``, a handful per axis, the full width the last), at
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
  non-negative least squares, to whole-model timings of pruned copies made while profiling:
  uniformly pruned ones, and two that each cut half of the groups, chosen so that one saves
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
input size or device kind with one line. Several profiles of one model on one device merge into a
steadier table (:func:`merge_tables`). They are JSON files (:meth:`LatencyTable.save`,
:meth:`LatencyTable.load`); measuring them is :mod:`pgp_det.benchmark.latency_profile`'s job.
"""
import bisect
import copy
import json
import math
import numbers
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import UserInputError
from ..utils.allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT, MANY_PAGE_FAULTS
from ..utils.io import atomic_write_json
from .groups import ChannelGroup, PruningRequestError

__all__ = [
    "DEVICE_KINDS", "LatencyEntry", "LatencyTable", "TABLE_FORMAT", "TABLE_VERSION", "fit_rest", "latency_reduction",
    "merge_tables", "target_latency_ms",
]

TABLE_FORMAT = "pgp_det latency table"
TABLE_VERSION = 2
DEVICE_KINDS = ("cpu", "cuda")
ENTRY_KINDS = ("conv", "linear", "roi_pooler")


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

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "in_group": self.in_group, "out_group": self.out_group,
            "in_widths": list(self.in_widths), "out_widths": list(self.out_widths),
            "ms": [list(row) for row in self.ms],
            "proposal_ms": None if self.proposal_ms is None else list(self.proposal_ms),
            "in_steps": [list(step) for step in self.in_steps],
            "out_steps": [list(step) for step in self.out_steps],
        }


def target_latency_ms(target_ms: float = 0.0, target_fps: float = 0.0) -> float:
    """The latency budget in milliseconds from exactly one of a latency (ms) and a frame rate
    (frames per second of batch-1 inference: ``1000 / fps`` ms).

    Raises:
        UserInputError: both or neither positive, or a negative value.
    """
    for label, value in (("latency", target_ms), ("frame rate", target_fps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise UserInputError(f"target {label} {value!r} must be a number >= 0")
    if (target_ms > 0) == (target_fps > 0):
        raise UserInputError(
            f"give exactly one latency target: a latency in ms or a frame rate, not {'both' if target_ms > 0 else 'neither'}"
        )
    return float(target_ms) if target_ms > 0 else 1000.0 / float(target_fps)


def latency_reduction(table: "LatencyTable", target_ms: float) -> float:
    """The fraction of the unpruned model's predicted latency (at ``table.proposals``) a target
    of ``target_ms`` removes, in (0, 1).

    Raises:
        PruningRequestError: the target is not below the unpruned model's prediction.
    """
    full = table.predict()
    if not 0 < target_ms < full:
        raise PruningRequestError(
            f"target latency {target_ms:.4g} ms is not below the unpruned model's {full:.4g} ms predicted on "
            f"{table.describe()} at {table.proposals} proposals: nothing to prune; lower the target"
        )
    return 1.0 - target_ms / full


def _nonnegative_least_squares(columns: Sequence[Sequence[float]], targets: Sequence[float]) -> List[float]:
    """``x >= 0`` minimising ``|sum_k x_k columns[k] - targets|^2`` for two or fewer columns (every
    subset of free coefficients is solved and the best non-negative solution kept)."""
    best, best_error = [0.0] * len(columns), sum(t * t for t in targets)
    subsets = [[0], [1], [0, 1]] if len(columns) == 2 else [[0]]
    for subset in subsets:
        a = [[sum(columns[i][r] * columns[j][r] for r in range(len(targets))) for j in subset] for i in subset]
        b = [sum(columns[i][r] * targets[r] for r in range(len(targets))) for i in subset]
        if len(subset) == 1:
            if a[0][0] <= 0:
                continue
            solution = [b[0] / a[0][0]]
        else:
            det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
            if abs(det) <= 1e-12 * max(a[0][0] * a[1][1], 1e-300):
                continue
            solution = [(b[0] * a[1][1] - b[1] * a[0][1]) / det, (a[0][0] * b[1] - a[1][0] * b[0]) / det]
        if min(solution) < 0:
            continue
        x = [0.0] * len(columns)
        for i, value in zip(subset, solution):
            x[i] = value
        error = sum((sum(x[k] * columns[k][r] for k in range(len(columns))) - targets[r]) ** 2
                    for r in range(len(targets)))
        if error < best_error:
            best, best_error = x, error
    return best


def fit_rest(table: "LatencyTable", measured: Sequence[Tuple[Mapping[str, int], float]]) -> "LatencyTable":
    """A copy of ``table`` whose ``activation_ms`` and ``layer_overhead`` (``rest_saved``, see the
    module docstring) best explain ``measured``: ``(widths, whole-model ms at the reference
    proposal count)`` of pruned copies of the model, by non-negative least squares. Without
    ``activations`` only ``layer_overhead`` is fitted. Measurements the table under-predicts (the
    copies saved less than their layers' times alone) leave ``activation_ms`` at zero and fit
    ``layer_overhead`` alone in ``[-1, 0)``: only that share of the layers' savings shows (at -1
    none; the fit never turns a saving into a cost).
    """
    base = copy.copy(table)
    base.activation_ms, base.layer_overhead = 0.0, 0.0
    base.proposals = table.reference_proposals
    full_layers = base._layer_sum(base.breakdown())
    activation_column, layer_column, targets = [], [], []
    for widths, ms in measured:
        times = base.breakdown(widths)
        activation_column.append(1.0 - base.activation_fraction(widths))
        layer_column.append(max(full_layers - base._layer_sum(times), 0.0))
        targets.append(sum(times.values()) - float(ms))  # what the rest saved
    columns = [layer_column] if not table.activations else [activation_column, layer_column]
    solution = _nonnegative_least_squares(columns, targets)
    result = copy.copy(table)
    result.activation_ms, result.layer_overhead = solution if table.activations else (0.0, solution[0])
    if max(solution) == 0.0 and max(layer_column, default=0.0) > 0.0:
        # the layers' savings show only in part: fit the share that shows, 1 + layer_overhead in [0, 1]
        shown = _nonnegative_least_squares([layer_column], [t + saved for t, saved in zip(targets, layer_column)])[0]
        result.layer_overhead = min(shown, 1.0) - 1.0
    return result


# what profiles of one model on one device must share to be merged (metadata keys)
_SAME_PROFILE_SETTINGS = ("device_kind", "device_name", "num_threads", "precision", "channel_multiple", "min_channels",
                          "pre_nms_topk_test", "detections_per_image", "activation_weights")


def merge_tables(tables: Sequence["LatencyTable"]) -> "LatencyTable":
    """One table from several profiles of the same model at the same settings on the same device:
    every layer timing (grid, steps, proposal counts), every group's element-wise weight
    (``activations``) and the unpruned model's time at each proposal count is the median over
    the profiles (the fixed rest is what the merged layers leave
    of that time), and the rest that shrinks with the channels is fitted again
    (:func:`fit_rest`) to all their calibration copies together, each its share of its own
    profile's unpruned model times the merged unpruned model. Two profiles of a noisy device
    disagree on what pruning a group saves; their median is steadier than either.

    Raises:
        UserInputError: fewer than two tables, or tables that differ in architecture, input size,
            proposal counts, layers or their grids, device, threads, precision, test-time
            settings or kind of weights (trained or random), or that mix profiles with and without
            calibration copies (one line).
    """
    if len(tables) < 2:
        raise UserInputError(f"merging needs at least two latency tables, got {len(tables)}: profile again "
                             f"at the same settings and give every table")
    first = tables[0]

    def refuse(table: "LatencyTable", what: str):
        raise UserInputError(f"latency tables {first.source or '#1'} and {table.source or 'another'} differ in {what}: "
                             f"merge only profiles of one model at the same settings on one device")

    def layout(table: "LatencyTable") -> list:
        return [(e.name, e.kind, e.in_group, e.out_group, e.in_widths, e.out_widths, e.proposal_ms is None,
                 tuple(w for w, _ in e.in_steps), tuple(w for w, _ in e.out_steps)) for e in table.entries]

    for table in tables[1:]:
        for what, a, b in (("channel groups", first.groups, table.groups), ("input size", first.input_size, table.input_size),
                           ("proposal counts", first.proposal_counts, table.proposal_counts),
                           ("reference proposal count", first.reference_proposals, table.reference_proposals)):
            if a != b:
                refuse(table, what)
        for key in _SAME_PROFILE_SETTINGS:
            if first.metadata.get(key) != table.metadata.get(key):
                refuse(table, key)
        if bool(first.metadata.get("weights")) != bool(table.metadata.get("weights")):
            # a random RPN proposes other boxes than a trained one: the pooler's work differs
            refuse(table, "weights (one profiled trained weights, the other randomly initialised ones)")
        if layout(table) != layout(first):
            refuse(table, "their layers or the widths they were timed at")
    calibrated = [bool(t.metadata.get("calibration")) for t in tables]
    if any(calibrated) and not all(calibrated):
        refuse(tables[calibrated.index(not calibrated[0])], "calibration copies (one has them, one does not)")
    if any("widths" not in row for t in tables for row in t.metadata.get("calibration", [])):
        raise UserInputError("a latency table's calibration copies do not record their widths (made by an older "
                             "profiler): profile again with tools/profile_latency.py to merge")

    def median_steps(steps_of):
        columns = [steps_of(t) for t in tables]
        return tuple((w, statistics.median([steps[k][1] for steps in columns])) for k, (w, _) in enumerate(columns[0]))

    entries = []
    for k, entry in enumerate(first.entries):
        mine = [t.entries[k] for t in tables]
        ms = tuple(tuple(statistics.median([e.ms[i][j] for e in mine]) for j in range(len(entry.out_widths)))
                   for i in range(len(entry.in_widths)))
        proposal_ms = None if entry.proposal_ms is None else tuple(
            statistics.median([e.proposal_ms[n] for e in mine]) for n in range(len(entry.proposal_ms)))
        entries.append(LatencyEntry(entry.name, entry.kind, entry.in_group, entry.out_group, entry.in_widths,
                                    entry.out_widths, ms, proposal_ms,
                                    median_steps(lambda t: t.entries[k].in_steps),
                                    median_steps(lambda t: t.entries[k].out_steps)))
    metadata = {key: value for key, value in first.metadata.items()
                if key not in ("calibration", "check", "check_seconds", "profile_seconds", "repeated_layer_timings")}
    metadata["merged_from"] = [
        {"source": t.source, "created": t.metadata.get("created"), "unpruned_ms": t.predict()}
        for t in tables]
    merged = LatencyTable(first.groups, first.input_size, entries, first.proposal_counts,
                          [0.0] * len(first.proposal_counts), first.reference_proposals, metadata,
                          # a group one profile weighed at nothing (a saving lost in noise) is 0 there
                          activations={name: statistics.median([t.activations.get(name, 0.0) for t in tables])
                                       for name in dict.fromkeys(n for t in tables for n in t.activations)})
    # the whole model was measured, the fixed rest is what the layers leave of it: the merged rest
    # is the median whole model less the merged layers (the prediction while the rest is zero)
    merged.fixed_ms = tuple(statistics.median([t.predict(proposals=n) for t in tables]) - merged.predict(proposals=n)
                            for n in first.proposal_counts)
    if all(calibrated):
        full = merged.predict()
        rows = [(row["widths"], row["relative"] * full) for t in tables for row in t.metadata["calibration"]]
        merged = fit_rest(merged, rows)
        merged.metadata["calibration"] = [
            dict(row, measured_ms=row["relative"] * full) for t in tables for row in t.metadata["calibration"]]
    return merged


class LatencyTable:
    """Latency of one detector architecture on one device, predicted for any channel widths (see
    the module docstring). Example::

        table = LatencyTable.load("table.json")
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
            and whatever else the profiler recorded (seconds it took, timing settings, checks).
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
        self._validate()

    # -- checks -----------------------------------------------------------------------------------

    def _fail(self, problem: str):
        where = f"latency table {self.source}" if self.source else "latency table"
        raise UserInputError(f"{where}: {problem}; make it again with tools/profile_latency.py")

    def _validate(self) -> None:
        if any(w < 1 for w in self.groups.values()):
            self._fail("a group width is below 1")
        if min(self.input_size) < 1:
            self._fail(f"input size {self.input_size} is not a size in pixels")
        counts = self.proposal_counts
        if not counts or list(counts) != sorted(set(counts)) or counts[0] < 1:
            self._fail(f"proposal counts {list(counts)} must be distinct, ascending and >= 1")
        if len(self.fixed_ms) != len(counts) or not all(math.isfinite(v) for v in self.fixed_ms):
            self._fail("fixed_ms needs one finite value per proposal count")
        if self.reference_proposals not in counts:
            self._fail(f"reference proposal count {self.reference_proposals} is not among {list(counts)}")
        for name, count in self.activations.items():
            if name not in self.groups or not math.isfinite(count) or count < 0:
                self._fail(f"activations: {name} must be a known channel group with a weight >= 0")
        for label, value, least in (("activation_ms", self.activation_ms, 0.0),
                                    ("layer_overhead", self.layer_overhead, -1.0)):
            if not math.isfinite(value) or value < least:
                self._fail(f"{label} must be finite and >= {least:g}")
        kind = self.metadata.get("device_kind")
        if kind not in DEVICE_KINDS:
            self._fail(f"device_kind {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
        names = set()
        for e in self.entries:
            if e.name in names:
                self._fail(f"layer {e.name} is listed twice")
            names.add(e.name)
            if e.kind not in ENTRY_KINDS:
                self._fail(f"layer {e.name} has unknown kind {e.kind!r}")
            for group, grid in ((e.in_group, e.in_widths), (e.out_group, e.out_widths)):
                if not grid or list(grid) != sorted(set(grid)) or grid[0] < 1:
                    self._fail(f"layer {e.name}: widths {list(grid)} must be distinct, ascending and >= 1")
                if group is None:
                    if len(grid) != 1:
                        self._fail(f"layer {e.name}: an axis without a channel group has one width")
                elif group not in self.groups:
                    self._fail(f"layer {e.name} names unknown channel group {group}")
                elif grid[-1] != self.groups[group]:
                    self._fail(f"layer {e.name}: its grid ends at {grid[-1]}, not at {group}'s {self.groups[group]} channels")
            if len(e.ms) != len(e.in_widths) or any(len(row) != len(e.out_widths) for row in e.ms):
                self._fail(f"layer {e.name}: ms must be a {len(e.in_widths)} x {len(e.out_widths)} grid")
            if not all(math.isfinite(v) and v >= 0 for row in e.ms for v in row):
                self._fail(f"layer {e.name}: times must be finite and >= 0")
            for group, grid, steps in ((e.in_group, e.in_widths, e.in_steps), (e.out_group, e.out_widths, e.out_steps)):
                widths = [w for w, _ in steps]
                if steps and (group is None or widths != sorted(set(widths)) or widths[0] < 1 or widths[-1] != grid[-1]
                              or not all(math.isfinite(ms) and ms >= 0 for _, ms in steps)):
                    self._fail(f"layer {e.name}: steps must be ascending widths of a channel group ending at its full "
                               "width, with finite times >= 0")
            if e.proposal_ms is not None and (
                len(e.proposal_ms) != len(counts) or not all(math.isfinite(v) and v >= 0 for v in e.proposal_ms)
            ):
                self._fail(f"layer {e.name}: proposal_ms needs one finite time >= 0 per proposal count")

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
        widths = {name: g.size if isinstance(g, ChannelGroup) else int(g) for name, g in model_groups.items()}
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

    def _layer_sum(self, times: Mapping[str, float]) -> float:
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
            layers_saved = self._layer_sum(self._entry_times(self.groups, scales)) - self._layer_sum(times)
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

    @property
    def freed_memory_kept(self) -> bool:
        """Whether it was profiled with freed memory kept (:mod:`~pgp_det.utils.allocator`)."""
        return bool(self.metadata.get("environment", {}).get("freed_memory_kept", False))

    def page_fault_warning(self, source: str) -> Optional[str]:
        """One line when the whole model faulted many memory pages in per inference while it was
        profiled without freed memory kept (its predictions may miss by their time); else None.
        ``source``: how the table is named in the line."""
        faults = self.metadata.get("page_faults_per_inference", 0)
        if faults < MANY_PAGE_FAULTS or self.freed_memory_kept:
            return None
        return (f"latency table {source} was profiled while the whole model faulted {faults:.0f} memory pages in per "
                "inference, which its layer timings cannot show: its predictions may miss by that time; profile with "
                f"--keep-freed-memory and deploy with {ALLOCATOR_ENVIRONMENT}")

    def describe(self) -> str:
        """One line: device, kind, precision, threads (freed memory kept or not), input size."""
        m = self.metadata
        kept = ", freed memory kept" if self.freed_memory_kept else ""
        return (f"{m.get('device_name', '?')} ({self.device_kind}, {m.get('precision', '?')}, "
                f"{m.get('num_threads', '?')} threads{kept}) at {self.input_size[0]}x{self.input_size[1]}")

    # -- files ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "metadata": self.metadata,
            "input_size": list(self.input_size),
            "groups": self.groups,
            "proposals": {
                "reference": self.reference_proposals,
                "counts": list(self.proposal_counts),
                "fixed_ms": list(self.fixed_ms),
            },
            "entries": [e.to_dict() for e in self.entries],
            "rest": {
                "activations": self.activations,
                "activation_ms": self.activation_ms,
                "layer_overhead": self.layer_overhead,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> "LatencyTable":
        """The table :meth:`to_dict` wrote.

        Raises:
            UserInputError: not a latency table of this version, or a malformed one (one line).
        """
        where = f"latency table {source}" if source else "latency table"
        if not isinstance(data, Mapping) or data.get("format") != TABLE_FORMAT:
            raise UserInputError(f"{source or 'the file'} is not a pgp_det latency table; make one with tools/profile_latency.py")
        if data.get("version") != TABLE_VERSION:
            raise UserInputError(
                f"{where} has version {data.get('version')!r}, this pgp_det reads version {TABLE_VERSION}; "
                "make it again with tools/profile_latency.py"
            )
        try:
            proposals = data["proposals"]
            rest = data["rest"]
            entries = [
                LatencyEntry(
                    name=str(e["name"]), kind=str(e["kind"]),
                    in_group=None if e["in_group"] is None else str(e["in_group"]),
                    out_group=None if e["out_group"] is None else str(e["out_group"]),
                    in_widths=tuple(int(w) for w in e["in_widths"]),
                    out_widths=tuple(int(w) for w in e["out_widths"]),
                    ms=tuple(tuple(float(v) for v in row) for row in e["ms"]),
                    proposal_ms=None if e.get("proposal_ms") is None else tuple(float(v) for v in e["proposal_ms"]),
                    in_steps=tuple((int(w), float(ms)) for w, ms in e["in_steps"]),
                    out_steps=tuple((int(w), float(ms)) for w, ms in e["out_steps"]),
                )
                for e in data["entries"]
            ]
            return cls(
                groups=dict(data["groups"]), input_size=data["input_size"], entries=entries,
                proposal_counts=proposals["counts"], fixed_ms=proposals["fixed_ms"],
                reference_proposals=proposals["reference"], metadata=data.get("metadata") or {}, source=source,
                activations=rest["activations"], activation_ms=rest["activation_ms"],
                layer_overhead=rest["layer_overhead"],
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            if isinstance(e, UserInputError):
                raise
            detail = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserInputError(f"{where} is malformed ({detail}); make it again with tools/profile_latency.py") from None

    def save(self, path: str) -> str:
        """Write the table as JSON, atomically; returns ``path``."""
        return atomic_write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        """Read a table :meth:`save` wrote.

        Raises:
            UserInputError: the file is missing, unreadable, not JSON or not a valid table (one line).
        """
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserInputError(f"latency table '{path}' does not exist; make one with tools/profile_latency.py") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserInputError(f"cannot read latency table '{path}': {e}") from None
        except json.JSONDecodeError as e:
            raise UserInputError(f"latency table '{path}' is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data, source=path)
