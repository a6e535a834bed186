"""Who gets pruned at a pruning step: turn a scheduled fraction and channel scores into weak sets.

:func:`allocate` takes the scores of a criterion, the groups being pruned and the schedule's
pruned fraction (of each group's *original* size) and returns, per group, the *weak set*: the
current channel indices that should not survive this step, the lowest-scored ones.
:func:`split_hard_soft` then divides each weak set into channels removed now and channels zeroed
(which may recover until a later step).

How many channels each group keeps is the job of an allocation method, picked by name from
:data:`ALLOCATION_REGISTRY` (``PRUNING.ALLOCATION``):

``uniform``
    Every group is pruned to its own target (PGP, PSFP): keep ``C0 * (1 - fraction)``, rounded
    as :func:`~pgp_det.pruning.groups.kept_count` rounds.
``global``
    One ranking over all groups (FRS, one-step pruning): each group's scores are divided by
    their mean so groups compare on one scale; the lowest ``sum C - sum C0 * (1 - fraction)``
    channels overall are taken, no group going below its smallest allowed count. Per-group
    counts are then rounded to allowed counts (multiples, floor) by largest remainder, keeping
    the total as close to the target as the rounding allows.
``adaptive``
    Layer-adaptive ratios (PSAP): group ``g`` prunes the fraction ``r_g = s * sparsity_g`` of
    its original size, where ``sparsity_g`` is its producer weights' sparsity
    (:func:`weight_sparsity`) and ``s`` makes the channel-weighted mean ``sum C0_g r_g / sum C0_g``
    equal the scheduled fraction; ratios are clipped to ``[0, 0.95]`` and the rest rescaled
    (:func:`adaptive_ratios`).

Allowed kept counts: a multiple of ``lcm(multiple, group.channel_multiple)``, at least ``floor``,
as :func:`kept_count` decides (``multiple`` and ``floor`` relax for small groups; a GroupNorm's
``channel_multiple`` never does); keeping every current channel is always allowed.

Protection (PSAP's protective reconstruction): ``protected`` marks channels that must not be in
this step's weak set, e.g. :func:`protect_by_gradient`'s channels whose recent gradient score is
in the top of their group. The next-weakest unprotected channels are taken instead; when too few
are left, the group prunes fewer (it never keeps fewer than its allowed count requires).
"""
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from detectron2.utils.registry import Registry

from .groups import ChannelGroup, PruningRequestError, kept_count

__all__ = [
    "ALLOCATION_REGISTRY",
    "AllocationRequest",
    "adaptive_ratios",
    "allocate",
    "allowed_kept_counts",
    "protect_by_gradient",
    "split_hard_soft",
    "weight_sparsity",
]

ALLOCATION_REGISTRY = Registry("PRUNING_ALLOCATION")
ALLOCATION_REGISTRY.__doc__ = "fn(request: AllocationRequest) -> {group name: channels to keep (int)}"

# no group is asked to prune more than this share of its original channels (adaptive)
MAX_ADAPTIVE_RATIO = 0.95


