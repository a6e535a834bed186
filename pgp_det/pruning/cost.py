"""What channels cost: FLOPs and parameters per layer and per channel group, and the FLOPs a
pruned architecture will have, predicted without building it.

FLOPs follow :mod:`pgp_det.utils.flops` (fvcore's count: one multiply-add is one FLOP; one
inference on a zero image of a fixed size; the RPN keeps its full proposal budget, so the ROI
heads' cost depends only on the architecture). Unlike ``count_flops``, proposals that box
clipping made empty are kept too (see ``_every_proposal_kept``): both agree on any model whose
RPN predicts sensible boxes, and only this count stays exact on degenerate ones.

The prediction is exact for a cost that is a product of channel counts. A conv or linear layer
costs ``in x out x (kernel, positions)``: it scales with ``kept_in / in`` and ``kept_out / out``
of the groups it reads and writes. A norm costs one or two FLOPs per output element: it scales
with its conv's output group. Parameters scale per tensor with the groups on each of its axes.
FPN's own FLOPs (the top-down nearest upsampling) scale with its lateral group. Everything else
is taken as fixed; fvcore counts nothing else in a Faster R-CNN.
"""
import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from detectron2.modeling.backbone.fpn import FPN
from torch import nn

from ..utils.flops import FAMILIES, family_of, module_flops
from ..utils.modules import unwrap_model
from .dependency import derive_channel_groups
from .groups import SCOPES, ChannelGroup, PruningRequestError, kept_count

__all__ = [
    "LayerCost",
    "GroupCost",
    "CostModel",
    "layer_costs",
    "format_group_costs",
    "uniform_sizes",
    "ratio_for_flops_reduction",
]


_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerCost:
    """Cost of one conv/linear layer in one inference.

    Attributes:
        flops: the layer's multiply-adds (fvcore), its norm excluded.
        params: weight and bias entries.
        in_channels, out_channels: input and output channels (features) when measured.
    """

    flops: float
    params: int
    in_channels: int
    out_channels: int


@dataclass(frozen=True)
class GroupCost:
    """The cost that scales with one channel group: what removing all its channels would save.

    Layers between two groups count in both, so these do not add up to the model's total.

    Attributes:
        size: the group's channels when measured.
        flops: FLOPs of the layers (and norms) reading or writing the group.
        params: parameters of the tensors with an axis over the group.
        flops_share: ``flops`` as a fraction of the model's total FLOPs.
    """

    size: int
    flops: float
    params: int
    flops_share: float


@dataclass(frozen=True)
class _Term:
    """A cost scaling with ``prod(kept[g] / size[g] for g in groups)``."""

    family: str
    value: float
    groups: Tuple[str, ...]


def _own_flops(model: nn.Module, height: int, width: int) -> Dict[str, float]:
    """``{module name: FLOPs of the ops the module runs itself, its submodules' excluded}`` for
    one inference on a (3, height, width) zero image; ``""`` is the detector itself."""
    cumulative, everything = module_flops(model, height, width)
    cumulative[""] = everything  # ops outside the detector's modules are counted as its own
    own = {}
    for name, module in model.named_modules():
        children = (f"{name}.{child}" if name else child for child, _ in module.named_children())
        own[name] = cumulative.get(name, 0.0) - sum(cumulative.get(c, 0.0) for c in children)
    return own


def _slice_groups(groups: Mapping[str, ChannelGroup]) -> Dict[Tuple[str, str, int], str]:
    """``{(module, tensor, dim): group name}`` over every slice of every group."""
    return {(s.module, s.tensor, s.dim): g.name for g in groups.values() for s in g.slices}


def layer_costs(model: nn.Module, height: int, width: int) -> "OrderedDict[str, LayerCost]":
    """Per conv/linear layer (qualified name), its cost in one inference at ``height x width``."""
    model = unwrap_model(model)
    own = _own_flops(model, height, width)
    result = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
            conv = isinstance(module, nn.Conv2d)
            result[name] = LayerCost(
                flops=own[name],
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                in_channels=module.in_channels if conv else module.in_features,
                out_channels=module.out_channels if conv else module.out_features,
            )
    return result


