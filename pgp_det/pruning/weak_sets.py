"""What becomes of a step's weak sets: which of them are removed now and which zeroed
(:func:`split_hard_soft`, ``PRUNING.SOFT.REMOVE_RATIO``), and, at the last step, the weak sets that
leave every group at an allowed width (:func:`whole_widths`). The weak sets themselves come from
:func:`pgp_det.pruning.allocation.allocate`.
"""
import math
import numbers
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .allocation import _group_dict, allowed_kept_counts
from .groups import ChannelGroup, PruningRequestError

__all__ = ["split_hard_soft", "whole_widths"]


def whole_widths(
    weak: Mapping[str, Sequence[int]],
    scores: Mapping[str, torch.Tensor],
    groups: Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]],
    multiple: int = 8,
    floor: int = 8,
) -> Dict[str, List[int]]:
    """Weak sets that leave every group at an allowed multiple, for the last pruning step.

    Between steps a group's width is its kept count plus the channels the step zeroed (any
    number: :func:`split_hard_soft` removes the share asked for), and "keep every current channel"
    is always an allowed count. At the last step that would leave such a width for good: a group
    that keeps all of a width that is not a multiple of ``lcm(multiple, channel_multiple)`` also
    gives up its lowest-scored kept channels down to the largest allowed count below it.

    Returns:
        ``{group: sorted weak indices}``, a superset of ``weak``.
    """
    groups = _group_dict(groups)
    settled = OrderedDict()
    for name, channels in weak.items():
        group = groups[name]
        channels = sorted(int(c) for c in channels)
        kept = group.size - len(channels)
        lower = [a for a in allowed_kept_counts(group.size, multiple, floor, group.channel_multiple) if a < kept]
        if kept == group.size and lower and group.size % math.lcm(multiple, group.channel_multiple):
            score = torch.as_tensor(scores[name]).detach().float().cpu().reshape(-1)
            taken = set(channels)
            weakest_first = [c for c in torch.sort(score, stable=True).indices.tolist() if c not in taken]
            channels = sorted(channels + weakest_first[: kept - lower[-1]])
        settled[name] = channels
    return settled


def _removal_count(size: int, weak: int, remove_ratio: float, channel_multiple: int) -> int:
    """How many of ``weak`` channels to remove now (see :func:`split_hard_soft`)."""
    if remove_ratio >= 1.0:
        return weak
    ideal = remove_ratio * weak
    candidates = [r for r in range(weak + 1) if (size - r) % channel_multiple == 0]  # 0 always is
    # nearest to the ideal share; a tie goes to removing more
    return min(candidates, key=lambda r: (abs(r - ideal), -r))


def split_hard_soft(
    weak: Mapping[str, Sequence[int]],
    scores: Mapping[str, torch.Tensor],
    remove_ratio: float,
    groups: Optional[Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]]] = None,
) -> Tuple[Dict[str, List[int]], Dict[str, List[int]]]:
    """Split each weak set into channels removed now (hard) and channels zeroed (soft).

    Of group ``g``'s weak set of ``w`` channels, the lowest-scored ``n`` are removed and the rest
    zeroed, ``n`` the whole number nearest ``remove_ratio * w`` (a tie removes more): the share
    removed is ``remove_ratio`` up to the rounding to whole channels, whatever ``w``. The one
    exception is a GroupNorm group (``channel_multiple`` > 1), whose width must stay a multiple of
    its channels per norm group: ``n`` is the nearest count that keeps it so (removing none
    always does). The widths in between steps are therefore not rounded to hardware-friendly
    multiples; the kept counts, and so the widths after the last step, are.
    ``remove_ratio == 1`` removes the whole weak set (the last pruning step).

    Args:
        weak: ``{group: channel indices}``, e.g. from :func:`allocate`.
        scores: ``{group: (C,) scores}``; ``C`` is the group's current size.
        remove_ratio: in ``[0, 1]``.
        groups: the groups, for their ``channel_multiple`` (1 when not given).

    Returns:
        ``(remove, zero)``: ``{group: sorted indices}`` each, an entry for every group in ``weak``.
    """
    if isinstance(remove_ratio, bool) or not isinstance(remove_ratio, numbers.Real) or not 0.0 <= remove_ratio <= 1.0:
        raise PruningRequestError(f"remove_ratio must be in [0, 1], got {remove_ratio!r}")
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
        count = _removal_count(size, len(channels), float(remove_ratio), channel_multiple)
        ordered = sorted(channels, key=lambda c: (score[c].item(), c))  # weakest first, ties by index
        remove[name] = sorted(ordered[:count])
        zero[name] = sorted(ordered[count:])
    return remove, zero
