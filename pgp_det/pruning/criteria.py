"""Channel-importance criteria: a score for every channel of every prunable group (higher = keep).

Life cycle (the pruning hook makes these calls):

* ``attach(model, groups)`` once at the start of training and again after every hard prune;
* ``update(model)`` after every optimizer step, while the parameters' ``.grad`` still hold that
  iteration's gradient (detectron2 zeroes them at the start of the next step);
* ``scores(model)`` at a pruning step: ``{group name: float32 CPU tensor of shape (C,)}``;
* ``reset()`` after the pruning step, ``after_hard_prune(groups, removals)`` after a hard prune;
* ``state_dict()`` / ``load_state_dict()`` so that a resumed run continues identically.

Per-group reduction
-------------------
A group's channels are written by one or more *producer layers* (a residual stream by every
block's last conv and the projection shortcut; FPN's ``inner`` group by every lateral conv).
A criterion first scores each producer layer ``l`` on its own: a vector ``s_l`` of shape ``(C,)``
computed from that layer's tensors with the channels on dim 0 (its filters ``W_l[c]``, their
gradients, its norm's ``gamma``, or its output activations). Each vector is divided by its mean,
so that layers of different fan-in and weight scale count equally, and the group's score is the
mean over its producer layers::

    score[c] = mean_l ( s_l[c] / mean_c' s_l[c'] )

FRS divides by the vector's L2 norm instead (the FRS paper L2-normalises relevance per layer),
and its scores are ranked across groups as they are (``global_normalisation``).
A layer whose vector is all zero contributes zeros.

Criteria (registry names)
-------------------------
``pgp``
    PGP (Nguyen-Meidine et al., arXiv 1906.08746): ``s_l[c] = || sum_t dL/dW_l[c] ||_1``, the
    gradient summed signed per weight entry over the training iterations since the last pruning
    step, then the filter's L1 norm: the paper's "change in filter weights" (without the learning
    rate and momentum). Read from ``.grad`` every iteration; no extra pass.
``pgp_pass``
    PGP as the paper's code runs it: the same signed sum over an extra pass of
    ``PRUNING.EXTRA_PASS_BATCHES`` batches without optimizer steps, right before each pruning
    step (:meth:`ExtraPassGradientCriterion.run_extra_pass`).
``rpgp``
    RPGP, the paper's online variant: ``s_l[c] = sum_t || dL/dW_l[c] ||_1``, the filter's
    gradient L1 norm summed over iterations (magnitudes: no cancellation).
``l1``, ``l2``
    SFP / PSFP: the L1 / L2 norm of each filter ``W_l[c]`` (nothing accumulated).
``taylor``
    First-order Taylor (PGP's detection script): ``s_l[c] = | sum_t sum_k W_l[c,k] g_t[c,k] |``.
    The signed inner product is accumulated and the absolute value taken when scoring, so
    contributions of opposite sign over iterations cancel. ``update`` runs after the optimizer
    step, so ``W`` is the weight just updated with ``g_t`` (one step of lag, negligible).
``bn_gamma``
    ``|gamma|`` of the norm each producer conv applies (detectron2's ``Conv2d.norm``: BN, SyncBN,
    FrozenBN, affine GN). Producer layers without an affine norm are left out of the group's
    mean; a group in which no producer has one (FPN, RPN and box-head layers by default) falls
    back to ``l1``.
``frs``
    FRS (Aketi et al., arXiv 2002.09958): LRP relevance from the true class, computed by
    :meth:`FeatureRelevanceCriterion.run_extra_pass` on training batches right before each
    pruning step (no accumulation while training). Relevance starts at 1 on the ground-truth
    class logit of every foreground proposal of the ROI box head and is propagated back with the
    alpha-beta rule (alpha 2, beta 1; :mod:`pgp_det.pruning.relevance`). ``R_l[c]`` is the
    relevance at the output of producer layer ``l``, summed over the spatial mean of each image
    (convs; every FPN level a layer is applied to adds) or over proposals (fc layers). Per class
    ``k`` (the proposals' ground-truth class), with ``n_k`` foreground proposals seen::

        s_l[c] = | mean_{k: n_k > 0} ( sum_batches R_l^k[c] / n_k ) |

    every class counts equally, then the vector is L2-normalised per layer (not by its mean).
    Groups are ranked globally on these values as they are (``global_normalisation "none"``).
    The RPN head is not on the path from the class logit; it is scored the same way from the
    RPN's own true class, objectness 1 on its foreground anchors (see the class docstring).

Distributed training: when ``torch.distributed`` is initialised with more than one process,
``scores`` sums the accumulated statistics over processes first (one ``all_reduce``), so every
rank gets identical scores. Gradients that DDP already averaged come out multiplied by the world
size, which the per-layer normalisation cancels.

Mixed precision: an iteration whose contributions are not all finite (a step the AMP grad scaler
skips) adds nothing. ``frs`` runs its own float32 passes, outside autocast.
"""
import inspect
import math
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from detectron2.utils.events import EventStorage
from detectron2.utils.registry import Registry

