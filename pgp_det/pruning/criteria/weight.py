"""Criteria computed from the current weights alone: SFP/PSFP filter norms and |gamma| of the
norms (usable without training data, as one-shot pruning does)."""
from collections import OrderedDict
from typing import List



from ..groups import ChannelGroup, ChannelSlice
from .base import ChannelCriterion, _filter_norms


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
