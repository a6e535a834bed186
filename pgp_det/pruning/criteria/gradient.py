"""Criteria computed from training gradients: PGP (signed sums, or over an extra pass), RPGP,
the recent-gradient variant and first-order Taylor."""
from collections import OrderedDict
from typing import Iterable, Optional

import torch
from torch import nn

from detectron2.utils.events import EventStorage

from ...utils.modules import unwrap_model
from ..groups import PruningRequestError
from .base import _AccumulatingCriterion, _Key, _filter_norms


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
    ``PRUNING.ALLOCATION.PROTECT_QUANTILE`` whatever ``PRUNING.CRITERION.NAME`` is.
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