from ..utils.modules import unwrap_model
from .groups import ChannelGroup, ChannelSlice, PruningRequestError
from .relevance import AlphaBetaLRP

__all__ = [
    "AccumulatedGradientCriterion",
    "CRITERION_REGISTRY",
    "ChannelCriterion",
    "ExtraPassGradientCriterion",
    "FeatureRelevanceCriterion",
    "FilterNormCriterion",
    "GradientL1Criterion",
    "NormGammaCriterion",
    "RecentGradientCriterion",
    "TaylorCriterion",
    "build_criterion",
    "combine_layer_scores",
]

CRITERION_REGISTRY = Registry("PRUNING_CRITERION")
CRITERION_REGISTRY.__doc__ = "fn(**kwargs) -> ChannelCriterion; the name is the config value (PRUNING.CRITERION)"

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
# Criteria computed from the current weights


class FilterNormCriterion(ChannelCriterion):
    """SFP / PSFP: the Lp norm of every filter (``p = 1`` for ``l1``, ``p = 2`` for ``l2``)."""

    def __init__(self, order: float, name: str) -> None:
        super().__init__()
        self.order = order
        self.name = name

    def _layer_scores(self, model):
        return OrderedDict(
            (name, [_filter_norms(model.get_submodule(layer).weight, self.order) for layer in group.producer_layers])
            for name, group in self._groups.items()
        )


class NormGammaCriterion(ChannelCriterion):
    """``|gamma|`` of the norm after each producer layer; ``l1`` for groups with no affine norm."""

    name = "bn_gamma"

    @staticmethod
    def norm_slices(group: ChannelGroup) -> List[ChannelSlice]:
        """The ``weight`` (gamma) slices of the norms the group's producer convs apply."""
        norms = {f"{layer}.norm" for layer in group.producer_layers}
        return [p for p in group.producers if p.module in norms and p.tensor == "weight"]

    def _layer_scores(self, model):
        result = OrderedDict()
        for name, group in self._groups.items():
            gammas = self.norm_slices(group)
            if gammas:
                result[name] = [piece.get(model).detach().abs().float() for piece in gammas]
            else:
                result[name] = [_filter_norms(model.get_submodule(layer).weight, 1) for layer in group.producer_layers]
        return result


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


