"""The ``knapsack`` allocation (``PRUNING.ALLOCATION.NAME knapsack``): keep the most value within a
step's budget, greedy by value lost per unit of cost saved. What a channel is worth, and how the
greedy steps and give-backs go, is described in :mod:`pgp_det.pruning.allocation`'s docstring;
this module registers the method in :data:`~pgp_det.pruning.allocation.ALLOCATION_REGISTRY`
(imported by :mod:`pgp_det.pruning`, so the name is known wherever the package is).
"""
import heapq
import math
from collections import OrderedDict
from typing import Dict

import torch

from .allocation import ALLOCATION_REGISTRY, AllocationRequest, _BUDGET_SLACK, _normalised_scores
from .groups import PruningRequestError

__all__ = ["knapsack"]

_KNAPSACK_LOOKAHEAD = 4  # counts a knapsack step may go down at once


def _knapsack_values(request: AllocationRequest) -> Dict[str, torch.Tensor]:
    """``{group: float64 (C,)}`` value of keeping each channel, >= 0: ``request.values`` when
    given, else the normalised scores. A group without evidence (no values, or all zero) is
    valued at the mean channel value of the groups that have some (1 when none has), so it is
    never cut for free nor spared for nothing."""
    raw = OrderedDict()
    for n in request.groups:
        given = None if request.values is None else request.values.get(n)
        value = _normalised_scores(request, n) if request.values is None else given
        raw[n] = None if value is None else value.double().clamp(min=0)
    evidence = [v for v in raw.values() if v is not None and float(v.sum()) > 0]
    typical = float(torch.cat(evidence).mean()) if evidence else 1.0
    return OrderedDict(
        (n, v if v is not None and float(v.sum()) > 0 else torch.full((request.groups[n].size,), typical, dtype=torch.float64))
        for n, v in raw.items())


def _log_share_loss(removed, total: float):
    """``total * log(total / kept)`` for each cumulative removed value (``kept = total - removed``):
    the removed value itself while little is removed (its first-order term), growing without bound
    as the group's kept value goes to zero. ``kept`` is floored at a millionth of ``total`` so a
    group whose last channels are worth nothing stays finite."""
    if total <= 0:
        return list(removed)
    floor = 1e-6 * total
    return [total * math.log(total / max(total - r, floor)) for r in removed]


@ALLOCATION_REGISTRY.register()
def knapsack(request: AllocationRequest) -> Dict[str, int]:
    """The most value kept within the budget: greedy by value lost per unit of cost saved, with
    the budget checked on the exact predicted cost (see the module docstring)."""
    names = list(request.groups)
    order = {n: i for i, n in enumerate(names)}
    current = {n: request.groups[n].size for n in names}
    values = _knapsack_values(request)
    counts, lost_at = {}, {}
    for n in names:
        protected = request.protected[n]
        # removal order: the criterion's lowest scores first (as _weakest takes them), protected never
        removal = torch.sort(request.scores[n].masked_fill(protected, math.inf), stable=True).indices
        removal = removal[: int((~protected).sum())]
        # value lost when the group keeps k channels: the values of the C - k channels removed
        lost = [0.0] + torch.cumsum(values[n][removal], 0).tolist()
        if request.knapsack_objective == "log_share":
            lost = _log_share_loss(lost, float(values[n].sum()))
        lost_at[n] = lambda k, lost=lost, size=current[n]: lost[size - k]
        counts[n] = [a for a in request.allowed(n) if a >= current[n] - len(removal)]  # ascending, ends at C
    position = {n: len(counts[n]) - 1 for n in names}  # index of the kept count in counts[n]
    kept = dict(current)
    limit = request.budget * (1.0 + _BUDGET_SLACK)
    cost = request.cost(kept)
    if cost <= limit:
        return kept
    smallest = request.cost({n: counts[n][0] for n in names})
    if smallest > limit:
        raise PruningRequestError(
            f"knapsack allocation cannot meet the budget of {request.describe(request.budget)}: pruning as much as it "
            f"can leaves {request.describe(smallest)}; lower the target, the floor or the protection, or prune more "
            "scopes"
        )

    def step_down(n: str):
        """``(value lost / cost saved, value lost, order, n, cost after, position after)``
        of group ``n``'s best step down, or None at its smallest count. A step goes down to one of
        the next :data:`_KNAPSACK_LOOKAHEAD` counts, the best ratio of them: a device's cost can
        stay flat over a few counts (a CPU computes 16 channels for 8), which a one-count step
        would never cross. A step that saves nothing sorts last."""
        best = None
        for lower_position in range(position[n] - 1, max(position[n] - 1 - _KNAPSACK_LOOKAHEAD, -1), -1):
            lower = counts[n][lower_position]
            trial = dict(kept)
            trial[n] = lower
            after = request.cost(trial)
            saved = cost - after
            loss = lost_at[n](lower) - lost_at[n](kept[n])
            key = (loss / saved if saved > 0 else math.inf, loss, order[n], n, after, lower_position)
            if best is None or key[0] < best[0]:
                best = key
        return best

    # lazy greedy: a popped ratio computed before the last accepted step is recomputed first
    accepted = 0
    heap = [(*key, accepted) for key in map(step_down, names) if key is not None]
    heapq.heapify(heap)
    while cost > limit and heap:
        *key, stamp = heapq.heappop(heap)
        n = key[3]
        if stamp != accepted:
            fresh = step_down(n)
            if fresh is not None:
                heapq.heappush(heap, (*fresh, accepted))
            continue
        if key[4] <= limit:
            # the last step: of the steps that alone meet the budget, the one losing the least
            # (then saving the least), not necessarily the best ratio (greedy knapsack's fix-up)
            finishing = [k for k in map(step_down, names) if k is not None and k[4] <= limit]
            key = min(finishing, key=lambda k: (k[1], -k[4], k[2]))
            n = key[3]
        position[n] = key[5]
        kept[n] = counts[n][position[n]]
        cost = request.cost(kept)
        accepted += 1
        fresh = step_down(n)
        if fresh is not None:
            heapq.heappush(heap, (*fresh, accepted))
    if cost > limit:  # every group at its smallest count, which fits: cannot happen
        raise AssertionError(f"knapsack allocation left {request.describe(cost)} above its budget")

    # give steps back, most value regained per unit of cost first, while the budget holds
    while True:
        best = None
        for n in names:
            if position[n] + 1 == len(counts[n]):
                continue
            upper = counts[n][position[n] + 1]
            trial = dict(kept)
            trial[n] = upper
            trial_cost = request.cost(trial)
            if trial_cost > limit:
                continue
            gain = lost_at[n](kept[n]) - lost_at[n](upper)
            added = trial_cost - cost
            value = (gain / added if added > 0 else math.inf, gain, -order[n])
            if best is None or value > best[0]:
                best = (value, n, trial_cost)
        if best is None:
            return kept
        _, n, cost = best
        position[n] += 1
        kept[n] = counts[n][position[n]]