def allowed_kept_counts(current: int, multiple: int = 8, floor: int = 8, channel_multiple: int = 1) -> List[int]:
    """Every count :func:`kept_count` can return for a group of ``current`` channels, ascending.

    Mirrors its rule: multiples of ``lcm(multiple, channel_multiple)`` between the floor and
    ``current``; if there are none, multiples of ``channel_multiple``; and ``current`` itself.
    """
    low = min(floor, current)
    counts = {current}
    if low < current:
        for step in (math.lcm(multiple, channel_multiple), channel_multiple):
            smallest = -(-low // step) * step
            largest = (current // step) * step
            if smallest <= largest:
                counts.update(range(smallest, largest + 1, step))
                break
    return sorted(counts)


@dataclass(frozen=True)
class AllocationRequest:
    """The checked inputs of one allocation, as the registered methods see them.

    Attributes:
        scores: ``{group: float32 CPU tensor (C,)}``, higher = more important.
        groups: the groups being pruned (all prunable), ``C = group.size``.
        fractions: ``{group: pruned fraction of its original size}`` scheduled for this step.
        original_sizes: ``{group: C0}``.
        multiple: preferred granularity of kept counts.
        floor: fewest channels a group keeps.
        weight_sparsity: ``{group: sparsity in [0, 1]}`` or None (only ``adaptive`` needs it).
        protected: ``{group: bool tensor (C,)}``; True = not in this step's weak set.
    """

    scores: Mapping[str, torch.Tensor]
    groups: Mapping[str, ChannelGroup]
    fractions: Mapping[str, float]
    original_sizes: Mapping[str, int]
    multiple: int
    floor: int
    weight_sparsity: Optional[Mapping[str, float]]
    protected: Mapping[str, torch.Tensor]

    def target_kept(self, name: str, fraction: Optional[float] = None) -> int:
        """Channels group ``name`` keeps when ``fraction`` (default: its scheduled one) of its
        original size is pruned: ``C0 * (1 - fraction)`` rounded as :func:`kept_count` rounds,
        never more than it has now."""
        group = self.groups[name]
        fraction = self.fractions[name] if fraction is None else fraction
        wanted = self.original_sizes[name] * (1.0 - fraction)
        # kept_count takes the pruned share of the *current* channels
        ratio = min(max(1.0 - wanted / group.size, 0.0), 1.0)
        return kept_count(group.size, ratio, self.multiple, self.floor, group.channel_multiple)

    def allowed(self, name: str) -> List[int]:
        """Allowed kept counts of group ``name`` (see :func:`allowed_kept_counts`)."""
        group = self.groups[name]
        return allowed_kept_counts(group.size, self.multiple, self.floor, group.channel_multiple)


# ---------------------------------------------------------------------------------------------
# Allocation methods


@ALLOCATION_REGISTRY.register()
def uniform(request: AllocationRequest) -> Dict[str, int]:
    """Each group keeps its own rounded target ``C0 * (1 - fraction)``."""
    return {name: request.target_kept(name) for name in request.groups}


def _global_ranking(request: AllocationRequest) -> Dict[str, int]:
    """One ranking of mean-normalised scores over all groups (see the module docstring)."""
    names = list(request.groups)
    current = {n: request.groups[n].size for n in names}
    wanted_kept = sum(request.original_sizes[n] * (1.0 - request.fractions[n]) for n in names)
    to_remove = max(0, int(math.floor(sum(current.values()) - wanted_kept + 0.5)))
    smallest = {n: request.allowed(n)[0] for n in names}

    # ranking: normalised score, protected channels last (never taken)
    normalised = []
    for n in names:
        scores = request.scores[n]
        mean = scores.mean()
        scaled = scores / mean if mean > 0 else torch.zeros_like(scores)
        normalised.append(scaled.masked_fill(request.protected[n], math.inf))
    flat = torch.cat(normalised)
    owner = torch.cat([torch.full((current[n],), i, dtype=torch.long) for i, n in enumerate(names)])
    order = torch.sort(flat, stable=True).indices
    capacity = [current[n] - smallest[n] for n in names]
    removed = [0] * len(names)
    taken = 0
    for value, group_index in zip(flat[order].tolist(), owner[order].tolist()):
        if taken == to_remove or math.isinf(value):
            break
        if removed[group_index] < capacity[group_index]:
            removed[group_index] += 1
            taken += 1

    # round each group's raw kept count down to an allowed count, then round up the groups
    # with the largest remainders while that brings the total closer to the target
    raw = {n: current[n] - removed[i] for i, n in enumerate(names)}
    kept, upper = {}, {}
    for n in names:
        allowed = request.allowed(n)
        kept[n] = max(a for a in allowed if a <= raw[n])
        upper[n] = min(a for a in allowed if a >= raw[n])
    deficit = sum(raw.values()) - sum(kept.values())

    def remainder(n: str) -> float:
        gap = upper[n] - kept[n]
        return (raw[n] - kept[n]) / gap if gap else -1.0

    for n in sorted(names, key=remainder, reverse=True):
        step = upper[n] - kept[n]
        if step and abs(deficit - step) < abs(deficit):
            kept[n] = upper[n]
            deficit -= step
    return kept


_global_ranking.__name__ = "global"  # the config name; `global` is a Python keyword
ALLOCATION_REGISTRY.register(_global_ranking)


@ALLOCATION_REGISTRY.register()
def adaptive(request: AllocationRequest) -> Dict[str, int]:
    """Per-group ratios proportional to weight sparsity, channel-weighted mean = the fraction."""
    if request.weight_sparsity is None:
        raise PruningRequestError(
            "adaptive allocation needs weight_sparsity ({group: sparsity}; see weight_sparsity(model, groups))"
        )
    names = list(request.groups)
    missing = [n for n in names if n not in request.weight_sparsity]
    if missing:
        raise PruningRequestError(f"adaptive allocation: no weight sparsity for group {missing[0]}")
    sizes = {n: request.original_sizes[n] for n in names}
    # per-group schedules (a dict of fractions) become one channel-weighted mean target
    mean_fraction = sum(sizes[n] * request.fractions[n] for n in names) / sum(sizes.values())
    ratios = adaptive_ratios({n: request.weight_sparsity[n] for n in names}, sizes, mean_fraction)
    return {n: request.target_kept(n, ratios[n]) for n in names}


def adaptive_ratios(
    sparsity: Mapping[str, float],
    original_sizes: Mapping[str, int],
    fraction: float,
    max_ratio: float = MAX_ADAPTIVE_RATIO,
) -> Dict[str, float]:
    """Per-group pruned fractions ``r_g = s * sparsity_g`` with ``sum C0_g r_g = fraction * sum C0_g``.

    Ratios are clipped to ``[0, max_ratio]``; the scale of the unclipped groups is solved again
    until no more clip, so the weighted mean stays ``fraction`` whenever ``fraction <= max_ratio``
    (beyond, every group gets ``max_ratio``). When no unclipped group has any sparsity, they
    share the remaining fraction uniformly.

    Args:
        sparsity: ``{group: weight sparsity in [0, 1]}``.
        original_sizes: ``{group: C0}``, the weights of the mean.
        fraction: target mean pruned fraction in ``[0, 1)``.

    Returns:
        ``{group: ratio in [0, max_ratio]}``.
    """
    if not 0.0 <= fraction < 1.0:
        raise PruningRequestError(f"fraction must be in [0, 1), got {fraction}")
    bad = [n for n, s in sparsity.items() if not 0.0 <= float(s) <= 1.0]
    if bad:
        raise PruningRequestError(f"weight sparsity of {bad[0]} must be in [0, 1], got {sparsity[bad[0]]}")
    names = list(sparsity)
    total = float(sum(original_sizes[n] for n in names))
    ratios = {n: 0.0 for n in names}
    if not names or fraction == 0.0:
        return ratios
    clipped = set()
    while True:
        free = [n for n in names if n not in clipped]
        budget = fraction * total - max_ratio * sum(original_sizes[n] for n in clipped)
        if not free or budget <= 0:
            break
        weight = sum(original_sizes[n] * float(sparsity[n]) for n in free)
        if weight > 0:
            scale = budget / weight
            proposal = {n: scale * float(sparsity[n]) for n in free}
        else:
            share = budget / sum(original_sizes[n] for n in free)
            proposal = {n: share for n in free}
        over = [n for n in free if proposal[n] > max_ratio]
        if not over:
            ratios.update(proposal)
            break
        clipped.update(over)
    for n in clipped:
        ratios[n] = max_ratio
    return ratios


# ---------------------------------------------------------------------------------------------
# Helpers for the adaptive method and for protection


@torch.no_grad()
def weight_sparsity(model: nn.Module, groups: Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]],
                    threshold: float = 0.01) -> Dict[str, float]:
    """Share of each prunable group's producer weights that are near zero.

    A weight entry of producer layer ``l`` counts as sparse when ``|w| <= threshold * max |W_l|``
    (relative to the layer's own largest entry, so layers of any scale compare; zeroed channels
    count as sparse). A group's sparsity is the sparse share over all entries of its producer
    layers' weights (conv/linear ``weight``; norms and biases left out).

    Returns:
        ``{group name: float in [0, 1]}``.
    """
    if not threshold >= 0:
        raise PruningRequestError(f"threshold must be >= 0, got {threshold}")
    if isinstance(groups, Mapping):
        groups = groups.values()
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    result = OrderedDict()
    for group in groups:
        if not group.prunable:
            continue
        sparse, total = 0, 0
        for layer in group.producer_layers:
            magnitude = model.get_submodule(layer).weight.detach().abs()
            sparse += int((magnitude <= threshold * magnitude.max()).sum())
            total += magnitude.numel()
        result[group.name] = sparse / total if total else 0.0
    return result


