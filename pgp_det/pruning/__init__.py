"""Channel pruning of detectron2's Faster R-CNN: coupled channel groups and model surgery.

* :mod:`.groups`: :class:`ChannelGroup` and its records, :func:`kept_count` rounding,
  :func:`format_groups` table, :class:`PruningRequestError`.
* :mod:`.dependency`: :func:`derive_channel_groups` walks a built ``GeneralizedRCNN``.
* :mod:`.surgery`: :func:`soft_prune` (zero), :func:`hard_prune` (remove, optimizer included),
  :class:`ChannelMasks` (hold zeroed channels at zero).
"""
from .dependency import derive_channel_groups, prediction_layers
from .groups import SCOPES, ChannelCount, ChannelGroup, ChannelSlice, PruningRequestError, format_groups, kept_count
from .surgery import ChannelMasks, hard_prune, rebuild_optimizer, soft_prune, validate_removals

__all__ = [
    "SCOPES",
    "ChannelCount",
    "ChannelGroup",
    "ChannelMasks",
    "ChannelSlice",
    "derive_channel_groups",
    "format_groups",
    "hard_prune",
    "kept_count",
    "prediction_layers",
    "PruningRequestError",
    "rebuild_optimizer",
    "soft_prune",
    "validate_removals",
]
