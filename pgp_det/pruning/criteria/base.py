"""The criterion protocol (:class:`ChannelCriterion`), the per-group reduction of layer scores,
the registry, and the accumulator that criteria computed while training share (distributed sums,
state for resume)."""
import math
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from detectron2.utils.registry import Registry

from ...utils.modules import unwrap_model
from ..groups import ChannelGroup, PruningRequestError


CRITERION_REGISTRY = Registry("PRUNING_CRITERION")
CRITERION_REGISTRY.__doc__ = "fn(**kwargs) -> ChannelCriterion; the name is the config value (PRUNING.CRITERION.NAME)"

Groups = Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]]
_Key = Tuple[str, str]  # (group name, producer layer name)


def combine_layer_scores(vectors: Sequence[torch.Tensor], normalisation: str = "mean") -> torch.Tensor:
    """One group's score from its producer layers' scores.

    Args:
        vectors: one float tensor of shape ``(C,)`` per producer layer.
        normalisation: ``"mean"`` divides each vector by its mean, ``"l2"`` by its L2 norm;
            an all-zero vector stays zero.

    Returns:
        float32 tensor ``(C,)``: the mean of the normalised vectors.
    """
    if not vectors:
        raise ValueError("a group needs at least one producer layer to be scored")
    if normalisation not in ("mean", "l2"):
        raise ValueError(f"unknown normalisation {normalisation!r}; use 'mean' or 'l2'")
    stacked = torch.stack([v.detach().float().reshape(-1) for v in vectors])  # (layers, C)
    if normalisation == "mean":
        scale = stacked.mean(dim=1, keepdim=True)
    else:
        scale = torch.linalg.vector_norm(stacked, dim=1, keepdim=True)
    # an all-zero layer (dead, or no gradient yet) would divide 0 by 0
    normalised = torch.where(scale > 0, stacked / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return normalised.mean(dim=0)


def _as_group_dict(groups: Groups) -> "OrderedDict[str, ChannelGroup]":
    if isinstance(groups, Mapping):
        groups = groups.values()
    return OrderedDict((group.name, group) for group in groups)


def _distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _filter_norms(weight: torch.Tensor, order: float) -> torch.Tensor:
    """``(C,)`` Lp norms of the rows of a weight with the channels on dim 0."""
    return torch.linalg.vector_norm(weight.detach().reshape(weight.shape[0], -1), ord=order, dim=1, dtype=torch.float32)


def _kept_mask(size: int, removed: Iterable[int], group: str) -> torch.Tensor:
    """Boolean ``(size,)`` mask of the channels that survive removing ``removed``."""
    removed = [int(i) for i in removed]
    bad = [i for i in removed if not 0 <= i < size]
    if bad:
        raise PruningRequestError(f"{group}: removed channel {bad[0]} is out of range 0..{size - 1}")
    keep = torch.ones(size, dtype=torch.bool)
    keep[torch.as_tensor(removed, dtype=torch.long)] = False
    return keep


# ---------------------------------------------------------------------------------------------
# Base class


class ChannelCriterion:
    """Scores channels of prunable groups; higher means more important (kept longer).

    Subclasses implement :meth:`_layer_scores` (one ``(C,)`` vector per producer layer) and,
    when they accumulate statistics, :meth:`update` and the state methods.

    Class attributes tell the training hook what the criterion needs:

    * ``needs_gradients``: :meth:`update` reads this iteration's parameter ``.grad``;
    * ``needs_activations``: :meth:`attach` registers hooks that observe the training forward
      and backward passes;
    * ``needs_extra_pass``: :meth:`scores` needs ``run_extra_pass`` to have run first.
    """

    name: str = ""
    needs_gradients: bool = False
    needs_activations: bool = False
    needs_extra_pass: bool = False
    layer_normalisation: str = "mean"  # see combine_layer_scores
    # how the ``global`` allocation puts groups on one scale: "mean" divides each group's scores
    # by their mean, "none" ranks them as they are (the criterion normalised them itself)
    global_normalisation: str = "mean"

    def __init__(self) -> None:
        self._model: Optional[nn.Module] = None
        self._groups: "OrderedDict[str, ChannelGroup]" = OrderedDict()

    @property
    def groups(self) -> Mapping[str, ChannelGroup]:
        """The prunable groups this criterion scores (empty before :meth:`attach`)."""
        return self._groups

    def attach(self, model: nn.Module, groups: Groups) -> None:
        """Start scoring the prunable ones of ``groups`` of ``model`` (DDP-wrapped or not).

        Called at the start of training and again after every hard prune with the groups
        derived then; hooks of a previous attach are removed and accumulators start at zero.
        """
        self.detach()
        self._model = unwrap_model(model)
        self._groups = OrderedDict((n, g) for n, g in _as_group_dict(groups).items() if g.prunable)
        self._on_attach()

    def _on_attach(self) -> None:
        """Set up accumulators / hooks for ``self._groups`` (subclass hook)."""

    def detach(self) -> None:
        """Remove hooks registered by :meth:`attach` (no-op when there are none)."""

    def update(self, model: nn.Module) -> None:
        """Accumulate this iteration's statistics. The base criterion needs none."""

    def scores(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """``{group name: float32 CPU tensor (C,)}`` for every attached group (see the module
        docstring for the per-group reduction). Collective under distributed training: every
        process must call it."""
        self._require_attached()
        model = unwrap_model(model)
        self._check_sizes(model)
        per_layer = self._layer_scores(model)
        return OrderedDict(
            (name, combine_layer_scores(vectors, self.layer_normalisation).cpu()) for name, vectors in per_layer.items()
        )

    def _layer_scores(self, model: nn.Module) -> "OrderedDict[str, List[torch.Tensor]]":
        """``{group name: [(C,) score of each producer layer]}``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Clear accumulated statistics (after a pruning step). No-op without accumulators."""

    def after_hard_prune(self, groups: Groups, removals: Mapping[str, Sequence[int]]) -> None:
        """Follow a hard prune: ``groups`` are derived after it, ``removals`` are the indices
        given to ``hard_prune`` (positions before it). Re-attaches to the same model."""
        self._require_attached()
        self.attach(self._model, groups)

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to continue identically (tensors on the CPU)."""
        return {"criterion": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state_name(state)

    # -- helpers ------------------------------------------------------------------------------

    def _require_attached(self) -> None:
        if self._model is None:
            raise PruningRequestError(f"criterion {self.name} is not attached; call attach(model, groups) first")

    def _check_state_name(self, state: Mapping[str, Any]) -> None:
        saved = state.get("criterion")
        if saved != self.name:
            raise PruningRequestError(f"cannot load the state of criterion {saved!r} into criterion {self.name!r}")

    def _check_sizes(self, model: nn.Module) -> None:
        for group in self._groups.values():
            first = group.producers[0]
            size = first.get(model).shape[first.dim]
            if size != group.size:
                raise PruningRequestError(
                    f"criterion {self.name}: group {group.name} has {size} channels in the model but {group.size} "
                    "when attached; call after_hard_prune(groups, removals) after pruning"
                )


# ---------------------------------------------------------------------------------------------
# Criteria that accumulate statistics while training


class _Sums:
    """Float32 sums per (group, producer layer), stored in one flat buffer so that an update is
    one ``add_`` and the distributed reduction one ``all_reduce``; ``views`` index into it."""

    def __init__(self, shapes: "OrderedDict[_Key, torch.Size]", device: torch.device) -> None:
        self.shapes = shapes
        self.numels = [math.prod(shape) for shape in shapes.values()]
        self.flat = torch.zeros(sum(self.numels), dtype=torch.float32, device=device)
        self.views = self._split(self.flat)

    def _split(self, flat: torch.Tensor) -> "OrderedDict[_Key, torch.Tensor]":
        if not self.numels:
            return OrderedDict()
        chunks = flat.split(self.numels)
        return OrderedDict((key, chunk.view(shape)) for (key, shape), chunk in zip(self.shapes.items(), chunks))

    def add(self, contributions: List[torch.Tensor]) -> None:
        """Add one iteration's contributions (one per key, in order); a non-finite iteration adds
        nothing. No host synchronisation."""
        if not contributions:
            return
        values = torch.cat([c.reshape(-1) for c in contributions])
        self.flat.add_(torch.where(torch.isfinite(values).all(), values, 0.0))

    def summed_over_processes(self) -> "OrderedDict[_Key, torch.Tensor]":
        flat = self.flat
        if _distributed_world():
            flat = flat.clone()
            dist.all_reduce(flat)
        return self._split(flat)


class _AccumulatingCriterion(ChannelCriterion):
    """A criterion whose score is a function of sums accumulated per producer layer.

    Subclasses define the shape of a layer's sum (:meth:`_sum_shape`, ``(C,)`` by default), how
    the sum is filled, and how it becomes the layer's ``(C,)`` score (:meth:`_layer_score`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._sums = _Sums(OrderedDict(), torch.device("cpu"))
        self._modules: "OrderedDict[_Key, nn.Module]" = OrderedDict()
        self.num_updates = 0  # iterations (or extra-pass batches) accumulated since the last reset
        self._pending_state: Optional[Mapping[str, Any]] = None

    def _sum_shape(self, module: nn.Module) -> torch.Size:
        return torch.Size([module.weight.shape[0]])

    def _layer_score(self, summed: torch.Tensor) -> torch.Tensor:
        return summed

    def _on_attach(self) -> None:
        self._modules = OrderedDict(
            ((name, layer), self._model.get_submodule(layer))
            for name, group in self._groups.items()
            for layer in group.producer_layers
        )
        shapes = OrderedDict((key, self._sum_shape(module)) for key, module in self._modules.items())
        device = next(iter(self._modules.values())).weight.device if self._modules else torch.device("cpu")
        self._sums = _Sums(shapes, device)
        self.num_updates = 0
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _layer_scores(self, model):
        summed = self._sums.summed_over_processes()
        return OrderedDict(
            (name, [self._layer_score(summed[(name, layer)]) for layer in group.producer_layers])
            for name, group in self._groups.items()
        )

    def reset(self) -> None:
        self._sums.flat.zero_()  # in place: hooks hold views into the buffer
        self.num_updates = 0

    def after_hard_prune(self, groups, removals):
        """Slices each layer's sum to the surviving channels (dim 0), then re-attaches.

        Sums keep what removed *input* channels contributed in earlier iterations; those inputs
        were the weakest of their own group, so the error is small and fades after ``reset``.
        """
        self._require_attached()
        survivors = OrderedDict()
        for (name, layer), summed in self._sums.views.items():
            keep = _kept_mask(summed.shape[0], removals.get(name, ()), name)
            survivors[(name, layer)] = summed[keep.to(summed.device)].clone()
        updates = self.num_updates
        self.attach(self._model, groups)
        for key, values in survivors.items():
            target = self._sums.views.get(key)
            if target is None:
                continue  # the group is no longer prunable: nothing to score
            if target.shape != values.shape:
                raise PruningRequestError(
                    f"criterion {self.name}: group {key[0]} has {target.shape[0]} channels after the hard prune, "
                    f"but the removals leave {values.shape[0]}; pass the removals given to hard_prune"
                )
            target.copy_(values)
        self.num_updates = updates

    def state_dict(self):
        sums: Dict[str, Dict[str, torch.Tensor]] = OrderedDict()
        for (name, layer), summed in self._sums.views.items():
            sums.setdefault(name, OrderedDict())[layer] = summed.detach().cpu().clone()
        return {"criterion": self.name, "num_updates": self.num_updates, "sums": sums}

    def load_state_dict(self, state):
        """Restore sums saved by :meth:`state_dict`. Before :meth:`attach` the state is kept and
        applied by the next attach (which must see groups of the same sizes)."""
        self._check_state_name(state)
        if self._model is None:
            self._pending_state = state
            return
        saved = {(name, layer): t for name, layers in state["sums"].items() for layer, t in layers.items()}
        missing = [k for k in self._sums.views if k not in saved]
        extra = [k for k in saved if k not in self._sums.views]
        if missing or extra:
            name, layer = (missing or extra)[0]
            where = "missing from" if missing else "not attached but present in"
            raise PruningRequestError(
                f"criterion {self.name}: layer {layer} of group {name} is {where} the saved state"
            )
        for key, target in self._sums.views.items():
            if saved[key].shape != target.shape:
                raise PruningRequestError(
                    f"criterion {self.name}: saved sums of {key[1]} ({key[0]}) have shape {tuple(saved[key].shape)}, "
                    f"the model needs {tuple(target.shape)}; was the state saved with this model?"
                )
            target.copy_(saved[key])
        self.num_updates = int(state["num_updates"])
