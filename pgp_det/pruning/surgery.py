"""Soft pruning (zero channels in place) and hard pruning (remove them) of channel groups.

Both work on channel *indices* of :class:`~pgp_det.pruning.groups.ChannelGroup` s, and both keep
an optimizer consistent with the model:

* :func:`soft_prune` zeroes channels in place, in one of three modes (:data:`SOFT_MODES`):

  - ``"pgp"`` (recoverable; the PGP paper's wording): zero the filter rows (slices of role
    ``"filter"``) and their optimizer state (SGD ``momentum_buffer``, Adam moments), keep the
    layer's bias and the norm's scale, shift and running statistics. The channel outputs a
    constant and still receives gradient, so it can grow back. Under a BatchNorm in training
    mode that gradient is large: the zeroed channel's batch variance is 0, so the norm scales
    the gradient reaching the filter by ``gamma / sqrt(eps)`` (about 300 ``gamma`` at
    ``eps = 1e-5``), and the channel comes back at full strength after one step.
  - ``"sfp"`` (SFP/PSFP, He et al., IJCAI 2018): as ``"pgp"`` but every optimizer state is
    left untouched, so momentum moves the zeroed filter again at once.
  - ``"zero_path"`` (the PGP authors' public code): zero every producing tensor of the channel
    (filter rows, biases, norm scale, shift and mean; variance 1) and the optimizer state of all
    of them. With the norm's scale at 0 the filter and the scale get exactly zero gradient, so
    the channel is "zeroed now, removed at the next step"; only a shift read by a residual sum
    still learns (a constant, folded into the consumers when the channel is removed).

  :class:`ChannelMasks` remembers soft-pruned channels and re-zeroes them after optimizer
  steps, in the same modes.
* :func:`hard_prune` first folds the constant output of removed channels that are zeroed
  (their bias or norm shift after the activation) into the consumers' biases or norm running
  means (:mod:`pgp_det.pruning.fold`: exact for linear and 1x1-conv consumers), then replaces
  every affected parameter by a smaller ``nn.Parameter`` (same ``requires_grad``, dtype, device),
  slices buffers and gradients, updates the attributes that store channel counts (so
  ``output_shape()`` describes the pruned model), and edits the given optimizer in place:
  parameter references are swapped at their positions in ``param_groups`` and per-parameter
  state is sliced on the same axes as the parameter. Param-group hyper-parameters are
  untouched. Optimizers whose state cannot be sliced that way are refused before anything
  changes: sharded ones (ZeRO, FSDP) and state shaped unlike its parameter (factored second
  moments such as Adafactor's); SGD, Adam and AdamW are carried.

Channels zeroed in mode ``"zero_path"`` contribute nothing downstream, so hard-pruning the same
indices afterwards leaves the detector's outputs unchanged (except through GroupNorm, whose
statistics mix the channels of a group: there the pruned and kept channels of one GN group
cannot be decoupled, and hard pruning re-partitions the kept channels into ``num_groups``).
Channels zeroed in modes ``"pgp"``/``"sfp"`` output a constant, which the fold accounts for:
exactly where their consumers are linear layers or 1x1 convs, approximately elsewhere (padded
convs at the border, ROIAlign, FPN levels with different biases; see :mod:`pgp_det.pruning.fold`).
"""
import logging
import sys
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .dependency import derive_channel_groups
from .fold import fold_zeroed_channels, zeroed_channels
from .groups import ROLE_FILTER, ChannelGroup, PruningRequestError

__all__ = [
    "SOFT_MODES", "soft_prune", "hard_prune", "ChannelMasks", "validate_removals",
    "zeroed_channels",
]

# soft pruning modes; see the module docstring
SOFT_MODES = ("pgp", "sfp", "zero_path")

logger = logging.getLogger(__name__)