def protect_by_gradient(grad_scores: Mapping[str, torch.Tensor], quantile: float = 0.9) -> Dict[str, torch.Tensor]:
    """Channels whose recent gradient score is in the top of their group, to keep out of a weak set.

    Args:
        grad_scores: ``{group: (C,) scores}``, e.g. the ``pgp`` criterion's scores over the
            iterations since the last pruning step.
        quantile: in ``[0, 1)``; a channel is protected when its score is strictly above its
            group's ``quantile`` (so about ``1 - quantile`` of each group; equal scores protect
            nothing).

    Returns:
        ``{group: bool CPU tensor (C,)}``, True = protected.
    """
    if not 0.0 <= quantile < 1.0:
        raise PruningRequestError(f"protection quantile must be in [0, 1), got {quantile}")
    result = OrderedDict()
    for name, scores in grad_scores.items():
        scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
        result[name] = scores > torch.quantile(scores, quantile)
    return result


# ---------------------------------------------------------------------------------------------
# Entry points


def _group_dict(groups) -> "OrderedDict[str, ChannelGroup]":
    if isinstance(groups, Mapping):
        groups = groups.values()
    return OrderedDict((g.name, g) for g in groups)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PruningRequestError(f"{name} must be an integer >= 1, got {value!r}")


def _build_request(
    scores, groups, fraction, original_sizes, multiple, floor, weight_sparsity, protected
) -> AllocationRequest:
    _check_positive_int("multiple", multiple)
    _check_positive_int("floor", floor)
    groups = _group_dict(groups)
    checked_scores, fractions, sizes, masks = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
    for name, group in groups.items():
        if not group.prunable:
            raise PruningRequestError(f"channel group {name} cannot be pruned: {group.reason}")
        if name not in scores:
            raise PruningRequestError(f"no scores for channel group {name}")
        score = torch.as_tensor(scores[name]).detach().float().cpu().reshape(-1)
        if score.numel() != group.size:
            raise PruningRequestError(f"{name}: {score.numel()} scores for {group.size} channels")
        if not torch.isfinite(score).all():
            raise PruningRequestError(f"{name}: scores must be finite")
        checked_scores[name] = score
        value = fraction.get(name) if isinstance(fraction, Mapping) else fraction
        if value is None:
            raise PruningRequestError(f"no pruning fraction for channel group {name}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise PruningRequestError(f"{name}: pruning fraction must be in [0, 1), got {value!r}")
        fractions[name] = float(value)
        original = original_sizes.get(name)
        if isinstance(original, bool) or not isinstance(original, numbers.Integral) or original < group.size:
            raise PruningRequestError(
                f"{name}: original size must be an integer >= its current {group.size} channels, got {original!r}"
            )
        sizes[name] = int(original)
        mask = None if protected is None else protected.get(name)
        if mask is None:
            mask = torch.zeros(group.size, dtype=torch.bool)
        mask = torch.as_tensor(mask).detach().cpu().reshape(-1)
        if mask.dtype != torch.bool or mask.numel() != group.size:
            raise PruningRequestError(f"{name}: protected must be a bool tensor of {group.size} entries")
        masks[name] = mask
    return AllocationRequest(checked_scores, groups, fractions, sizes, multiple, floor, weight_sparsity, masks)


def _weakest(request: AllocationRequest, name: str, kept: int) -> List[int]:
    """The ``size - kept`` lowest-scored unprotected channels, sorted by index; fewer (up to the
    next allowed count) when protection leaves too few candidates."""
    size = request.groups[name].size
    protected = request.protected[name]
    count = size - kept
    candidates = size - int(protected.sum())
    if count > candidates:
        count = size - min(a for a in request.allowed(name) if a >= size - candidates)
    order = torch.sort(request.scores[name].masked_fill(protected, math.inf), stable=True).indices
    return sorted(order[:count].tolist())


def allocate(
    method: str,
    scores: Mapping[str, torch.Tensor],
    groups: Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]],
    fraction: Union[float, Mapping[str, float]],
    original_sizes: Mapping[str, int],
    multiple: int = 8,
    floor: int = 8,
    weight_sparsity: Optional[Mapping[str, float]] = None,
    protected: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, List[int]]:
    """The weak set of every group at one pruning step.

    Args:
        method: a name in :data:`ALLOCATION_REGISTRY`: ``uniform``, ``global``, ``adaptive``.
        scores: ``{group: (C,) float scores}`` from a criterion (higher = keep).
        groups: the groups being pruned (prunable), with their current sizes ``C``.
        fraction: the schedule's pruned fraction of each group's *original* size after this step,
            in ``[0, 1)``; one float, or ``{group: fraction}`` for per-scope schedules.
        original_sizes: ``{group: C0}``, sizes before any pruning.
        multiple, floor: rounding of kept counts (see :func:`~pgp_det.pruning.groups.kept_count`).
        weight_sparsity: ``{group: sparsity}`` for ``adaptive`` (:func:`weight_sparsity`).
        protected: ``{group: bool (C,)}``, channels that must not be in a weak set this step.

    Returns:
        ``{group: sorted current indices of the channels that should not survive this step}``,
        an entry (possibly empty) for every group; ``C - len(weak)`` is an allowed kept count.

    Raises:
        PruningRequestError: unknown method, or inputs that do not match the groups.
    """
    if method not in ALLOCATION_REGISTRY:
        known = ", ".join(sorted(n for n, _ in ALLOCATION_REGISTRY))
        raise PruningRequestError(f"unknown allocation method {method!r}; known: {known}")
    request = _build_request(scores, groups, fraction, original_sizes, multiple, floor, weight_sparsity, protected)
    kept = ALLOCATION_REGISTRY.get(method)(request)
    weak = OrderedDict()
    for name, group in request.groups.items():
        count = kept.get(name, group.size)
        if count not in request.allowed(name):
            raise AssertionError(
                f"allocation {method} kept {count} of {group.size} channels of {name}, not an allowed count"
            )
        weak[name] = _weakest(request, name, count)
    return weak


