"""The last stage of profiling: the whole model at the other proposal counts and pruned copies
of it, timed in turn with the unpruned model round after round, give the fixed rest at each count
and fit the part of the rest that shrinks with the channels.

The copies are the model pruned uniformly at a few ratios, two that each cut half of the
groups (:func:`contrast_cuts`) and the cuts a latency target's ``knapsack`` allocation makes at a
few shares of the unpruned model's time (:func:`knapsack_cuts`), their ROI heads fed the unpruned model's proposals (a copy pruned
without training proposes other boxes, and the pooler's work follows their sizes). Everything
enters the table as its share of the unpruned model's time in the same rounds
(:func:`time_shares`), so that a drift of the device's speed while they are timed stays out.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from torch import nn

from ...pruning.allocation import allocate
from ...pruning.cost import uniform_sizes
from ...pruning.criteria import build_criterion
from ...pruning.groups import PruningRequestError
from ...pruning.target import latency_budget
from ...latency.fit import fit_rest
from .inference import pruned_copy
from .record import ModelRecording
from .settings import CONTRAST_RATIO, ProfileSettings
from ...latency.table import LatencyEntry, LatencyTable
from .timers import Timing
from .whole_model import median_ratio, time_interleaved

__all__ = [
    "CalibrationCopy", "WholeModelShares", "calibration_copies", "contrast_cuts", "fit_to_copies", "fixed_rest_ms",
    "knapsack_copies", "knapsack_cuts", "time_shares", "uniform_cuts",
]


def uniform_cuts(groups, ratios: Sequence[float], multiple: int, floor: int) -> List[Tuple[dict, Dict[str, int]]]:
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


def knapsack_cuts(model: nn.Module, groups, table: LatencyTable, shares: Sequence[float], multiple: int,
                  floor: int) -> List[Tuple[dict, Dict[str, int]]]:
    """``[({"knapsack": share}, widths)]``: for each share of the unpruned model's predicted time,
    the widths (``{group: kept}``, cut groups only) the ``knapsack`` allocation keeps for a latency
    target of that share under ``table`` (fitted to the uniform copies), its channels valued by
    their filters' L1 norms (what the weights alone say; a gradient criterion values channels
    otherwise, the prices are the same). A share below what the floor allows is left out."""
    prunable = {name: g for name, g in groups.items() if g.prunable}
    scorer = build_criterion("l1")
    scorer.attach(model, prunable)
    scores = scorer.scores(model)
    scorer.detach()
    sizes = {name: g.size for name, g in prunable.items()}
    cuts = []
    for share in shares:
        try:
            weak = allocate("knapsack", scores, prunable, 0.0, sizes, multiple, floor,
                            budget=latency_budget(table, float(share) * table.predict()))
        except PruningRequestError:  # below the floor: no target of that share can be met either
            continue
        cuts.append(({"knapsack": float(share)}, {name: sizes[name] - len(weak[name]) for name in prunable
                                                   if weak[name]}))
    return cuts


@dataclass
class CalibrationCopy:
    """A pruned copy of the model, timed whole to fit the rest.

    Attributes:
        label: ``{"ratio": r}``, and ``{"half": "element-wise"}`` or ``{"half": "layers"}`` for
            the :func:`contrast_cuts` copies, ``{"knapsack": share}`` for the :func:`knapsack_cuts`
            ones; recorded with the table's calibration rows.
        widths: ``{group: kept channels}``; groups not named keep their width.
        model: the copy, on the device in eval mode.
    """

    label: dict
    widths: Dict[str, int]
    model: nn.Module


def _pruned_copies(model: nn.Module, groups, cuts: Sequence[Tuple[dict, Dict[str, int]]],
                   device) -> List[CalibrationCopy]:
    return [CalibrationCopy(label, widths, pruned_copy(model, groups, widths, device)) for label, widths in cuts]


def calibration_copies(model: nn.Module, groups, layers_only: LatencyTable, settings: ProfileSettings,
                       device) -> List[CalibrationCopy]:
    """The copies ``settings`` asks for first: uniform cuts at ``settings.calibration_ratios`` and,
    with ``settings.contrast``, the two :func:`contrast_cuts` of ``layers_only`` (the table before
    its fixed rest is known); none without calibration ratios."""
    if not settings.calibration_ratios:
        return []
    cuts = uniform_cuts(groups, settings.calibration_ratios, settings.multiple, settings.floor)
    if settings.contrast:
        halves = contrast_cuts(layers_only, dict(uniform_sizes(groups, CONTRAST_RATIO, settings.multiple,
                                                               settings.floor)))
        cuts += [({"ratio": CONTRAST_RATIO, **label}, widths) for label, widths in halves]
    return _pruned_copies(model, groups, cuts, device)


def knapsack_copies(model: nn.Module, groups, fitted: LatencyTable, settings: ProfileSettings,
                    device) -> List[CalibrationCopy]:
    """The copies timed second: the :func:`knapsack_cuts` at ``settings.knapsack_shares`` under
    ``fitted`` (the table fitted to the first copies), the shapes a latency target produces."""
    cuts = knapsack_cuts(model, groups, fitted, settings.knapsack_shares, settings.multiple, settings.floor)
    return _pruned_copies(model, groups, cuts, device)


@dataclass
class WholeModelShares:
    """Whole-model timings as shares of the unpruned model at the reference proposal count, each
    the median over rounds of its time over the unpruned model's in the same round.

    Attributes:
        at_count: ``{proposal count: share}`` of the unpruned model (1 at the reference count).
        of_copies: the share of each calibration copy, in order.
    """

    at_count: Dict[int, float]
    of_copies: List[float]


def time_shares(model: nn.Module, copies: Sequence[CalibrationCopy], recording: ModelRecording,
                input_size: Sequence[int], timing: Timing, images: Sequence[np.ndarray],
                other_counts: bool = True) -> WholeModelShares:
    """Time the unpruned model at every count of ``recording`` (only at the reference count
    without ``other_counts``) and the ``copies`` (their ROI heads fed the unpruned model's
    proposals at the reference count) in ``timing.rounds`` interleaved rounds with ``timing``'s
    whole-model timer."""
    reference = recording.reference
    others = [n for n in recording.counts if n != reference] if other_counts else []
    if not others and not copies:
        return WholeModelShares({reference: 1.0}, [])
    jobs = [(model, None)] * (1 + len(others)) + [(c.model, recording.proposals[reference]) for c in copies]
    samples = time_interleaved(jobs, input_size, timing.whole_model_timer(), timing.rounds, timing.torch_device,
                               timing.dtype, [reference] + others + [reference] * len(copies), images)
    unpruned, at_others, at_copies = samples[0], samples[1:1 + len(others)], samples[1 + len(others):]
    return WholeModelShares({reference: 1.0, **{n: median_ratio(s, unpruned) for n, s in zip(others, at_others)}},
                            [median_ratio(measured, unpruned) for measured in at_copies])


def fixed_rest_ms(entries: Sequence[LatencyEntry], counts: Sequence[int], shares: WholeModelShares, whole_ms: float,
                  say: Callable[[str], None] = lambda line: None) -> List[float]:
    """``fixed_ms`` per proposal count: the whole model's time there (its share of ``whole_ms``,
    the unpruned model at the reference count) less the entries' full-width times."""
    fixed = []
    for j, n in enumerate(counts):
        layers_ms = sum(e.ms[-1][-1] if e.proposal_ms is None else e.proposal_ms[j] for e in entries)
        fixed.append(shares.at_count[n] * whole_ms - layers_ms)
        say(f"whole model at {n} proposals: {shares.at_count[n] * whole_ms:.3f} ms ({layers_ms:.3f} ms in the "
            "measured layers)")
    return fixed


def fit_to_copies(table: LatencyTable, cuts: Sequence[Tuple[dict, Dict[str, int]]], shares: Sequence[float],
                  whole_ms: float, groups) -> LatencyTable:
    """``table`` with its rest fitted (:func:`~pgp_det.latency.fit.fit_rest`) to the copies cut
    as ``cuts`` (``(label, widths)``), each measured at its share of ``whole_ms``; the copies'
    labels, pruned widths and times go to ``metadata["calibration"]`` (enough to fit again)."""
    rows = [{**label, "widths": widths, "relative": share} for (label, widths), share in zip(cuts, shares)]
    table = fit_rest(table, [(row["widths"], row["relative"] * whole_ms) for row in rows])
    table.metadata["calibration"] = [
        {**row, "measured_ms": row["relative"] * whole_ms,
         "widths": {name: kept for name, kept in row["widths"].items() if kept < groups[name].size}}
        for row in rows]
    return table