Indices = Union[Sequence[int], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Validation


def _as_indices(group: ChannelGroup, indices: Indices) -> List[int]:
    """``indices`` as a sorted list of python ints, checked against ``group``."""
    if isinstance(indices, torch.Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise PruningRequestError(f"{group.name}: channel indices must be integers, got a {indices.dtype} tensor")
        values = indices.reshape(-1).tolist()
    else:
        values = list(indices)
    result = []
    for value in values:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise PruningRequestError(f"{group.name}: channel indices must be integers, got {value!r}")
        result.append(int(value))
    out_of_range = [i for i in result if not 0 <= i < group.size]
    if out_of_range:
        raise PruningRequestError(
            f"{group.name}: channel index {out_of_range[0]} out of range 0..{group.size - 1}"
        )
    if len(set(result)) != len(result):
        repeated = sorted(i for i in set(result) if result.count(i) > 1)
        raise PruningRequestError(f"{group.name}: channel index {repeated[0]} given more than once")
    if len(result) >= group.size:
        raise PruningRequestError(f"{group.name}: cannot remove all {group.size} channels; keep at least one")
    return sorted(result)


def _prediction_layer(groups: Mapping[str, ChannelGroup], name: str) -> Optional[str]:
    """``name`` (or its layer, without ``.weight``/``.bias``) if it is a layer that reads some
    group but writes none: an output layer (class scores, box deltas, objectness, anchor deltas)."""
    layer = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    readers = {n for g in groups.values() for n in g.consumer_layers}
    writers = {n for g in groups.values() for n in g.producer_layers}
    return layer if layer in readers - writers else None


def _lookup(groups: Mapping[str, ChannelGroup], name: str) -> ChannelGroup:
    if name not in groups:
        layer = _prediction_layer(groups, name)
        if layer is not None:
            raise PruningRequestError(f"the outputs of {layer} are the detector's predictions and are never pruned")
        known = ", ".join(list(groups)[:4])
        raise PruningRequestError(f"unknown channel group {name!r} (groups are named like {known}, ...)")
    group = groups[name]
    if not group.prunable:
        raise PruningRequestError(f"channel group {name} cannot be pruned: {group.reason}")
    return group


def validate_removals(
    groups: Mapping[str, ChannelGroup], removals: Mapping[str, Indices]
) -> "OrderedDict[str, List[int]]":
    """Check a hard-pruning request against ``groups``; return it as sorted index lists.

    Raises:
        PruningRequestError: unknown or non-prunable group, non-integer, out-of-range or
            repeated index, removing every channel, or a kept count that is not a multiple of
            the group's ``channel_multiple`` (GroupNorm ``num_groups``).
    """
    checked = OrderedDict()
    for name, indices in removals.items():
        group = _lookup(groups, name)
        chosen = _as_indices(group, indices)
        kept = group.size - len(chosen)
        if chosen and kept % group.channel_multiple:
            raise PruningRequestError(
                f"{name}: keeping {kept} of {group.size} channels breaks its GroupNorm; "
                f"the kept count must be a multiple of {group.channel_multiple}"
            )
        if chosen:
            checked[name] = chosen
    return checked


def _resolve_group(model: nn.Module, group: Union[ChannelGroup, str], allow_frozen: bool) -> ChannelGroup:
    if isinstance(group, ChannelGroup):
        if not group.prunable:
            raise PruningRequestError(f"channel group {group.name} cannot be pruned: {group.reason}")
        return group
    return _lookup(derive_channel_groups(model, allow_frozen=allow_frozen), group)


# ---------------------------------------------------------------------------------------------
# Soft pruning


def _optimizer_state_tensors(optimizer: Optional[torch.optim.Optimizer], param: torch.Tensor) -> List[torch.Tensor]:
    """Per-entry state of ``param`` (tensors shaped like it: momentum, Adam moments, ...).
    Scalar state such as Adam's ``step`` is left out."""
    if optimizer is None or param not in optimizer.state:
        return []
    return [
        value
        for value in optimizer.state[param].values()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    ]


def _check_mode(mode: str) -> str:
    if mode not in SOFT_MODES:
        raise PruningRequestError(f"soft pruning mode must be one of {SOFT_MODES}, got {mode!r}")
    return mode


@torch.no_grad()
def _zero_producers(
    model: nn.Module,
    group: ChannelGroup,
    channels: torch.Tensor,
    optimizer: Optional[torch.optim.Optimizer],
    mode: str,
) -> None:
    """Zero ``channels`` of ``group`` in ``mode`` (see the module docstring)."""
    for piece in group.producers:
        if mode != "zero_path" and piece.role != ROLE_FILTER:
            continue  # biases and norms carry the gradient back to the zeroed filter
        tensor = piece.get(model)
        positions = piece.positions(channels).to(tensor.device)
        tensor.index_fill_(piece.dim, positions, piece.pruned_value)
        if mode == "sfp":
            continue
        for state in _optimizer_state_tensors(optimizer, tensor):
            state.index_fill_(piece.dim, positions.to(state.device), 0.0)


def soft_prune(
    model: nn.Module,
    group: Union[ChannelGroup, str],
    indices: Indices,
    optimizer: Optional[torch.optim.Optimizer] = None,
    allow_frozen: bool = False,
    mode: str = "pgp",
) -> List[int]:
    """Zero the filters of channels ``indices`` of ``group``, keeping every shape.

    Every producing conv/linear of the group gets the rows of those channels set to 0 (slices
    of role ``"filter"``). What carries the gradient back to them is kept: the layers' biases
    and their norms' scale, shift and running statistics. The channels then output a constant
    (the bias or norm shift, after the activation that follows) and still receive gradient, so
    training can grow them back; :class:`ChannelMasks` holds them at zero instead. Consumers are
    left alone.

    Args:
        model: the model the group was derived from.
        group: a :class:`ChannelGroup` of ``model`` or its name.
        indices: channel indices in ``0 .. group.size - 1``.
        optimizer: optimizer holding ``model``'s parameters, or None.
        allow_frozen: only used when ``group`` is a name (see ``derive_channel_groups``).
        mode: ``"pgp"`` (default): also zero ``optimizer``'s per-entry state of the zeroed filter
            rows, so momentum alone cannot revive them; ``"sfp"``: leave the optimizer state
            untouched (SFP/PSFP); ``"zero_path"`` (the PGP authors' code): zero every producing
            tensor of those channels (biases, norm scale, shift and mean; ``running_var`` 1) and
            its optimizer state, so the channels output 0 and their filters and norm scales get
            no gradient (see the module docstring).

    Returns:
        the zeroed indices, sorted.
    """
    _check_mode(mode)
    group = _resolve_group(model, group, allow_frozen)
    chosen = _as_indices(group, indices)
    if chosen:
        _zero_producers(model, group, torch.tensor(chosen, dtype=torch.long), optimizer, mode)
    return chosen


class ChannelMasks:
    """Soft-pruned channels per group, re-zeroed on demand so they stay pruned while training.

    Call :meth:`apply` after every ``optimizer.step()`` (the cost is one ``index_fill_`` per
    zeroed tensor). :meth:`apply` zeroes what :func:`soft_prune` zeroes in the masks' ``mode``:
    in ``"pgp"`` (default) and ``"sfp"`` the filter rows (and, in ``"pgp"``, their optimizer
    state), so a masked channel outputs its constant shift and keeps its norm and bias, and can
    recover once unmasked; in ``"zero_path"`` every producing tensor, so it outputs exactly 0. After
    a hard prune, call :meth:`after_hard_prune` with the same removals so that the recorded
    indices follow the new channel numbering.
    """

    def __init__(self, mode: str = "pgp"):
        self.mode = _check_mode(mode)
        self._groups: Dict[str, ChannelGroup] = OrderedDict()
        self._channels: Dict[str, torch.Tensor] = OrderedDict()

    def add(self, group: ChannelGroup, indices: Indices) -> None:
        """Mask ``indices`` of ``group`` (in addition to what is already masked there)."""
        if not group.prunable:
            raise PruningRequestError(f"channel group {group.name} cannot be pruned: {group.reason}")
        chosen = set(_as_indices(group, indices))
        if group.name in self._channels:
            chosen |= set(self._channels[group.name].tolist())
        if len(chosen) >= group.size:
            raise PruningRequestError(f"{group.name}: cannot mask all {group.size} channels; keep at least one")
        self._groups[group.name] = group
        self._channels[group.name] = torch.tensor(sorted(chosen), dtype=torch.long)

    def remove(self, name: str) -> None:
        """Stop masking group ``name`` (its channels may recover)."""
        self._groups.pop(name, None)
        self._channels.pop(name, None)

    def clear(self) -> None:
        self._groups.clear()
        self._channels.clear()

    def masked(self) -> Dict[str, List[int]]:
        """``{group name: sorted masked indices}``; also the form :meth:`load` takes."""
        return {name: channels.tolist() for name, channels in self._channels.items()}

    def load(self, groups: Mapping[str, ChannelGroup], masked: Mapping[str, Indices]) -> None:
        """Replace the masks by ``masked`` (``{group name: indices}``) for ``groups``."""
        self.clear()
        for name, indices in masked.items():
            self.add(_lookup(groups, name), indices)

    def __len__(self) -> int:
        return len(self._channels)

    def apply(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Zero all masked channels in ``model`` (and in ``optimizer``'s state when given)."""
        for name, channels in self._channels.items():
            _zero_producers(model, self._groups[name], channels, optimizer, self.mode)

    def after_hard_prune(self, groups: Mapping[str, ChannelGroup], removals: Mapping[str, Indices]) -> None:
        """Renumber masks after ``hard_prune(model, removals)``: removed channels are dropped,
        kept ones shift down. ``groups`` are the groups derived *after* the hard prune."""
        for name in list(self._channels):
            removed = torch.as_tensor(list(removals.get(name, [])), dtype=torch.long)
            channels = self._channels[name]
            if removed.numel():
                channels = channels[~torch.isin(channels, removed)]
                # each kept channel moves down by the number of removed channels below it
                channels = channels - torch.searchsorted(removed.sort().values, channels)
            if channels.numel() == 0:
                self.remove(name)
                continue
            self._channels[name] = channels
            self._groups[name] = groups[name]


# ---------------------------------------------------------------------------------------------
# Hard pruning


def _plan(
    model: nn.Module, groups: Mapping[str, ChannelGroup], removals: Mapping[str, List[int]]
) -> "OrderedDict[Tuple[str, str], Dict[int, torch.Tensor]]":
    """``{(module, tensor name): {dim: positions to keep}}`` for every tensor a removal touches.

    A conv weight can lose rows (its output group) and columns (its input group) at once.
    """
    plan: "OrderedDict[Tuple[str, str], Dict[int, torch.Tensor]]" = OrderedDict()
    for name, removed in removals.items():
        group = groups[name]
        first = group.producers[0]
        if first.get(model).shape[first.dim] != group.size:
            raise ValueError(f"channel group {name} is stale (the model changed since it was derived); derive groups again")
        keep_mask = torch.ones(group.size, dtype=torch.bool)
        keep_mask[removed] = False
        kept = keep_mask.nonzero().reshape(-1)
        for piece in group.slices:
            dims = plan.setdefault((piece.module, piece.tensor), {})
            if piece.dim in dims:
                raise AssertionError(f"{piece} is claimed by two channel groups")
            dims[piece.dim] = piece.positions(kept)
    return plan


def _slice(tensor: torch.Tensor, dims: Mapping[int, torch.Tensor]) -> torch.Tensor:
    for dim, positions in dims.items():
        tensor = tensor.index_select(dim, positions.to(tensor.device))
    return tensor.contiguous()


@torch.no_grad()
def _replace_tensors(model: nn.Module, plan) -> "OrderedDict[nn.Parameter, Tuple[nn.Parameter, Dict[int, torch.Tensor]]]":
    """Swap every planned tensor for its sliced copy; return ``{old param: (new param, dims)}``."""
    replaced = OrderedDict()
    for (module_name, tensor_name), dims in plan.items():
        module = model.get_submodule(module_name)
        old = getattr(module, tensor_name)
        if tensor_name in module._parameters:
            new = nn.Parameter(_slice(old.detach(), dims), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = _slice(old.grad, dims)
            setattr(module, tensor_name, new)
            replaced[old] = (new, dims)
        elif tensor_name in module._buffers:
            module._buffers[tensor_name] = _slice(old, dims)
        else:
            raise AssertionError(f"{module_name}.{tensor_name} is neither a parameter nor a buffer")
    return replaced


def _update_optimizer(optimizer: torch.optim.Optimizer, replaced) -> None:
    """Point ``optimizer`` at the new parameters and slice their state like the parameters."""
    for param_group in optimizer.param_groups:
        params = param_group["params"]
        for position, param in enumerate(params):
            if param in replaced:
                params[position] = replaced[param][0]
    for old, (new, dims) in replaced.items():
        if old not in optimizer.state:
            continue
        state = optimizer.state.pop(old)
        optimizer.state[new] = {
            key: _slice(value, dims) if isinstance(value, torch.Tensor) and value.shape == old.shape else value
            for key, value in state.items()
        }


def _loaded_class(module: str, name: str):
    """``module.name`` if that module is already imported, else None: an object of a class whose
    module nobody imported cannot exist, and importing torch.distributed's takes most of a second."""
    return getattr(sys.modules.get(module), name, None)


def _sharding(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why ``optimizer`` holds its parameters or state sharded across ranks, or None."""
    zero = _loaded_class("torch.distributed.optim.zero_redundancy_optimizer", "ZeroRedundancyOptimizer")
    if zero is not None and isinstance(optimizer, zero):
        return "ZeRO shards its state across ranks"
    if isinstance(getattr(optimizer, "optim", None), torch.optim.Optimizer):
        return "it steps an inner optimizer (`optim`, as ZeRO's per-rank shard) that keeps parameters and state of its own"
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    for param_group in optimizer.param_groups:
        for param in param_group["params"]:
            if getattr(param, "_is_flat_param", False):
                return "its parameters are FSDP flat parameters (the layers' tensors flattened and sharded)"
            if dtensor is not None and isinstance(param, dtensor):
                return "its parameters are sharded DTensors (FSDP2)"
    return None


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    sharded = _sharding(optimizer)
    if sharded:
        raise PruningRequestError(
            f"hard pruning cannot carry the optimizer {type(optimizer).__name__}: {sharded}; "
            "prune with an unsharded optimizer (SGD, Adam, AdamW)"
        )
    owned = {id(p) for p in model.parameters()}
    for param_group in optimizer.param_groups:
        for param in param_group["params"]:
            if id(param) not in owned:
                raise ValueError(
                    "the optimizer holds a parameter that is not in the model being pruned; "
                    "pass the optimizer built for this model (unwrapped, not a copy)"
                )


def _check_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, plan) -> None:
    """Refuse per-parameter state of a parameter about to be sliced that is neither a scalar (such
    as Adam's ``step``) nor shaped like the parameter: a factored second moment (Adafactor's row and
    column factors) or a preconditioner has no axis to slice the removed channels from."""
    for module_name, tensor_name in plan:
        param = model.get_submodule(module_name)._parameters.get(tensor_name)
        if param is None:
            continue  # a buffer: no optimizer state
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.numel() != 1 and value.shape != param.shape:
                raise PruningRequestError(
                    f"hard pruning cannot carry the optimizer {type(optimizer).__name__}: its state {key!r} of "
                    f"{module_name}.{tensor_name} is shaped {tuple(value.shape)}, unlike the parameter "
                    f"{tuple(param.shape)} (a factored moment cannot be sliced by channel); use SGD, Adam or AdamW, "
                    "or prune before the optimizer keeps state"
                )


def hard_prune(
    model: nn.Module,
    removals: Mapping[str, Indices],
    optimizer: Optional[torch.optim.Optimizer] = None,
    allow_frozen: bool = False,
    groups: Optional[Mapping[str, ChannelGroup]] = None,
    fold: bool = True,
) -> Dict[nn.Parameter, nn.Parameter]:
    """Physically remove channels: ``removals[group name]`` are the indices to drop.

    Removed channels that are zeroed (all filter rows 0) still output a constant (bias or norm
    shift after the activation); with ``fold`` it is first folded into the consumers' biases or
    norm running means (:func:`~pgp_det.pruning.fold.fold_zeroed_channels`), which makes the
    removal exact for linear and 1x1-conv consumers. Other removed channels are simply dropped.

    All groups are derived from ``model`` as it is now (so indices refer to current channel
    positions) and all requests are validated before anything changes. Each affected parameter
    becomes a new ``nn.Parameter`` with the kept entries (same ``requires_grad``, dtype and
    device; ``.grad`` sliced too), buffers are sliced, and channel-count attributes
    (``out_channels``, ``in_features``, ``num_features``, ``_out_feature_channels``,
    ``box_head._output_size`` ...) are updated.

    Args:
        model: a detectron2 ``GeneralizedRCNN`` (not wrapped in DistributedDataParallel).
        removals: ``{group name: channel indices to remove}``; empty index lists are ignored.
            To shrink a freshly built model to ``k`` channels, pass ``range(k, group.size)``.
        optimizer: edited in place, or None. Its param groups keep their positions and
            hyper-parameters; per-parameter state tensors shaped like the parameter are sliced
            on the same axes, scalar state (Adam's ``step``) is kept. Refused (before anything
            changes) when sharded (ZeRO, FSDP) or when a pruned parameter has non-scalar state of
            another shape (factored moments).
        allow_frozen: allow groups touching frozen (``requires_grad=False``) parameters.
        groups: the groups of ``model`` as it is now, if already derived (saves a walk);
            derived with ``allow_frozen`` when None.
        fold: fold the constants of zeroed removed channels into their consumers (default).

    Returns:
        ``{old parameter: new parameter}`` for every replaced parameter.

    Raises:
        PruningRequestError: see :func:`validate_removals`, or an optimizer it cannot carry (see
            ``optimizer``); nothing is changed then.
    """
    if groups is None:
        groups = derive_channel_groups(model, allow_frozen=allow_frozen)
    checked = validate_removals(groups, removals)
    if optimizer is not None:
        _check_optimizer(model, optimizer)
    if not checked:
        return {}
    plan = _plan(model, groups, checked)
    if optimizer is not None:
        _check_optimizer_state(model, optimizer, plan)
    # every check is done: from here on the model changes
    if fold:
        fold_zeroed_channels(model, groups, checked)
    replaced = _replace_tensors(model, plan)
    for name, removed in checked.items():
        group = groups[name]
        kept = group.size - len(removed)
        for count in group.counts:
            count.write(model, kept * count.expand)
    if optimizer is not None:
        _update_optimizer(optimizer, replaced)
    logger.debug("hard-pruned %d groups, replaced %d parameters", len(checked), len(replaced))
    return {old: new for old, (new, _) in replaced.items()}
