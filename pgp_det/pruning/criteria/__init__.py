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
    ``PRUNING.CRITERION.EXTRA_PASS_BATCHES`` batches without optimizer steps, right before each pruning
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

Modules: :mod:`.base` (the protocol, the reduction, the accumulator), :mod:`.weight`,
:mod:`.gradient`, :mod:`.feature_relevance`; each criterion says what it needs
(``needs_gradients``, ``needs_activations``, ``needs_extra_pass``).
"""
import inspect

from ..groups import PruningRequestError
from .base import CRITERION_REGISTRY, ChannelCriterion, combine_layer_scores
from .feature_relevance import FeatureRelevanceCriterion
from .gradient import (AccumulatedGradientCriterion, ExtraPassGradientCriterion, GradientL1Criterion,
                       RecentGradientCriterion, TaylorCriterion)
from .weight import FilterNormCriterion, NormGammaCriterion

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
