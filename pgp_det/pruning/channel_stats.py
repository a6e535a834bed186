"""What the allocations read about channels besides their scores: the weight sparsity of each
group's live channels (the ``adaptive`` allocation, PSAP-style) and the channels a recent gradient
protects from a step (``PRUNING.ALLOCATION.PROTECT_QUANTILE``). See :mod:`pgp_det.pruning.allocation`.
"""
from collections import OrderedDict
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ..utils.modules import unwrap_model
from .groups import ChannelGroup, PruningRequestError

__all__ = ["protect_by_gradient", "weight_sparsity"]


@torch.no_grad()
def weight_sparsity(
    model: nn.Module,
    groups: Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]],
    threshold: float = 0.01,
    excluded: Optional[Mapping[str, Iterable[int]]] = None,
) -> Dict[str, float]:
    """Share of each prunable group's producer weights that are near zero, over its *live* channels.

    A weight entry of producer layer ``l`` counts as sparse when ``|w| <= threshold * max |W_l|``
    (relative to the layer's largest live entry, so layers of any scale compare). A group's
    sparsity is the sparse share over its live channels' filters (rows ``W_l[c]`` of the producer
    layers' conv/linear ``weight``; norms and biases left out). Channels pruning zeroed are not
    live: they would make the groups pruned last look the sparsest.

    Args:
        excluded: ``{group: channel indices}`` that are not live, e.g. the channels the last
            pruning step zeroed (exactly zero, or grown back a little since).

    Returns:
        ``{group name: float in [0, 1]}`` (0 for a group without a live channel).
    """
    if not threshold >= 0:
        raise PruningRequestError(f"threshold must be >= 0, got {threshold}")
    if isinstance(groups, Mapping):
        groups = groups.values()
    model = unwrap_model(model)
    excluded = excluded or {}
    result = OrderedDict()
    for group in groups:
        if not group.prunable:
            continue
        live = torch.ones(group.size, dtype=torch.bool)
        live[torch.as_tensor(list(excluded.get(group.name, ())), dtype=torch.long)] = False
        sparse, total = 0, 0
        for layer in group.producer_layers:
            weight = model.get_submodule(layer).weight.detach()  # (C, ...): the group's channels on dim 0
            magnitude = weight.abs().reshape(weight.shape[0], -1)[live.to(weight.device)]
            if magnitude.numel():
                sparse += int((magnitude <= threshold * magnitude.max()).sum())
                total += magnitude.numel()
        result[group.name] = sparse / total if total else 0.0
    return result


def protect_by_gradient(grad_scores: Mapping[str, torch.Tensor], quantile: float = 0.9) -> Dict[str, torch.Tensor]:
    """Channels whose recent gradient score is in the top of their group, to keep out of a weak set.

    Args:
        grad_scores: ``{group: (C,) scores}``, e.g. the scores of the hook's
            :class:`~pgp_det.pruning.criteria.RecentGradientCriterion` (gradient magnitude of the
            last iterations before the step).
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
