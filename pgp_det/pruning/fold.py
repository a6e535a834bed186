"""What a zeroed channel still outputs, and folding it into the consumers when the channel is removed.

A channel is *zeroed* when every filter row that computes it (group slices with role
``"filter"``) is 0. Soft pruning keeps the producers' biases and their norms' scale, shift and
statistics, because they carry the gradient back to the zeroed filter. So a zeroed channel does
not output 0: each producing layer outputs, on that channel, its bias passed through its norm, a
constant ``b`` per channel; the consumer reads ``c = activation(sum of b + what is added)`` as
described by the group's :class:`~pgp_det.pruning.groups.ChannelSource` s (identity shortcuts,
FPN's top-down sum, the ReLU of detectron2's blocks, the RPN conv and the box head; nothing after
FPN convs). Removing the channel takes ``c`` away from the consumer's input; for a consumer that
reads a constant map through weights ``W[:, k]`` (a conv kernel or ``expand`` columns of a linear)
its output loses the *drift* ``d = sum(W[:, k]) * c``, shape ``(out_channels,)``.
:func:`fold_zeroed_channels` adds ``d`` back before the channel is removed:

* into the consumer's bias when it has one (added before any norm, so exact);
* else into the running mean of its BatchNorm / SyncBatchNorm / FrozenBatchNorm2d
  (``running_mean -= d``): exact in eval mode, and also in BatchNorm's training mode, whose batch
  statistics absorb a per-channel constant;
* nowhere under GroupNorm (the constant enters the statistics of its GN group) or without bias
  and norm (detectron2 ResNets with ``NORM ""`` have neither; their zeroed channels output 0
  anyway, since those convs have no bias).

Exact (removal leaves the detector's outputs unchanged up to float rounding): linear consumers
(box head ``fc1 -> fc2``, ``fc2 -> box predictor``, C4's ``res5`` stream -> predictor through the
spatial mean) and unpadded convs (1x1: bottleneck ``conv1``/``conv3``, shortcuts, FPN laterals,
RPN objectness / anchor deltas), provided every source gives the same constant.

Not exact, and why:

* zero-padded convs (3x3: bottleneck ``conv2``, both BasicBlock convs, FPN output convs, the RPN
  conv, box-head convs): exact away from the border; on the outer ring (1 pixel for 3x3) the
  kernel taps in the padding never read ``c``, and the fold over-corrects there;
* ROIAlign (box head ``fc1``/``conv1`` over FPN levels, C4's ``res5``): samples falling outside
  the feature map read 0, not ``c``, for boxes that cross the image border;
* several sources with different constants: the RPN conv and the box head read every FPN level,
  and each level's output conv has its own bias. The mean over sources is folded (it minimises
  the squared error summed over the levels);
* GroupNorm producers: the channel's output depends on the other channels of its GN group and is
  not constant; nothing is folded (removing channels through GN is not function-preserving
  anyway, see :mod:`pgp_det.pruning.surgery`);
* BatchNorm producers are evaluated with their running statistics (eval mode, what a deployed
  detector computes). In training mode a zeroed channel's BN outputs its shift exactly; the
  running mean of a zeroed channel decays geometrically (BN momentum 0.1 per iteration), so the
  two agree after some tens of iterations.

``tests/test_soft_recovery.py`` checks the exact cases; docs/methods.md reports the measured change
of the detector's outputs for the others.
"""
import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d

from .groups import ROLE_FILTER, ChannelGroup, ChannelSlice, ChannelSource

__all__ = ["Fold", "zeroed_channels", "fold_zeroed_channels"]

logger = logging.getLogger(__name__)


@dataclass
class Fold:
    """One consumer's share of a fold.

    Attributes:
        group: the group whose zeroed channels are removed.
        consumer: the consuming layer (qualified name).
        channels: number of zeroed channels removed from its input.
        target: where the drift went: ``"bias"``, ``"norm.running_mean"``, or ``""`` (not folded,
            or nothing to fold: the channels output 0).
        exact: True when the removal leaves this consumer's output unchanged.
        note: why it is not exact or not folded ("" when exact).
        drift: largest ``|d|`` over the consumer's outputs (before folding).
    """

    group: str
    consumer: str
    channels: int
    target: str
    exact: bool
    note: str = ""
    drift: float = 0.0