def _removal_count(size: int, weak: int, remove_ratio: float, multiple: int, channel_multiple: int) -> int:
    """How many of ``weak`` channels to remove now (see :func:`split_hard_soft`)."""
    if remove_ratio >= 1.0:
        return weak
    ideal = remove_ratio * weak
    for step in (math.lcm(multiple, channel_multiple), channel_multiple):
        candidates = [r for r in range(weak + 1) if (size - r) % step == 0]
        if candidates:
            # nearest to the ideal share; a tie goes to removing more
            return min(candidates, key=lambda r: (abs(r - ideal), -r))
    return 0


def split_hard_soft(
    weak: Mapping[str, Sequence[int]],
    scores: Mapping[str, torch.Tensor],
    remove_ratio: float,
    multiple: int = 8,
    groups: Optional[Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]]] = None,
) -> Tuple[Dict[str, List[int]], Dict[str, List[int]]]:
    """Split each weak set into channels removed now (hard) and channels zeroed (soft).

    Of group ``g``'s weak set, the lowest-scored ``n`` channels are removed, ``n`` near
    ``remove_ratio * len(weak)``: among the counts that leave a multiple of
    ``lcm(multiple, channel_multiple)`` channels physically present (kept plus zeroed), the one
    nearest the ideal share (ties: remove more). The zeroed channels stay in the tensors until a
    later step removes them, so this keeps the layers' widths during training on hardware-friendly
    multiples, as the kept counts are. When no count does, only the GroupNorm
    ``channel_multiple`` is honoured (a hard constraint; removing none always satisfies it).
    ``remove_ratio == 1`` removes the whole weak set (the last pruning step).

    Args:
        weak: ``{group: channel indices}``, e.g. from :func:`allocate`.
        scores: ``{group: (C,) scores}``; ``C`` is the group's current size.
        remove_ratio: in ``[0, 1]``.
        multiple: preferred granularity of the remaining width.
        groups: the groups, for their ``channel_multiple`` (1 when not given).

    Returns:
        ``(remove, zero)``: ``{group: sorted indices}`` each, an entry for every group in ``weak``.
    """
    if isinstance(remove_ratio, bool) or not isinstance(remove_ratio, numbers.Real) or not 0.0 <= remove_ratio <= 1.0:
        raise PruningRequestError(f"remove_ratio must be in [0, 1], got {remove_ratio!r}")
    _check_positive_int("multiple", multiple)
    groups = _group_dict(groups) if groups is not None else {}
    remove, zero = OrderedDict(), OrderedDict()
    for name, channels in weak.items():
        if name not in scores:
            raise PruningRequestError(f"no scores for channel group {name}")
        score = torch.as_tensor(scores[name]).detach().float().cpu().reshape(-1)
        size = score.numel()
        channels = [int(c) for c in channels]
        if any(not 0 <= c < size for c in channels) or len(set(channels)) != len(channels):
            raise PruningRequestError(f"{name}: weak channels must be distinct indices in 0..{size - 1}")
        channel_multiple = groups[name].channel_multiple if name in groups else 1
        count = _removal_count(size, len(channels), float(remove_ratio), multiple, channel_multiple)
        ordered = sorted(channels, key=lambda c: (score[c].item(), c))  # weakest first, ties by index
        remove[name] = sorted(ordered[:count])
        zero[name] = sorted(ordered[count:])
    return remove, zero