class _GradientCriterion(_AccumulatingCriterion):
    """Accumulates a per-filter function of each producer weight and its ``.grad`` every
    iteration: one reduction per producer weight, then one add into the flat buffer."""

    needs_gradients = True

    def _contribution(self, weight: torch.Tensor, grad: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """``(C,)`` float32 contribution of one iteration; ``weight``, ``grad`` and the float32
        work buffer ``scratch`` are ``(C, K)``."""
        raise NotImplementedError

    def _on_attach(self) -> None:
        super()._on_attach()
        # layers without a gradient this iteration (unused, or frozen) add these
        self._zeros = OrderedDict((key, torch.zeros_like(view)) for key, view in self._sums.views.items())
        # one reused elementwise buffer: on the CPU a fresh gradient-sized temporary per layer
        # costs more (page faults) than the arithmetic; on GPUs it saves allocator traffic
        largest = max((module.weight.numel() for module in self._modules.values()), default=0)
        self._scratch = torch.empty(largest, dtype=torch.float32, device=self._sums.flat.device)

    def _gradient(self, key: _Key, module: nn.Module) -> Optional[torch.Tensor]:
        """``module.weight.grad`` (None: no gradient this iteration), checked against the filter
        count the criterion was attached with."""
        grad = module.weight.grad
        size = self._sums.shapes[key][0]
        if grad is not None and grad.shape[0] != size:
            raise PruningRequestError(
                f"criterion {self.name}: {key[1]} has {grad.shape[0]} filters but {size} when attached; "
                "call after_hard_prune(groups, removals) after pruning"
            )
        return grad

    def update(self, model: nn.Module) -> None:
        contributions = []
        for key, module in self._modules.items():
            grad = self._gradient(key, module)
            if grad is None:
                contributions.append(self._zeros[key])
                continue
            size = grad.shape[0]
            scratch = self._scratch[: grad.numel()].view(size, -1)
            contributions.append(
                self._contribution(module.weight.detach().reshape(size, -1), grad.reshape(size, -1), scratch))
        self._sums.add(contributions)
        self.num_updates += 1


class GradientL1Criterion(_GradientCriterion):
    """RPGP: ``sum_t || dL/dW[c] ||_1`` per filter, accumulated from ``.grad`` every iteration."""

    name = "rpgp"

    def _contribution(self, weight, grad, scratch):
        return torch.abs(grad, out=scratch).sum(dim=1)


class RecentGradientCriterion(GradientL1Criterion):
    """The gradient magnitude of the last iterations, for protection (PSAP's "protective
    reconstruction" watches gradients; its formula was not available):
    ``sum_t decay^(T - t) || dL/dW[c] ||_1`` over the iterations ``t`` since the last reset, ``T``
    the latest, ``decay = 0.5 ** (1 / half_life)``: an iteration ``half_life`` iterations old
    counts half. Unlike the plain sum of ``pgp``, a channel whose gradient grew large in the last
    iterations scores high even when its sum since the last step is small.

    Not registered as a pruning criterion; the hook keeps one of its own for
    ``PRUNING.PROTECT_QUANTILE`` whatever ``PRUNING.CRITERION`` is.
    """

    name = "recent_gradient"

    def __init__(self, half_life: float = 10.0) -> None:
        super().__init__()
        if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not half_life > 0:
            raise PruningRequestError(f"half_life must be a number of iterations > 0, got {half_life!r}")
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)

    def update(self, model: nn.Module) -> None:
        self._sums.flat.mul_(self.decay)  # in place: hooks hold views into the buffer
        super().update(model)


class _SignedGradientSums:
    """Sums kept per weight entry (the weight's shape), signed, scored by each filter's L1 norm:
    ``|| sum dL/dW[c] ||_1``, so gradients of opposite sign cancel before the norm is taken."""

    def _sum_shape(self, module):
        return module.weight.shape

    def _layer_score(self, summed):
        return _filter_norms(summed, 1)

    def after_hard_prune(self, groups, removals):
        """Starts the sums anew instead of slicing them: per-entry sums would also need slicing on
        the input axes, and a pruning step has just consumed them."""
        self._require_attached()
        self.attach(self._model, groups)


class AccumulatedGradientCriterion(_SignedGradientSums, _GradientCriterion):
    """PGP: ``|| sum_t dL/dW[c] ||_1``, the L1 norm of the gradient accumulated (signed, per weight
    entry) over the iterations since the last pruning step: the paper's "change in filter
    weights" without the learning rate and momentum. Costs one weight-sized float32 buffer."""

    name = "pgp"

    def _on_attach(self) -> None:
        # the sums are weight-sized and gradients are added into them in place: no per-layer zero
        # tensors and no scratch buffer (each would be another copy of the weights)
        _AccumulatingCriterion._on_attach(self)

    def update(self, model: nn.Module) -> None:
        """Add every producer's gradient into its sum in place (on the training step's hot path:
        no gradient-sized temporaries). An iteration whose gradients are not all finite (a step
        the AMP grad scaler skips) adds nothing; checking that costs one host synchronisation."""
        grads = [(key, self._gradient(key, module)) for key, module in self._modules.items()]
        present = [grad for _, grad in grads if grad is not None]
        if present and bool(torch.stack([torch.isfinite(grad).all() for grad in present]).all()):
            for key, grad in grads:
                if grad is not None:
                    self._sums.views[key].add_(grad)
        self.num_updates += 1