class CostModel:
    """FLOPs and parameters of ``model`` at a fixed input size, and of any pruned version of it.

    Measures once (one fvcore count); :meth:`predict` is then arithmetic. Example::

        costs = CostModel(model, 800, 1333)
        costs.predict({"backbone.fpn.out": 128})["gflops"]  # FPN outputs halved

    Attributes:
        height, width: the input size (pixels).
        sizes: ``{group name: channels}`` when measured.
        flops: measured total FLOPs; params: measured total parameters.
    """

    def __init__(self, model: nn.Module, height: int, width: int):
        model = unwrap_model(model)
        self.height, self.width = int(height), int(width)
        groups = derive_channel_groups(model, allow_frozen=True)
        self.sizes: Dict[str, int] = {name: g.size for name, g in groups.items()}
        located = _slice_groups(groups)
        own = _own_flops(model, height, width)
        names = {module: name for name, module in model.named_modules()}

        self._flop_terms = []
        for name, module in model.named_modules():
            if not own.get(name):
                continue
            if isinstance(module, FPN):
                axes = [located[(names[module.lateral_convs[0]], "weight", 0)]]
            else:
                axes = _tensor_axes(module, name, located)
            self._flop_terms.append(_Term(family_of(name), float(own[name]), tuple(axes)))

        self._param_terms = []
        for full_name, param in model.named_parameters():
            module_name, _, tensor = full_name.rpartition(".")
            axes = [located[(module_name, tensor, d)] for d in range(param.dim()) if (module_name, tensor, d) in located]
            self._param_terms.append(_Term(family_of(full_name), float(param.numel()), tuple(axes)))
        self.flops = sum(t.value for t in self._flop_terms)
        self.params = int(sum(t.value for t in self._param_terms))

    def _check_known(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.sizes:
                known = ", ".join(list(self.sizes)[:4])
                raise PruningRequestError(f"unknown channel group {name!r} (groups are named like {known}, ...)")

    def _ratios(self, sizes: Mapping[str, int]) -> Dict[str, float]:
        self._check_known(sizes)
        ratios = {name: 1.0 for name in self.sizes}
        for name, kept in sizes.items():
            if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= self.sizes[name]:
                raise PruningRequestError(
                    f"{name}: cannot predict the cost of {kept!r} channels; use an integer in 1..{self.sizes[name]}"
                )
            ratios[name] = kept / self.sizes[name]
        return ratios

    def predict(self, sizes: Mapping[str, int]) -> dict:
        """Cost of the model with ``sizes[group]`` channels kept (other groups as measured).

        Returns:
            ``{"flops": float, "gflops": float, "params": int, "flops_per_family": {family:
            float}, "params_per_family": {family: int}}`` with the families of
            :data:`pgp_det.utils.flops.FAMILIES` (plus "other" if anything falls outside).

        Raises:
            PruningRequestError: an unknown group, or a count outside ``1 .. measured size``.
        """
        ratios = self._ratios(sizes)
        flops = _accumulate(self._flop_terms, ratios)
        params = {k: int(round(v)) for k, v in _accumulate(self._param_terms, ratios).items()}
        return {
            "flops": sum(flops.values()),
            "gflops": sum(flops.values()) / 1e9,
            "params": sum(params.values()),
            "flops_per_family": flops,
            "params_per_family": params,
        }

    def rescaled(self, sizes: Mapping[str, int]) -> "CostModel":
        """This cost model referred to other widths: a copy whose measured model has
        ``sizes[group]`` channels (other groups as measured), e.g. the original widths of a model
        measured after pruning (a resumed run).

        Every cost term scales with the product of its groups' widths, so a term measured at
        ``C`` channels is ``C' / C`` times larger at ``C'``: the copy predicts exactly what
        measuring the model at those widths would (up to float rounding), wider ones included.

        Raises:
            PruningRequestError: an unknown group or a width that is not an integer >= 1.
        """
        self._check_known(sizes)
        for name, width in sizes.items():
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise PruningRequestError(f"{name}: cannot rescale to {width!r} channels; use an integer >= 1")
        widths = dict(self.sizes)
        widths.update(sizes)
        factors = {name: widths[name] / self.sizes[name] for name in self.sizes}

        def scaled(terms):
            return [replace(t, value=t.value * math.prod(factors[g] for g in t.groups)) for t in terms]

        result = copy.copy(self)
        result.sizes = widths
        result._flop_terms = scaled(self._flop_terms)
        result._param_terms = scaled(self._param_terms)
        result.flops = sum(t.value for t in result._flop_terms)
        result.params = int(round(sum(t.value for t in result._param_terms)))
        return result

    def group_costs(self, groups: Optional[Iterable[str]] = None) -> "OrderedDict[str, GroupCost]":
        """:class:`GroupCost` of each named group (default: all), in forward order."""
        names = list(self.sizes) if groups is None else [g.name if isinstance(g, ChannelGroup) else g for g in groups]
        self._check_known(names)
        result = OrderedDict()
        for name in names:
            flops = sum(t.value for t in self._flop_terms if name in t.groups)
            result[name] = GroupCost(
                size=self.sizes[name],
                flops=flops,
                params=int(sum(t.value for t in self._param_terms if name in t.groups)),
                flops_share=flops / self.flops if self.flops else 0.0,
            )
        return result


def _tensor_axes(module: nn.Module, name: str, located: Mapping[Tuple[str, str, int], str]) -> Sequence[str]:
    """Groups on the axes of ``module``'s weight (of its first grouped tensor when it has no
    weight): the groups its FLOPs scale with."""
    tensors = [t for t in ("weight", "running_mean") if getattr(module, t, None) is not None]
    for tensor in tensors:
        axes = [located[(name, tensor, d)] for d in range(getattr(module, tensor).dim()) if (name, tensor, d) in located]
        if axes:
            return axes
    return []


def _accumulate(terms: Iterable[_Term], ratios: Mapping[str, float]) -> Dict[str, float]:
    per_family = {family: 0.0 for family in FAMILIES}
    for term in terms:
        per_family[term.family] = per_family.get(term.family, 0.0) + term.value * math.prod(
            ratios[g] for g in term.groups
        )
    return per_family


def format_group_costs(groups: Mapping[str, ChannelGroup], costs: Mapping[str, GroupCost]) -> str:
    """A fixed-width table, one line per group of ``costs``: name, scope, size, GFLOPs and share
    of the model's FLOPs that scale with the group, and its parameters."""
    rows = [("group", "scope", "size", "GFLOPs", "share", "params")]
    for name, cost in costs.items():
        group = groups.get(name)
        rows.append((
            name,
            group.scope if group is not None else "?",
            str(group.size if group is not None else cost.size),
            f"{cost.flops / 1e9:.3f}",
            f"{100 * cost.flops_share:.1f}%",
            f"{cost.params:,}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def _check_scopes(scopes: Iterable[str]) -> Tuple[str, ...]:
    scopes = tuple(scopes)
    if not scopes:
        raise PruningRequestError(f"no pruning scope given; name some of {', '.join(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise PruningRequestError(f"unknown pruning scope {scope!r}; scopes are {', '.join(SCOPES)}")
    return scopes


def uniform_sizes(
    groups: Mapping[str, ChannelGroup],
    ratio: float,
    multiple: int = 8,
    floor: int = 8,
    scopes: Iterable[str] = SCOPES,
) -> "OrderedDict[str, int]":
    """``{group name: channels kept}`` when every prunable group in ``scopes`` prunes the
    fraction ``ratio`` of its current size (rounded by :func:`kept_count`); other groups keep
    their size."""
    scopes = _check_scopes(scopes)
    return OrderedDict(
        (
            name,
            kept_count(g.size, ratio, multiple, floor, g.channel_multiple)
            if g.prunable and g.scope in scopes
            else g.size,
        )
        for name, g in groups.items()
    )


def ratio_for_flops_reduction(
    cost_model: CostModel,
    groups: Mapping[str, ChannelGroup],
    target_reduction: float,
    multiple: int = 8,
    floor: int = 8,
    scopes: Iterable[str] = SCOPES,
) -> float:
    """The smallest uniform channel ratio whose predicted FLOPs are at most
    ``(1 - target_reduction)`` times those ``cost_model`` measured.

    Every prunable group of ``groups`` in ``scopes`` keeps ``kept_count(size, r, multiple,
    floor, channel_multiple)`` channels (:func:`uniform_sizes`); the reduction grows with ``r``
    in steps, and ``r`` is found by bisection to 1e-6.

    Raises:
        PruningRequestError: the target is not in (0, 1), or not reachable even at ``r = 1``
            (every group at its floor): the message gives the most that is reachable.
    """
    if not 0.0 < target_reduction < 1.0:
        raise PruningRequestError(f"FLOPs reduction {target_reduction!r} must be a fraction in (0, 1)")
    scopes = _check_scopes(scopes)

    def reduction(ratio: float) -> float:
        return 1.0 - cost_model.predict(uniform_sizes(groups, ratio, multiple, floor, scopes))["flops"] / cost_model.flops

    most = reduction(1.0)
    if most < target_reduction:
        raise PruningRequestError(
            f"a FLOPs reduction of {100 * target_reduction:.1f}% at {cost_model.height}x{cost_model.width} is "
            f"unreachable: pruning every prunable group in scopes {', '.join(scopes)} down to its floor of {floor} "
            f"channels saves {100 * most:.1f}%; lower the target or the floor, or prune more scopes"
        )
    if reduction(0.0) >= target_reduction:
        return 0.0
    low, high = 0.0, 1.0  # reduction(low) < target <= reduction(high)
    while high - low > 1e-6:
        middle = (low + high) / 2
        if reduction(middle) >= target_reduction:
            high = middle
        else:
            low = middle
    return high