def zeroed_channels(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Bool mask, shape ``(group.size,)`` on the CPU: True where every filter row computing the
    channel (every producer slice of role ``"filter"``) is exactly 0."""
    mask = torch.ones(group.size, dtype=torch.bool)
    for piece in group.producers:
        if piece.role == ROLE_FILTER:
            rows = piece.per_channel(piece.get(model).detach())
            mask &= (rows == 0).all(dim=1).cpu()
    return mask


# ---------------------------------------------------------------------------------------------
# The constant of a zeroed channel


def _norm_of_constant(norm: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``norm`` applied (eval mode) to a map whose channel ``k`` is the constant ``x[k]``;
    None when the result is not a per-channel constant (GroupNorm) or the norm is unknown."""
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
        return (x - norm.running_mean.double()) * scale + norm.bias.double()
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if norm.running_mean is not None:
            x = (x - norm.running_mean.double()) * (norm.running_var.double() + norm.eps).rsqrt()
        else:  # no running statistics: batch statistics of a constant map give 0
            x = torch.zeros_like(x)
        if norm.affine:
            x = x * norm.weight.detach().double() + norm.bias.detach().double()
        return x
    return None


def _zero_filter_output(model: nn.Module, name: str, cache: Dict) -> Optional[torch.Tensor]:
    """What layer ``name`` outputs per channel when its filter rows are 0: its bias (or 0), then
    its norm (detectron2 ``Conv2d.norm``). Float64, shape ``(out_channels,)``; None if unknown."""
    if name not in cache:
        layer = model.get_submodule(name)
        if layer.bias is not None:
            value = layer.bias.detach().double()
        else:
            value = torch.zeros(layer.weight.shape[0], dtype=torch.float64, device=layer.weight.device)
        norm = getattr(layer, "norm", None)
        cache[name] = value if norm is None else _norm_of_constant(norm, value)
    return cache[name]


def _source_value(model: nn.Module, source: ChannelSource, cache: Dict) -> Optional[torch.Tensor]:
    """Per channel, the constant a consumer reads through ``source`` where the channel is zeroed
    (valid at zeroed channels only). None when it cannot be computed."""
    total = None
    for name in source.layers:
        value = _zero_filter_output(model, name, cache)
        if value is None:
            return None
        total = value if total is None else total + value
    if source.plus is not None:
        plus = _source_value(model, source.plus, cache)
        if plus is None:
            return None
        total = total + plus
    total = total * source.scale
    if source.activation == "relu":
        return total.clamp_min(0.0)
    if source.activation is None:
        return total
    return None


def _not_constant_reason(model: nn.Module, source: ChannelSource) -> str:
    for name in source.layers:
        norm = getattr(model.get_submodule(name), "norm", None)
        if norm is not None and not isinstance(norm, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            return f"{name} has a {type(norm).__name__}: a zeroed channel's output is not constant"
    if source.activation not in (None, "relu"):
        return f"unknown activation after {source.layers[0]}"
    if source.plus is not None:
        return _not_constant_reason(model, source.plus)
    return "a producer's output on a zeroed channel is not known"


# ---------------------------------------------------------------------------------------------
# Folding


def _drift(model: nn.Module, piece: ChannelSlice, channels: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """``d[o] = sum over channel k's weights of W[o, k...] * constant[k]``, float64, shape (out,)."""
    weight = piece.get(model).detach()
    columns = weight.index_select(piece.dim, piece.positions(channels).to(weight.device)).double()
    per_channel = columns.movedim(piece.dim, 1).reshape(columns.shape[0], channels.numel(), -1).sum(-1)
    return per_channel @ constant.to(per_channel.device)


def _fold_target(layer: nn.Module):
    """(tensor to add the drift to, sign, name) for ``layer``, or (None, 0, reason)."""
    if layer.bias is not None:
        return layer.bias, 1.0, "bias"
    norm = getattr(layer, "norm", None)
    if isinstance(norm, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)) and norm.running_mean is not None:
        return norm.running_mean, -1.0, "norm.running_mean"
    if norm is not None:
        return None, 0.0, f"no bias, and its {type(norm).__name__} cannot absorb a per-channel constant"
    return None, 0.0, "no bias and no norm to fold into"


def _inexact_reasons(layer: nn.Module, sources: Sequence[ChannelSource], constants: torch.Tensor) -> List[str]:
    reasons = []
    if isinstance(layer, nn.Conv2d) and any(p != 0 for p in _padding(layer)):
        reasons.append("zero padding: exact away from the border only")
    if not all(s.exact() for s in sources):
        reasons.append("ROIAlign: samples outside the feature map read 0")
    if constants.shape[0] > 1:
        spread = (constants.max(0).values - constants.min(0).values).abs().max().item()
        if spread > 1e-6 * max(1.0, constants.abs().max().item()):
            reasons.append(f"its {constants.shape[0]} input levels give different constants: their mean is folded")
    return reasons


def _padding(conv: nn.Conv2d):
    if isinstance(conv.padding, str):  # "valid", or "same" (which pads unless the kernel is 1x1)
        return (0,) if conv.padding == "valid" or all(k == 1 for k in conv.kernel_size) else (1,)
    return conv.padding


@torch.no_grad()
def fold_zeroed_channels(
    model: nn.Module, groups: Mapping[str, ChannelGroup], removals: Mapping[str, Sequence[int]]
) -> List[Fold]:
    """Before ``removals`` are removed: fold the constant output of every removed channel that is
    zeroed into the consumers that read it (see the module docstring for where this is exact).

    Channels whose filters are not all zero are left alone (removing them changes the outputs,
    as any hard pruning does). All drifts are computed before any is applied; a zeroed channel's
    constant does not depend on other folds, since a fold into a layer adds ``0`` to the rows
    of its own zeroed channels.

    Args:
        model: the model ``groups`` were derived from, before the removal.
        groups: its channel groups.
        removals: ``{group name: channel indices about to be removed}`` (validated).

    Returns:
        one :class:`Fold` per (group, consumer) that had zeroed channels removed from its input.
    """
    planned = []
    folds: List[Fold] = []
    cache: Dict = {}
    for name, removed in removals.items():
        group = groups[name]
        removed = torch.as_tensor(list(removed), dtype=torch.long)
        if removed.numel() == 0:
            continue
        channels = removed[zeroed_channels(model, group)[removed]]
        if channels.numel() == 0:
            continue
        for piece in group.consumers:
            layer = model.get_submodule(piece.module)
            sources = group.sources.get(piece.module, ())
            values = [_source_value(model, s, cache) for s in sources]
            record = Fold(group=name, consumer=piece.module, channels=int(channels.numel()), target="", exact=False)
            folds.append(record)
            if not sources or any(v is None for v in values):
                record.note = _not_constant_reason(model, sources[0]) if sources else "unknown input"
                continue
            constants = torch.stack([v[channels.to(v.device)] for v in values])  # (sources, zeroed)
            if not constants.abs().max() > 0:  # the channels output 0 (no bias, or a ReLU'd shift <= 0)
                record.exact = True
                continue
            drift = _drift(model, piece, channels, constants.mean(0))
            record.drift = drift.abs().max().item() if drift.numel() else 0.0
            target, sign, where = _fold_target(layer)
            if target is None:
                record.note = where
                continue
            record.target = where
            reasons = _inexact_reasons(layer, sources, constants)
            record.exact, record.note = not reasons, "; ".join(reasons)
            planned.append((target, sign * drift))
    for target, delta in planned:
        target.add_(delta.to(device=target.device, dtype=target.dtype))
    if folds:
        inexact = [f for f in folds if not f.exact and f.drift > 0]
        logger.debug(
            "folded the constants of zeroed channels into %d consumers (%d not exact%s)",
            sum(1 for f in folds if f.target), len(inexact),
            ": " + ", ".join(f"{f.consumer} ({f.note})" for f in inexact[:3]) if inexact else "",
        )
    return folds