class TaylorCriterion(_GradientCriterion):
    """First-order Taylor: ``| sum_t sum_k W[c,k] g_t[c,k] |``; the signed sum is accumulated."""

    name = "taylor"

    def _contribution(self, weight, grad, scratch):
        return torch.mul(weight, grad, out=scratch).sum(dim=1)

    def _layer_score(self, summed):
        return summed.abs()


class FeatureRelevanceCriterion(_AccumulatingCriterion):
    """FRS (Aketi et al., arXiv 2002.09958): alpha-beta LRP relevance from the true class.

    :meth:`run_extra_pass` runs ``N`` training batches (``PRUNING.EXTRA_PASS_BATCHES``) right
    before each pruning step, without optimizer steps and without touching ``.grad``. Per batch:

    1. one training-mode forward of the detector under :class:`~.relevance.AlphaBetaLRP` (RPN
       proposals, ``label_and_sample_proposals`` and the losses as in training; BatchNorms with
       their running statistics, which are left unchanged);
    2. per ground-truth class ``k`` present among the sampled foreground proposals
       (``gt_classes < num_classes``), one backward pass starting with relevance 1 at the class-k
       logit (``box_predictor.cls_score``) of each class-k foreground proposal, 0 elsewhere.
       Relevance is linear in its start, so a backward pass per class is what separates the
       classes in the backbone and FPN maps, which every proposal of an image shares;
    3. the relevance at each producer layer's output, ``(N, C, H, W)`` -> spatial mean -> summed
       over images (convs; once per FPN level a layer runs on) or ``(proposals, C)`` summed over
       proposals (fc layers), is added to that layer's class-k row, and ``n_k`` counts class-k
       proposals.

    Scores: ``s_l[c] = | mean_{k: n_k > 0} sum_k[c] / n_k |`` (every class counts equally,
    whatever its frequency), L2-normalised per producer layer; groups are compared as they are by
    the ``global`` allocation. The relevance starts at 1 rather than at the logit's value (the
    LRP convention of Bach et al.): early in training a true-class logit may be negative, which
    would flip the sign of that proposal's whole explanation and cancel others in the class mean.

    Where relevance cannot pass exactly, and what is done instead:

    * the RPN head is not on the path from the class logit: proposals are boxes, decoded from the
      anchor deltas and filtered by NMS without gradient (anchors, box decoding, top-k and NMS
      pass nothing). The RPN head's producers are scored by the same rule from the RPN's own
      true class: one more backward pass starting with 1 at the objectness logit of every
      foreground anchor (label 1 from ``label_and_sample_anchors``), stopped at the RPN head's
      input so that the backbone and FPN scores stay those of the class logit. Its row (the
      last, ``k = num_classes``) is added to the class mean of the other rows
      (``s_l = |mean_k| + |R_obj / n_obj|``); only RPN-head layers have one;
    * the box regression branch (``bbox_pred``) and the losses pass nothing: relevance is
      explained from the class logit only;
    * proposals sampled as background (``gt_classes == num_classes``) start no relevance;
    * a FPN level (or any layer) that no proposal of the batch reaches gets no relevance there,
      a group with none at all scores 0 everywhere (its channels tie);
    * norms: folded into their conv (BN, SyncBN, FrozenBN with running statistics, GN with the
      input's statistics); a norm of another type is passed through unchanged. Non-ReLU
      activations inside a conv are passed through as ReLU is. See :mod:`~.relevance`.

    Cost per batch: one forward; in the first backward pass, two convolutions per layer for
    ``Z+`` / ``Z-``; per class present, one backward pass with two transposed convolutions per
    layer (four for each where a layer's input has both signs: FPN output convs, ``fc1``), about
    the FLOPs of an ordinary backward; plus the small RPN pass. On R18-FPN (synthetic, 4 images
    at 256x352, 6 classes present, one CPU thread) 5 to 7 s per batch against about 1 s for a
    training step. Memory: each layer's input, and from the first backward on two tensors of its
    output's size (three for producer layers) until the batch is done.

    Only detectron2 R-CNNs with one ``box_predictor`` (``StandardROIHeads``, ``Res5ROIHeads``)
    are supported; :meth:`attach` fails clearly on other models. The state (sums and counts) is
    saved like the other accumulators; a hard prune resets it (the extra pass runs right before
    each pruning step, which consumes it).
    """

    name = "frs"
    needs_extra_pass = True
    layer_normalisation = "l2"
    global_normalisation = "none"
    _COUNTS = ("frs_proposals_per_class", "counts")  # key of the (num_classes + 1,) counts in the sums

    def __init__(self, alpha: float = 2.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.num_classes = 0
        self._layer_keys: Dict[str, _Key] = {}
        self._source = 0

    def _on_attach(self) -> None:
        roi_heads = getattr(self._model, "roi_heads", None)
        if not (hasattr(roi_heads, "box_predictor") and hasattr(roi_heads, "label_and_sample_proposals")):
            raise PruningRequestError(
                "criterion frs needs a detectron2 R-CNN (roi_heads with a box_predictor); got "
                f"{type(self._model).__name__}"
            )
        self.num_classes = int(roi_heads.num_classes)
        pending, self._pending_state = self._pending_state, None
        super()._on_attach()
        shapes = OrderedDict(self._sums.shapes)
        shapes[self._COUNTS] = torch.Size([self.num_classes + 1])
        self._sums = _Sums(shapes, self._sums.flat.device)
        self._layer_keys = {key[1]: key for key in self._modules}
        if pending is not None:
            self.load_state_dict(pending)

    def _sum_shape(self, module):
        return torch.Size([self.num_classes + 1, module.weight.shape[0]])

    def _layer_scores(self, model):
        summed = self._sums.summed_over_processes()
        counts = summed[self._COUNTS]
        seen = counts[: self.num_classes] > 0
        result = OrderedDict()
        for name, group in self._groups.items():
            vectors = []
            for layer in group.producer_layers:
                rows = summed[(name, layer)]
                score = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
                if seen.any():
                    per_class = rows[: self.num_classes][seen] / counts[: self.num_classes][seen, None]
                    score = per_class.mean(dim=0).abs()
                if counts[-1] > 0:
                    score = score + (rows[-1] / counts[-1]).abs()
                vectors.append(score)
            result[name] = vectors
        return result

    def after_hard_prune(self, groups, removals):
        """Resets instead of slicing, as ``pgp_pass`` does."""
        self._require_attached()
        self.attach(self._model, groups)

    def _record(self, layer: str, relevance: torch.Tensor) -> None:
        """``on_relevance`` of the LRP pass: add a producer layer's relevance to the current row."""
        key = self._layer_keys.get(layer)
        if key is None:
            return
        values = relevance.float()
        if values.dim() > 2:
            values = values.flatten(2).mean(dim=2)  # (N, C): spatial mean per image
        values = values.sum(dim=0)
        row = self._sums.views[key][self._source]
        row.add_(torch.where(torch.isfinite(values).all(), values, 0.0))

    def run_extra_pass(self, model: nn.Module, data_iter: Iterable, num_batches: int) -> None:
        """Add the relevance of ``num_batches`` training batches (see the class docstring).

        Weights, buffers, ``.grad`` and train/eval modes are as before afterwards. Each batch is
        what a detectron2 training data loader yields; losses are logged into a private
        ``EventStorage``. With a DDP-wrapped ``model`` every process must run the same number of
        batches (the passes themselves communicate nothing).
        """
        self._require_attached()
        batches = _extra_pass_batches(data_iter, num_batches)
        inner = unwrap_model(model)
        saved_buffers = [(b, b.detach().clone()) for b in inner.buffers()]
        modes = [(m, m.training) for m in inner.modules()]
        try:
            inner.train()
            for batch in batches:
                lrp = AlphaBetaLRP(inner, self.alpha, self.beta, on_relevance=self._record, report=self._layer_keys)
                with torch.enable_grad(), lrp:
                    self._explain_batch(inner, batch, lrp)
                self.num_updates += 1
        finally:
            with torch.no_grad():
                for buffer, value in saved_buffers:
                    buffer.copy_(value)
            for module, training in modes:
                module.training = training

    def _explain_batch(self, model: nn.Module, batch, lrp) -> None:
        """Forward ``batch`` once, then the per-class backward passes and the RPN's."""
        roi_heads = model.roi_heads
        rpn = getattr(model, "proposal_generator", None)
        captured: Dict[str, Any] = {}

        def capturing(name, method):
            def run(*args, **kwargs):
                captured[name] = method(*args, **kwargs)
                return captured[name]
            return run

        # what training computes anyway: the sampled proposals (with gt_classes) and the logits;
        # the RPN's anchor labels, its head's input and objectness logits
        wrapped = [(roi_heads, "label_and_sample_proposals")]
        handles = [roi_heads.box_predictor.register_forward_hook(
            lambda module, inputs, out: captured.update(logits=out[0]))]
        if hasattr(rpn, "rpn_head") and hasattr(rpn, "label_and_sample_anchors"):
            wrapped.append((rpn, "label_and_sample_anchors"))
            handles.append(rpn.rpn_head.register_forward_hook(
                lambda module, inputs, out: captured.update(rpn_input=list(inputs[0]), objectness=list(out[0]))))
        for owner, name in wrapped:
            setattr(owner, name, capturing(name, getattr(owner, name)))  # shadows the method
        try:
            with EventStorage(0):
                model(batch)
        finally:
            for handle in handles:
                handle.remove()
            for owner, name in wrapped:
                delattr(owner, name)

        counts = self._sums.views[self._COUNTS]
        logits = captured["logits"]
        classes = torch.cat([p.gt_classes for p in captured["label_and_sample_proposals"]]).to(logits.device)
        foreground = (classes >= 0) & (classes < self.num_classes)
        for k in torch.unique(classes[foreground]).tolist():
            rows = torch.nonzero(foreground & (classes == k)).squeeze(1)
            start = torch.zeros_like(logits)
            start[rows, k] = 1.0
            self._source = k
            lrp.propagate([logits], [start])
            counts[k] += rows.numel()

        if "label_and_sample_anchors" in captured:
            labels = torch.stack(captured["label_and_sample_anchors"][0])  # (N, anchors over levels)
            starts, offset = [], 0
            for level in captured["objectness"]:  # (N, A, H, W); labels are ordered (H, W, A)
                n, a, h, w = level.shape
                part = labels[:, offset: offset + h * w * a].reshape(n, h, w, a).permute(0, 3, 1, 2)
                starts.append((part == 1).to(level.dtype))
                offset += h * w * a
            positives = int(sum(s.sum() for s in starts))
            if positives:
                self._source = self.num_classes
                lrp.propagate(captured["objectness"], starts, stop_at=captured["rpn_input"])
                counts[self.num_classes] += positives


class ExtraPassGradientCriterion(_SignedGradientSums, _AccumulatingCriterion):
    """PGP with its paper code's extra pass: ``|| sum_b dL_b/dW[c] ||_1`` over ``N`` batches run
    right before the pruning step without optimizer steps (signed sums per weight entry)."""

    name = "pgp_pass"
    needs_extra_pass = True

    def run_extra_pass(self, model: nn.Module, data_iter: Iterable, num_batches: int) -> None:
        """Forward + backward ``num_batches`` training batches and add their weight gradients.

        Weights, buffers (norm running statistics), existing ``.grad`` and the train/eval mode
        are as before afterwards. Each batch is what a detectron2 training data loader yields
        (a list of dataset dicts); losses are logged into a private ``EventStorage``. With a
        DDP-wrapped ``model`` every process must run the same number of batches.
        """
        self._require_attached()
        batches = _extra_pass_batches(data_iter, num_batches)
        inner = unwrap_model(model)
        params = [p for p in inner.parameters() if p.requires_grad]
        saved_grads = [p.grad for p in params]
        saved_buffers = [(b, b.detach().clone()) for b in inner.buffers()]
        was_training = model.training
        try:
            model.train()
            for batch in batches:
                for p in params:
                    p.grad = None
                with EventStorage(0):
                    losses = model(batch)
                sum(losses.values()).backward()
                contributions = []
                for key, module in self._modules.items():
                    grad = module.weight.grad
                    contributions.append(torch.zeros_like(self._sums.views[key]) if grad is None else grad.float())
                self._sums.add(contributions)
                self.num_updates += 1
        finally:
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            with torch.no_grad():
                for buffer, value in saved_buffers:
                    buffer.copy_(value)
            model.train(was_training)


def _extra_pass_batches(data_iter: Iterable, num_batches: int):
    """The first ``num_batches`` batches of ``data_iter`` (a generator: the checks run at once).

    Raises:
        PruningRequestError: ``num_batches`` is not an integer >= 1, or the data runs out first.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise PruningRequestError(f"run_extra_pass needs num_batches >= 1, got {num_batches!r}")

    def take():
        batches = iter(data_iter)
        for done in range(num_batches):
            try:
                yield next(batches)
            except StopIteration:
                raise PruningRequestError(
                    f"run_extra_pass: the data ran out after {done} of {num_batches} batches") from None

    return take()


# ---------------------------------------------------------------------------------------------
# Registry


@CRITERION_REGISTRY.register()
def pgp() -> ChannelCriterion:
    """PGP: L1 norm of each filter's gradient accumulated (signed) since the last pruning step."""
    return AccumulatedGradientCriterion()


@CRITERION_REGISTRY.register()
def rpgp() -> ChannelCriterion:
    """RPGP: sum over iterations of the L1 norm of each filter's gradient."""
    return GradientL1Criterion()


@CRITERION_REGISTRY.register()
def pgp_pass() -> ChannelCriterion:
    """PGP: L1 norm of the gradient summed over an extra pass (``run_extra_pass``)."""
    return ExtraPassGradientCriterion()


@CRITERION_REGISTRY.register()
def l1() -> ChannelCriterion:
    """PSFP-style: L1 norm of each filter."""
    return FilterNormCriterion(1, "l1")


@CRITERION_REGISTRY.register()
def l2() -> ChannelCriterion:
    """SFP: L2 norm of each filter."""
    return FilterNormCriterion(2, "l2")


@CRITERION_REGISTRY.register()
def taylor() -> ChannelCriterion:
    """First-order Taylor of the loss, accumulated over iterations."""
    return TaylorCriterion()


@CRITERION_REGISTRY.register()
def bn_gamma() -> ChannelCriterion:
    """|gamma| of the producers' norms (l1 where there is none)."""
    return NormGammaCriterion()


@CRITERION_REGISTRY.register()
def frs() -> ChannelCriterion:
    """FRS: alpha-beta LRP relevance from the true class, computed by an extra pass."""
    return FeatureRelevanceCriterion()


def build_criterion(name: str, **kwargs) -> ChannelCriterion:
    """The criterion registered as ``name`` in :data:`CRITERION_REGISTRY`, built with ``kwargs``.

    Raises:
        PruningRequestError: unknown name (the message lists the known ones) or arguments the
            criterion does not take.
    """
    if name not in CRITERION_REGISTRY:
        known = ", ".join(sorted(n for n, _ in CRITERION_REGISTRY))
        raise PruningRequestError(f"unknown pruning criterion {name!r}; known: {known}")
    factory = CRITERION_REGISTRY.get(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        raise PruningRequestError(f"criterion {name!r}: {error}") from None
    return factory(**kwargs)
