"""Who gets pruned at a pruning step: turn a budget and channel scores into weak sets.

:func:`allocate` takes the scores of a criterion, the groups being pruned and what the step must
reach, and returns, per group, the *weak set*: the current channel indices that should not
survive this step, the lowest-scored ones. :func:`~pgp_det.pruning.weak_sets.split_hard_soft` then divides each weak set into
channels removed now and channels zeroed (which may recover until a later step).

What a step must reach (its *budget*):

* a channel budget (``TARGET ratio``): the schedule's pruned fraction ``f_g`` of each group's
  *original* size ``C0_g``; ``global`` and ``adaptive`` read it as a channel budget, the kept
  channels summed over groups at most ``sum C0_g (1 - f_g)``;
* a :class:`Budget` (``TARGET flops``, ``latency``, or any cost of the kept widths): the kept
  counts must bring ``budget.cost(kept)`` to at most ``budget.limit``.
  :class:`~pgp_det.pruning.target.PruningTarget` gives the budget of each step: ``(1 - p_k)``
  times the unpruned model's cost, ``p_k`` the schedule applied to the final reduction, so the
  last step reaches the target itself.

How many channels each group keeps is the job of an allocation method, picked by name from
:data:`ALLOCATION_REGISTRY` (``PRUNING.ALLOCATION.NAME``):

``uniform``
    Every group is pruned alike (PGP, PSFP). Channel target: each group keeps its own target
    ``C0 * (1 - f)``, rounded as :func:`~pgp_det.pruning.groups.kept_count` rounds. FLOPs budget:
    one fraction ``r`` for all groups, each keeping ``C0 * (1 - r)`` rounded down or up to an
    allowed count; ``r`` and the rounding directions are searched so that the FLOPs meet the
    budget (see *Meeting a budget*).
``global``
    One ranking over all groups (FRS's global ranking; One-step pruning's "global pruning rate
    from which each layer's rate is set"): each group's scores are divided by their mean so
    groups compare on one scale (``normalisation "mean"``; with ``"none"`` they are ranked as
    they are, for a criterion that normalises its own scores: FRS's per-layer L2), and channels
    are taken lowest first (protected channels never, no group below its smallest allowed
    count). How far down the ranking to go is searched against the budget, channels or FLOPs.
    This is "in the spirit" of One-step pruning (Wang et al., "A One-step Pruning-recovery
    Framework for Acceleration of Convolutional Neural Networks", ICTAI 2019, arXiv 1906.07488):
    only its abstract could be read, which names a global rate from which every layer's rate is
    set by an optimisation objective, but gives neither the objective nor the importance measure.
    The ranking is what is implemented.
``knapsack``
    Keep the most value within the budget, as HALP does ("maximise kept importance subject to
    latency <= budget", arXiv 2110.10811, solved greedily here; HALP's own solver is not used).
    The value kept is additive, ``sum over kept channels of v[c]``, so it compares groups only
    when ``v`` is on one scale for all of them: ``values`` (``PRUNING.ALLOCATION.KNAPSACK_VALUE``
    ``taylor`` or ``taylor_squared``: the training-loss change of removing each channel,
    :mod:`~pgp_det.pruning.loss_change`), or, without them (``scores``), the criterion's scores
    put on one scale by ``normalisation`` (``"mean"``: every group's average channel is worth 1,
    so groups differ only in how their scores spread; ``"none"``: as they are). A group with no
    evidence (all-zero or missing values) is valued at the mean channel value of the others: never
    cut for free. Inside a group channels go in the criterion's order (lowest score first,
    protected channels never). Removing the next step of a group (down to one of its next
    :data:`_KNAPSACK_LOOKAHEAD` allowed counts) loses ``dV``, the values of the channels it
    removes, and saves cost ``dC``, predicted by the budget's own model with every other group
    at its current count (a layer's latency depends on both groups it reads and writes). The step
    with the least ``dV / dC`` is taken until the cost is within the budget (ratios are
    recomputed lazily: a step's saving only shrinks as its neighbours shrink), the last one being,
    of the steps that alone reach the budget, the one that loses the least; then steps are given
    back, most value per unit of cost first, while the budget still holds. Any budget works:
    latency, FLOPs, or channels.
``adaptive``
    In the spirit of PSAP (Li and Zhao, "Protective Self-Adaptive Pruning to Better Compress
    DNNs", arXiv 2303.11881), whose abstract says each layer's ratio is set, before each step,
    from the layer's weight sparsity ratio; the paper's formula, and what it counts as sparse,
    could not be read. Implemented: group ``g`` prunes the
    fraction ``r_g = min(s * sparsity_g, 0.95)`` of its original size, where ``sparsity_g`` is
    the sparsity of its *live* channels' producer weights (:func:`~pgp_det.pruning.channel_stats.weight_sparsity`) and the common
    factor ``s`` is searched against the budget, channels or FLOPs (every group alike when no
    group has any sparsity).

Meeting a budget (``global``, ``adaptive``, and ``uniform`` with a FLOPs or latency budget): the method
gives a raw kept count per group as a function of one parameter ``t`` (the fraction, the depth
in the ranking, the factor ``s``), never more than the group has now. Rounding every raw count
down to an allowed count, the smallest ``t`` whose cost is within the budget is found by
bisection; then groups are rounded back up, largest remainder first, each when the cost stays
within the budget. The cost is predicted, never above the budget, and within about one rounding
step of the cheapest group left below its raw count. A budget the method cannot meet even at its
most pruned raises :class:`~pgp_det.pruning.groups.PruningRequestError`.

Allowed kept counts: a multiple of ``lcm(multiple, group.channel_multiple)``, at least ``floor``,
as :func:`kept_count` decides (``multiple`` and ``floor`` relax for small groups; a GroupNorm's
``channel_multiple`` never does); keeping every current channel is always allowed.

Protection, in the spirit of PSAP's "protective reconstruction" (the abstract: gradients show
which filters are still needed; a secondary summary calls it "pulse gradient supervision"; its
rule could not be read either):
``protected`` marks channels that must not be in this step's weak set. The hook protects, with
:func:`~pgp_det.pruning.channel_stats.protect_by_gradient`, the channels whose *recent* gradient
(:class:`~pgp_det.pruning.criteria.RecentGradientCriterion`, an accumulator of its own whatever
the criterion) is in the top of their group. The next-weakest unprotected channels are taken
instead; when too few are left, the group prunes fewer (it never keeps fewer than its allowed
count requires), and the step may then stay above its budget.
"""
import dataclasses
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch

from detectron2.utils.registry import Registry

from .groups import ChannelGroup, PruningRequestError, kept_count

__all__ = [
    "ALLOCATION_REGISTRY",
    "KNAPSACK_OBJECTIVES",
    "AllocationRequest",
    "Budget",
    "allocate",
    "allowed_kept_counts",
]

ALLOCATION_REGISTRY = Registry("PRUNING_ALLOCATION")
ALLOCATION_REGISTRY.__doc__ = "fn(request: AllocationRequest) -> {group name: channels to keep (int)}"

# PRUNING.ALLOCATION.KNAPSACK_OBJECTIVE: how knapsack adds up what each group keeps
KNAPSACK_OBJECTIVES = ("sum", "log_share")

# no group is asked to prune more than this share of its original channels (adaptive)
MAX_ADAPTIVE_RATIO = 0.95
# relative slack when comparing a cost with its budget (float noise of sums of many terms)
_BUDGET_SLACK = 1e-9


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
class Budget:
    """A pruning step's budget: ``cost(kept) <= limit``.

    Attributes:
        cost: ``{group: kept channels} -> cost`` (groups left out keep their width).
        limit: the most ``cost`` may be after the step.
        describe: a cost in words, for messages (``"2.24 GFLOPs at 256x384"``).
    """

    cost: Callable[[Mapping[str, int]], float]
    limit: float
    describe: Callable[[float], str]


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
        step_budget: the step's :class:`Budget` (FLOPs, latency, ...: a
            :class:`~pgp_det.pruning.target.PruningTarget` gives it), or None: the step's budget
            is the channels of ``fractions``.
        normalisation: how ``global`` and ``knapsack`` put groups on one scale: ``"mean"``
            (divide by the group's mean) or ``"none"`` (the scores already are).
        values: ``{group: float32 CPU tensor (C,)}``, what keeping each channel is worth on a
            scale shared by all groups (``knapsack`` only; e.g. the loss change of removing it,
            :class:`~pgp_det.pruning.loss_change.LossChangeEstimate`), or None: the normalised
            scores are the values.
        knapsack_objective: how ``knapsack`` adds up a group's kept values (``KNAPSACK_OBJECTIVES``):
            ``"sum"`` or ``"log_share"`` (see :mod:`~pgp_det.pruning.knapsack`).
    """

    scores: Mapping[str, torch.Tensor]
    groups: Mapping[str, ChannelGroup]
    fractions: Mapping[str, float]
    original_sizes: Mapping[str, int]
    multiple: int
    floor: int
    weight_sparsity: Optional[Mapping[str, float]]
    protected: Mapping[str, torch.Tensor]
    step_budget: Optional[Budget] = None
    normalisation: str = "mean"
    values: Optional[Mapping[str, torch.Tensor]] = None
    knapsack_objective: str = "sum"

    @property
    def cost_budget(self) -> bool:
        """True when the budget is a cost of the widths (FLOPs, latency), not channels."""
        return self.step_budget is not None

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

    @property
    def budget(self) -> float:
        """The most :meth:`cost` may be after this step: the step budget's limit, else the
        scheduled kept channels ``sum C0 * (1 - fraction)``."""
        if self.step_budget is not None:
            return self.step_budget.limit
        return sum(self.original_sizes[n] * (1.0 - self.fractions[n]) for n in self.groups)

    def cost(self, kept: Mapping[str, int]) -> float:
        """What the budget limits, for ``kept[group]`` channels kept: the step budget's cost,
        else the kept channels summed over the groups."""
        if self.step_budget is not None:
            return self.step_budget.cost(kept)
        return float(sum(kept.values()))

    def describe(self, cost: float) -> str:
        """``cost`` in words, for messages."""
        if self.step_budget is not None:
            return self.step_budget.describe(cost)
        return f"{cost:.1f} channels"


# ---------------------------------------------------------------------------------------------
# Meeting a budget


def _meet_budget(
    request: AllocationRequest, method: str, raw_kept: Callable[[float], Mapping[str, float]], high: float,
    integral: bool = False,
) -> Dict[str, int]:
    """Allowed kept counts whose cost is at most the request's budget (module docstring, *Meeting
    a budget*).

    Args:
        method: the allocation's name, for messages.
        raw_kept: ``t -> {group: raw kept count}``, non-increasing in ``t``; ``raw_kept(0)`` keeps
            every channel. Counts above a group's current size are capped to it.
        high: the largest ``t`` worth searching (the method's most pruned configuration).
        integral: ``t`` is an integer (a depth in a ranking).

    Returns:
        ``{group: allowed kept count}``.
    """
    names = list(request.groups)
    current = {n: request.groups[n].size for n in names}
    allowed = {n: request.allowed(n) for n in names}

    def rounded(t: float):
        raw = {n: min(float(r), current[n]) for n, r in raw_kept(t).items()}
        lower = {n: max((a for a in allowed[n] if a <= raw[n] + 1e-9), default=allowed[n][0]) for n in names}
        upper = {n: min(a for a in allowed[n] if a >= raw[n] - 1e-9) for n in names}
        return raw, lower, upper

    limit = request.budget * (1.0 + _BUDGET_SLACK)

    def fits(kept: Mapping[str, int]) -> bool:
        return request.cost(kept) <= limit

    if fits(current):
        return current
    if not fits(rounded(high)[1]):
        raise PruningRequestError(
            f"{method} allocation cannot meet the budget of {request.describe(request.budget)}: pruning as much as "
            f"it can leaves {request.describe(request.cost(rounded(high)[1]))}; lower the target, the floor or "
            "the protection, or prune more scopes"
        )
    # bisection: the rounded-down counts miss the budget at `low`, meet it at `high`
    low = 0.0
    if integral:
        low, high = 0, int(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(rounded(middle)[1]) else (middle, high)
    else:
        for _ in range(100):
            middle = (low + high) / 2
            if middle in (low, high):
                break
            low, high = (low, middle) if fits(rounded(middle)[1]) else (middle, high)
    raw, kept, upper = rounded(high)

    # round back up, largest remainder first, while the budget holds
    def remainder(n: str) -> float:
        gap = upper[n] - kept[n]
        return (raw[n] - kept[n]) / gap if gap else -1.0

    for n in sorted(names, key=remainder, reverse=True):
        if upper[n] > kept[n]:
            trial = dict(kept)
            trial[n] = upper[n]
            if fits(trial):
                kept = trial
    return kept


# ---------------------------------------------------------------------------------------------
# Allocation methods


@ALLOCATION_REGISTRY.register()
def uniform(request: AllocationRequest) -> Dict[str, int]:
    """Each group keeps its own rounded target ``C0 * (1 - fraction)``; with a FLOPs or latency
    budget, one fraction for all groups, searched with cost-aware rounding."""
    if not request.cost_budget:
        return {name: request.target_kept(name) for name in request.groups}
    original = request.original_sizes
    return _meet_budget(request, "uniform", lambda r: {n: original[n] * (1.0 - r) for n in request.groups}, 1.0)


def _normalised_scores(request: AllocationRequest, name: str) -> torch.Tensor:
    """Group ``name``'s scores on the scale groups are compared on: divided by their mean
    (``normalisation "mean"``; all zero when the mean is not positive) or as they are."""
    scores = request.scores[name]
    if request.normalisation == "none":
        return scores.clone()
    mean = scores.mean()
    return scores / mean if mean > 0 else torch.zeros_like(scores)


def _global_ranking(request: AllocationRequest) -> Dict[str, int]:
    """One ranking of the scores over all groups (mean-normalised unless the request says
    ``"none"``), searched to the budget (see the module docstring)."""
    names = list(request.groups)
    current = [request.groups[n].size for n in names]

    # ranking: normalised score, protected channels last (never taken)
    normalised = [_normalised_scores(request, n).masked_fill(request.protected[n], math.inf) for n in names]
    flat = torch.cat(normalised)
    owner = torch.cat([torch.full((size,), i, dtype=torch.long) for i, size in enumerate(current)])
    order = torch.sort(flat, stable=True).indices
    # the owners of the channels taken, in the order taken: no group below its smallest count
    capacity = [size - request.allowed(n)[0] for n, size in zip(names, current)]
    removed = [0] * len(names)
    taken = []
    for value, group_index in zip(flat[order].tolist(), owner[order].tolist()):
        if math.isinf(value):
            break
        if removed[group_index] < capacity[group_index]:
            removed[group_index] += 1
            taken.append(group_index)
    taken = torch.tensor(taken, dtype=torch.long)

    def raw_kept(depth: float) -> Dict[str, int]:
        counts = torch.bincount(taken[: int(depth)], minlength=len(names)).tolist()
        return {n: size - k for n, size, k in zip(names, current, counts)}

    return _meet_budget(request, "global", raw_kept, len(taken), integral=True)


_global_ranking.__name__ = "global"  # the config name; `global` is a Python keyword
ALLOCATION_REGISTRY.register(_global_ranking)


@ALLOCATION_REGISTRY.register()
def adaptive(request: AllocationRequest) -> Dict[str, int]:
    """PSAP-style: group ``g`` prunes ``min(s * sparsity_g, 0.95)`` of its original size, ``s``
    searched to the budget (see the module docstring)."""
    if request.weight_sparsity is None:
        raise PruningRequestError(
            "adaptive allocation needs weight_sparsity ({group: sparsity}; see weight_sparsity(model, groups))"
        )
    names = list(request.groups)
    missing = [n for n in names if n not in request.weight_sparsity]
    if missing:
        raise PruningRequestError(f"adaptive allocation: no weight sparsity for group {missing[0]}")
    weights = {n: float(request.weight_sparsity[n]) for n in names}
    bad = [n for n, s in weights.items() if not 0.0 <= s <= 1.0]
    if bad:
        raise PruningRequestError(f"weight sparsity of {bad[0]} must be in [0, 1], got {weights[bad[0]]}")
    if not any(weights.values()):
        weights = {n: 1.0 for n in names}  # no sparsity anywhere: every group alike
    original = request.original_sizes

    def raw_kept(scale: float) -> Dict[str, float]:
        return {n: original[n] * (1.0 - min(scale * weights[n], MAX_ADAPTIVE_RATIO)) for n in names}

    # beyond this factor every group with some sparsity is at the largest ratio
    high = MAX_ADAPTIVE_RATIO / min(w for w in weights.values() if w > 0)
    return _meet_budget(request, "adaptive", raw_kept, high)


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
    scores, groups, fraction, original_sizes, multiple, floor, weight_sparsity, protected, budget=None,
) -> AllocationRequest:
    _check_positive_int("multiple", multiple)
    _check_positive_int("floor", floor)
    if budget is not None:
        limit = budget.limit
        if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not limit > 0:
            raise PruningRequestError(f"a budget's limit must be a number > 0, got {limit!r}")
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
    return AllocationRequest(
        checked_scores, groups, fractions, sizes, multiple, floor, weight_sparsity, masks, step_budget=budget)


def _checked_values(values, groups) -> Optional[Dict[str, torch.Tensor]]:
    """``values`` as float32 CPU tensors, each with one finite entry per channel (None stays None)."""
    if values is None:
        return None
    checked = OrderedDict()
    for name, value in values.items():
        if name not in groups:
            continue
        value = torch.as_tensor(value).detach().float().cpu().reshape(-1)
        if value.numel() != groups[name].size or not torch.isfinite(value).all():
            raise PruningRequestError(f"{name}: knapsack values must be {groups[name].size} finite numbers")
        checked[name] = value
    return checked


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
    budget: Optional[Budget] = None,
    normalisation: str = "mean",
    values: Optional[Mapping[str, torch.Tensor]] = None,
    knapsack_objective: str = "sum",
) -> Dict[str, List[int]]:
    """The weak set of every group at one pruning step.

    Args:
        method: a name in :data:`ALLOCATION_REGISTRY`: ``uniform``, ``global``, ``knapsack``,
            ``adaptive``.
        scores: ``{group: (C,) float scores}`` from a criterion (higher = keep).
        groups: the groups being pruned (prunable), with their current sizes ``C``.
        fraction: the schedule's pruned fraction of each group's *original* size after this step,
            in ``[0, 1)``; one float, or ``{group: fraction}`` for per-scope schedules. With
            a ``budget`` the budget decides and the fractions are only checked.
        original_sizes: ``{group: C0}``, sizes before any pruning.
        multiple, floor: rounding of kept counts (see :func:`~pgp_det.pruning.groups.kept_count`).
        weight_sparsity: ``{group: sparsity}`` for ``adaptive`` (:func:`weight_sparsity`).
        protected: ``{group: bool (C,)}``, channels that must not be in a weak set this step.
        budget: the step's :class:`Budget` (a cost of the kept widths and its limit: FLOPs,
            latency, ...); None: the budget is the channels of ``fraction``.
        normalisation: ``global`` and ``knapsack``: ``"mean"`` divides each group's scores by
            their mean, ``"none"`` takes them as given (a criterion's ``global_normalisation``).
        values: ``knapsack``: ``{group: (C,)}`` worth of each channel on one scale for all groups
            (``PRUNING.ALLOCATION.KNAPSACK_VALUE``); None: the scores normalised by ``normalisation``.
        knapsack_objective: ``knapsack``: ``"sum"`` or ``"log_share"``
            (``PRUNING.ALLOCATION.KNAPSACK_OBJECTIVE``, :data:`KNAPSACK_OBJECTIVES`).

    Returns:
        ``{group: sorted current indices of the channels that should not survive this step}``,
        an entry (possibly empty) for every group; ``C - len(weak)`` is an allowed kept count.

    Raises:
        PruningRequestError: unknown method, inputs that do not match the groups, or a budget the
            method cannot meet.
    """
    if method not in ALLOCATION_REGISTRY:
        known = ", ".join(sorted(n for n, _ in ALLOCATION_REGISTRY))
        raise PruningRequestError(f"unknown allocation method {method!r}; known: {known}")
    if normalisation not in ("mean", "none"):
        raise PruningRequestError(f"unknown score normalisation {normalisation!r}; use 'mean' or 'none'")
    if knapsack_objective not in KNAPSACK_OBJECTIVES:
        raise PruningRequestError(f"unknown knapsack objective {knapsack_objective!r}; use one of "
                                  f"{', '.join(KNAPSACK_OBJECTIVES)}")
    request = _build_request(
        scores, groups, fraction, original_sizes, multiple, floor, weight_sparsity, protected, budget)
    request = dataclasses.replace(request, normalisation=normalisation, values=_checked_values(values, request.groups),
                                  knapsack_objective=knapsack_objective)
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
