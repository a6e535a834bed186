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

FRS divides by the vector's L2 norm instead (the FRS paper L2-normalises relevance per layer).
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
    Feature relevance, adapted to detection. The FRS paper propagates LRP relevance from the
    true label; LRP through Faster R-CNN (ROI sampling, box regression, NMS) is impractical, so
    the relevance of channel ``c`` of layer ``l`` is the first-order relevance of the total
    detection loss ``L`` at the layer's output ``a = f_l(x)``::

        s_l[c] = sum_t sum_samples mean_positions | a[c] * dL/da[c] |

    which for a linear/ReLU path is what the LRP-0 rule assigns. Samples are images for convs
    (the mean is over H x W; a layer applied to several FPN levels adds each level) and ROIs for
    the box head's linear layers. It is captured with forward hooks on the producer layers that
    register a tensor hook on their output, so it costs one product and one reduction per layer
    in backward and copies no activation (it holds each output until its gradient arrives; autograd
    keeps most of them for backward anyway). The output is read as the network leaves
    it: detectron2's blocks apply ReLU in place (``a * g`` is unchanged, ``g`` is 0 where ReLU
    clips) and add the shortcut in place into the block's last conv output, so residual-stream
    groups are scored by the relevance of the stream itself after each block.

Distributed training: when ``torch.distributed`` is initialised with more than one process,
``scores`` sums the accumulated statistics over processes first (one ``all_reduce``), so every
rank gets identical scores. Gradients that DDP already averaged come out multiplied by the world
size, which the per-layer normalisation cancels.

Mixed precision: an iteration whose contributions are not all finite (a step the AMP grad scaler
skips) adds nothing. ``frs`` reads gradients during backward, before the scaler unscales them,
so each iteration is weighted by that iteration's loss scale.
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

    def update(self, model: nn.Module) -> None:
        contributions = []
        for key, module in self._modules.items():
            weight = module.weight
            grad = weight.grad
            if grad is None:
                contributions.append(self._zeros[key])
                continue
            size = self._sums.shapes[key][0]
            if grad.shape[0] != size:
                raise PruningRequestError(
                    f"criterion {self.name}: {key[1]} has {grad.shape[0]} filters but {size} when attached; "
                    "call after_hard_prune(groups, removals) after pruning"
                )
            scratch = self._scratch[: grad.numel()].view(size, -1)
            contributions.append(self._contribution(weight.detach().reshape(size, -1), grad.reshape(size, -1), scratch))
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

    def _contribution(self, weight, grad, scratch):
        # a copy of its own: the shared scratch buffer is overwritten by the next layer
        return grad.to(torch.float32, copy=True)


class TaylorCriterion(_GradientCriterion):
    """First-order Taylor: ``| sum_t sum_k W[c,k] g_t[c,k] |``; the signed sum is accumulated."""

    name = "taylor"

    def _contribution(self, weight, grad, scratch):
        return torch.mul(weight, grad, out=scratch).sum(dim=1)

    def _layer_score(self, summed):
        return summed.abs()


class FeatureRelevanceCriterion(_AccumulatingCriterion):
    """FRS adapted to detection: accumulated ``mean_positions |a * dL/da|`` at each producer
    layer's output, captured by hooks during the training forward/backward passes; layers are
    L2-normalised (see the module docstring)."""

    name = "frs"
    needs_activations = True
    layer_normalisation = "l2"

    def __init__(self) -> None:
        super().__init__()
        self._handles: List[Any] = []

    def _on_attach(self) -> None:
        super()._on_attach()
        for key, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._observer(self._sums.views[key])))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _observer(target: torch.Tensor):
        """A forward hook adding the relevance of the layer's output channels into ``target``."""

        def on_forward(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return  # evaluation, or a frozen branch: no gradient will come
            activation = output.detach()  # shares storage: sees in-place ReLU / shortcut adds

            def on_gradient(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    product = (activation.float() * grad.float()).abs()
                    per_sample = product.reshape(product.shape[0], product.shape[1], -1).mean(dim=2)  # (N, C)
                    relevance = per_sample.sum(dim=0)
                    target.add_(torch.where(torch.isfinite(relevance).all(), relevance, 0.0))

            output.register_hook(on_gradient)

        return on_forward

    def update(self, model: nn.Module) -> None:
        """The hooks accumulate during backward; this only counts iterations."""
        self.num_updates += 1


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
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise PruningRequestError(f"run_extra_pass needs num_batches >= 1, got {num_batches!r}")
        inner = unwrap_model(model)
        params = [p for p in inner.parameters() if p.requires_grad]
        saved_grads = [p.grad for p in params]
        saved_buffers = [(b, b.detach().clone()) for b in inner.buffers()]
        was_training = model.training
        batches = iter(data_iter)
        try:
            model.train()
            for done in range(num_batches):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise PruningRequestError(
                        f"run_extra_pass: the data ran out after {done} of {num_batches} batches"
                    ) from None
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
    """Feature relevance: accumulated |activation x gradient| at producer outputs."""
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
