"""Channel pruning of detectron2's Faster R-CNN, one job per module:

* :mod:`.groups`: :class:`ChannelGroup` and its records, :func:`kept_count` rounding,
  :func:`format_groups` table, :class:`PruningRequestError`.
* :mod:`.dependency`: :func:`derive_channel_groups` walks a built ``GeneralizedRCNN``.
* :mod:`.surgery`: :func:`soft_prune` (zero filters, modes ``pgp``/``sfp``/``output``),
  :func:`hard_prune` (remove, optimizer included), :class:`ChannelMasks` (hold zeroed channels
  at zero).
* :mod:`.fold`: the constant a zeroed channel outputs, folded into its consumers on removal.
* :mod:`.criteria`: channel scores by name (``CRITERION_REGISTRY``: pgp, pgp_pass, l1, l2,
  taylor, bn_gamma, frs).
* :mod:`.schedules`: pruned fraction per step (``SCHEDULE_REGISTRY``), and the iterations the steps
  happen at.
* :mod:`.allocation`: which channels a step prunes (``ALLOCATION_REGISTRY``: uniform, global,
  adaptive; :mod:`.knapsack` registers knapsack); :mod:`.channel_stats`: weight sparsity and
  gradient protection they read; :mod:`.weak_sets`: the hard/soft split and whole widths.
* :mod:`.cost`: FLOPs and parameters per group and family, predicted for any pruned widths.
* :mod:`.target`: what a run must reach (channels, FLOPs, or the latency a device's table of
  :mod:`pgp_det.latency` predicts) and each step's budget.
* :mod:`.settings`: the ``PRUNING`` config checked at start-up (:func:`~.settings.check_pruning_config`).
* :mod:`.hook`: :class:`~.hook.PGPHook`, pruning while detectron2 trains.
"""
from . import knapsack  # noqa: F401  (registers the knapsack allocation)
from .dependency import derive_channel_groups, prediction_layers
from .fold import Fold, fold_zeroed_channels, zeroed_channels
from .groups import (
    SCOPES, ChannelCount, ChannelGroup, ChannelSlice, ChannelSource, PruningRequestError, format_groups, kept_count,
)
from .surgery import SOFT_MODES, ChannelMasks, hard_prune, soft_prune, validate_removals

__all__ = [
    "SCOPES",
    "ChannelCount",
    "ChannelGroup",
    "ChannelMasks",
    "ChannelSlice",
    "ChannelSource",
    "derive_channel_groups",
    "Fold",
    "fold_zeroed_channels",
    "format_groups",
    "hard_prune",
    "kept_count",
    "prediction_layers",
    "PruningRequestError",
    "SOFT_MODES",
    "soft_prune",
    "validate_removals",
    "zeroed_channels",
]
